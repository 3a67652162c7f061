#!/bin/bash
# The body every template in slurm/ shares: prepare the job's environment, then become the training script.
#
#   bash slurm/run.sh <script.py> [script flags...]
#
# Called (with exec) by the per-script templates and by array.sbatch, inside a SLURM batch job; it also works by
# hand on a workstation. Nothing site-specific is written here; it comes from the environment:
#   CLEANRL_EQUI_DIR  the repository (default: the directory sbatch was run from, $SLURM_SUBMIT_DIR)
#   VENV              the already-synced environment to run in (default: <repository>/.venv, what `uv sync` makes);
#                     compute nodes often have no internet, so nothing is installed or synced here
#   MODULES           modules to `module load` first, e.g. MODULES="gcc opencv" (nothing is loaded when unset)
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "error: usage: bash slurm/run.sh <script.py> [flags...]" >&2
    exit 2
fi
script=$1
shift

repo=${CLEANRL_EQUI_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$repo/$script" ]; then
    echo "error: $repo/$script not found; submit from the repository root" \
         "or set CLEANRL_EQUI_DIR=/path/to/cleanrl-equi." >&2
    exit 2
fi

# One BLAS/OpenMP thread per process, as in a plain CleanRL job: the vector envs already use the job's cores, and
# more threads only make them compete.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 BLIS_NUM_THREADS=1 NUMEXPR_NUM_THREADS=1

if [ -n "${MODULES:-}" ]; then
    set +u  # module systems' shell code reads unset variables
    # `module` is a shell function that login shells define; a batch shell may only have the variable that says
    # where it lives.
    if ! type module >/dev/null 2>&1 && [ -n "${MODULESHOME:-}" ] && [ -f "$MODULESHOME/init/bash" ]; then
        source "$MODULESHOME/init/bash"
    fi
    if type module >/dev/null 2>&1; then
        # shellcheck disable=SC2086  # MODULES is a list of names
        if ! module load $MODULES; then
            echo "error: 'module load $MODULES' failed; check the names with 'module avail' or unset MODULES." >&2
            exit 2
        fi
    else
        echo "warning: MODULES=\"$MODULES\" is set but this node has no 'module' command; loading nothing." >&2
    fi
    set -u
fi

venv=${VENV:-$repo/.venv}
if [ ! -x "$venv/bin/python" ]; then
    echo "error: no Python environment at $venv (no $venv/bin/python); run 'uv sync' in $repo on the login node" \
         "first, or set VENV=/path/to/venv." >&2
    exit 2
fi
export VIRTUAL_ENV=$venv
export PATH="$venv/bin:$PATH"

array_task=${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID:-}_$SLURM_ARRAY_TASK_ID)}
echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-none}$array_task on $(hostname), restart ${SLURM_RESTART_COUNT:-0}:" \
     "$venv/bin/python $repo/$script $*"

# exec: this shell becomes the Python process (same PID). `--signal=B:USR1@<secs>` signals only the batch shell,
# and bash would die of USR1 (its default action) or, with a trap, only run the trap after the child had finished;
# as the batch shell itself, the script receives USR1 at once, writes its resume file, requeues the job and exits
# (TERM, from scancel or a preemption, also reaches it directly: it writes the resume file and stops).
exec "$venv/bin/python" "$repo/$script" "$@"
