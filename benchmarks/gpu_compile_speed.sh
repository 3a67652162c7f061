#!/usr/bin/env bash
# The compiled path on one GPU, as one command (at most 10 minutes: every step has its own time limit):
#
#   benchmarks/gpu_compile_speed.sh RESULTS_DIR [CLEANRL_CHECKOUT]
#
# 1. benchmarks/compile_speed.py --device cuda: steady SPS of ppo_atari.py (eager, --compile, --cudagraphs,
#    --compile --bf16, --no-channels-last), rpo_mujoco.py (eager, --compile, --cudagraphs) and ppo_atari_equi.py
#    (eager, --compile, --cudagraphs, --bf16: the compiled update goes through the traceable escnn twins), the compile
#    times and the recompiles (one run of each; RESULTS_DIR/compile_speed_gpu_<script>.*).
# 1b. benchmarks/update_layout.py --device cuda: one update step of every equivariant script (PPO, DQN, SAC, CQL,
#    IQL) eager, eager through the traceable twins, and compiled through them, with its recompiles; random data of
#    the real shapes, so no pybullet and no dataset is needed (RESULTS_DIR/update_layout_gpu.{json,log}).
# 2. the compiled path's recompiles and graph breaks: one short ppo_atari.py --compile run with
#    TORCH_LOGS=recompiles,graph_breaks (RESULTS_DIR/compile_diagnosis_gpu.log).
# 3. with a CleanRL checkout: benchmarks/cleanrl_side_by_side.py --device cuda, CleanRL's ppo_atari.py and
#    ppo_atari_envpool.py vs ours eager, --compile, --cudagraphs and --compile --bf16
#    (RESULTS_DIR/cleanrl_side_by_side_gpu.{json,csv}).
#    CleanRL's packages (gymnasium 0.29, ale-py 0.9, gym 0.23, envpool, tyro, tensorboard, torch) come from the
#    python named by CLEANRL_PYTHON, or from folders named by CLEANRL_PYTHONPATH put on PYTHONPATH for its runs only.
#
# Needs no uv: PYTHON (default python3) must import this project's packages (torch with CUDA, escnn, gymnasium 1.x,
# ale-py, mujoco, tyro, tensorboard), from its own site-packages or from folders on PYTHONPATH. This checkout is put
# on PYTHONPATH here.
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_compile_speed.sh RESULTS_DIR [CLEANRL_CHECKOUT]}
CLEANRL=${2:-}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF'
import sys
try:
    import escnn, gymnasium, ale_py, mujoco, tyro, tensorboard, torch  # noqa: F401
except ImportError as exc:
    sys.exit(f"error: {exc}; put this project's packages on PYTHONPATH (or set PYTHON to a python that has them).")
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device; this benchmark is for a GPU machine (on a CPU: compile_speed.py --device cpu).")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
EOF

# one results file per script, each under its own time limit, so that a slow compile costs only its own script
declare -A VARIANTS=([ppo_atari]="eager compile cudagraphs compile_bf16 nchw" [rpo_mujoco]="eager compile cudagraphs"
                     [ppo_atari_equi]="eager compile cudagraphs bf16")
# the limits add up to at most 590 s with the steps below
declare -A LIMIT=([ppo_atari]=150 [rpo_mujoco]=80 [ppo_atari_equi]=100)
for script in ppo_atari rpo_mujoco ppo_atari_equi; do
    # shellcheck disable=SC2086
    timeout "${LIMIT[$script]}" "$PY" benchmarks/compile_speed.py --device cuda --scripts "$script" --repeats 1 \
        --variants ${VARIANTS[$script]} --threads 4 --nice 0 --out "$OUT/compile_speed_gpu_$script.json" 2>&1 \
        | tee "$OUT/compile_speed_gpu_$script.log" \
        || echo "compile_speed.py $script: stopped (exit ${PIPESTATUS[0]}); see its log" | tee -a "$OUT/failures.txt"
done

# one update of each equivariant script: eager, through the traceable twins, compiled through them
timeout 100 "$PY" benchmarks/update_layout.py --device cuda --scripts ppo_atari_equi dqn_equi_bullet sac_equi_bullet \
    cql_equi_offline iql_equi_offline --models equi --layouts channels_last traced compile --rounds 2 --steps 4 \
    --threads 4 --out "$OUT/update_layout_gpu.json" 2>&1 | tee "$OUT/update_layout_gpu.log" \
    || echo "update_layout.py: stopped (exit ${PIPESTATUS[0]}); see its log" | tee -a "$OUT/failures.txt"

# where a compiled run spends its time: every recompile and graph break, with its reason
TMP=$(mktemp -d)
(cd "$TMP" && TORCH_LOGS=recompiles,graph_breaks timeout 40 "$PY" "$OLDPWD/ppo_atari.py" --compile --num-envs 8 \
    --num-steps 128 --total-timesteps 4096 > "$OUT/compile_diagnosis_gpu.log" 2>&1) \
    || echo "compile diagnosis: stopped (exit $?); see its log" | tee -a "$OUT/failures.txt"
rm -rf "$TMP"

if [ -n "$CLEANRL" ]; then
    timeout 120 "$PY" benchmarks/cleanrl_side_by_side.py --cleanrl-path "$CLEANRL" \
        --cleanrl-python "${CLEANRL_PYTHON:-$PY}" --cleanrl-pythonpath "${CLEANRL_PYTHONPATH:-}" \
        --device cuda --repeats 1 --variants cleanrl cleanrl_envpool ours ours_compile ours_cudagraphs \
        ours_compile_bf16 --threads 4 --nice 0 \
        --total-timesteps 4096 --out "$OUT/cleanrl_side_by_side_gpu.json" 2>&1 | tee "$OUT/cleanrl_side_by_side_gpu.log" \
        || echo "cleanrl_side_by_side.py: stopped (exit ${PIPESTATUS[0]}); see its log" | tee -a "$OUT/failures.txt"
else
    echo "no CleanRL checkout given: side-by-side skipped" | tee "$OUT/cleanrl_side_by_side_gpu.log"
fi
echo "results in $OUT"
