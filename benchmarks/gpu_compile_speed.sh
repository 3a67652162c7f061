#!/usr/bin/env bash
# The compiled path on one GPU, as one command (at most 5.5 minutes: every step has its own time limit):
#
#   benchmarks/gpu_compile_speed.sh RESULTS_DIR [CLEANRL_CHECKOUT]
#
# 1. benchmarks/compile_speed.py --device cuda: steady SPS of ppo_atari.py, rpo_mujoco.py and ppo_atari_equi.py,
#    eager vs --compile, and the compile times (one run of each; RESULTS_DIR/compile_speed_gpu_<script>.{json,csv}).
# 2. with a CleanRL checkout: benchmarks/cleanrl_side_by_side.py --device cuda, CleanRL's ppo_atari.py and
#    ppo_atari_envpool.py vs ours eager and --compile (RESULTS_DIR/cleanrl_side_by_side_gpu.{json,csv}).
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
for script in ppo_atari rpo_mujoco ppo_atari_equi; do
    timeout 75 "$PY" benchmarks/compile_speed.py --device cuda --scripts "$script" --repeats 1 --threads 4 \
        --nice 0 --out "$OUT/compile_speed_gpu_$script.json" 2>&1 | tee "$OUT/compile_speed_gpu_$script.log" \
        || echo "compile_speed.py $script: stopped (exit ${PIPESTATUS[0]}); see its log" | tee -a "$OUT/failures.txt"
done

if [ -n "$CLEANRL" ]; then
    timeout 100 "$PY" benchmarks/cleanrl_side_by_side.py --cleanrl-path "$CLEANRL" \
        --cleanrl-python "${CLEANRL_PYTHON:-$PY}" --cleanrl-pythonpath "${CLEANRL_PYTHONPATH:-}" \
        --device cuda --repeats 1 --variants cleanrl cleanrl_envpool ours ours_compile --threads 4 --nice 0 \
        --total-timesteps 4096 --out "$OUT/cleanrl_side_by_side_gpu.json" 2>&1 | tee "$OUT/cleanrl_side_by_side_gpu.log" \
        || echo "cleanrl_side_by_side.py: stopped (exit ${PIPESTATUS[0]}); see its log" | tee -a "$OUT/failures.txt"
else
    echo "no CleanRL checkout given: side-by-side skipped" | tee "$OUT/cleanrl_side_by_side_gpu.log"
fi
echo "results in $OUT"
