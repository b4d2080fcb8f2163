#!/usr/bin/env bash
# One-shot checks on a CUDA machine (DESIGN.md section 10), run from the repository root:
#   OUT=gpu-results bash scripts/gpu_check.sh
# 1. picks a Python whose torch sees CUDA (.venv, creating it with the system's site packages
#    if absent, else python3) and records the machine in $OUT/env.txt,
# 2. runs the GPU-marked tests            -> $OUT/pytest-gpu.log
# 3. runs the LoRA kernel benchmark       -> $OUT/bench_lora_kernels.log
# 4. runs a quick `dlora profile` if the CLI has it -> $OUT/h200-llama-2-7b.yaml, $OUT/profile.log
# Each step has a time cap and the whole script stays within GPU_CHECK_BUDGET_S (default 470 s).
# It only measures: it never changes clocks, power limits, MIG or any other device setting.
# Exit status: 0 when every step that ran passed, 1 otherwise (see $OUT/summary.txt).
set -uo pipefail

OUT="${OUT:-gpu-results}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
START_S=$SECONDS
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

log() { echo "[gpu_check $((SECONDS - START_S))s] $*" | tee -a "$SUMMARY" >&2; }

# Seconds a step may take: its cap, or what is left of the budget (minus a margin).
step_time() {
  local cap=$1 left=$((BUDGET_S - (SECONDS - START_S) - 10))
  if ((left < cap)); then echo "$left"; else echo "$cap"; fi
}

# run_step NAME CAP_S CMD... : run CMD under a timeout, tee its output to $OUT/NAME.log.
run_step() {
  local name=$1 cap=$2 limit rc
  shift 2
  limit=$(step_time "$cap")
  if ((limit < 15)); then
    log "$name: SKIPPED (time budget spent)"
    FAILED=1
    return 1
  fi
  log "$name: start (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  if ((rc == 0)); then
    log "$name: ok"
  elif ((rc == 124 || rc == 137)); then
    log "$name: TIMED OUT after ${limit}s"
    FAILED=1
  else
    log "$name: FAILED (exit $rc)"
    FAILED=1
  fi
  return "$rc"
}

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

# --- 1. a Python with CUDA torch -----------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
  log "setup: no .venv, creating one on top of the system's packages (keeps its CUDA torch)"
  python3 -m venv --system-site-packages .venv
  if ! run_step pip-install 240 .venv/bin/pip install -q -e '.[live,dev]'; then
    log "setup: full install failed (offline?); installing dlora alone, without dependencies"
    FAILED=0
    run_step pip-install-nodeps 60 .venv/bin/pip install -q --no-deps --no-build-isolation -e . ||
      FAILED=0
  fi
fi
PY=""
for candidate in .venv/bin/python python3; do
  if command -v "$candidate" >/dev/null && has_cuda "$candidate"; then
    PY=$candidate
    break
  fi
done
if [[ -z "$PY" ]]; then
  log "setup: no Python here has a torch that sees CUDA (torch.cuda.is_available() is False)"
  for candidate in .venv/bin/python python3; do
    "$candidate" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1 |
      sed "s|^|  $candidate: |" | tee -a "$SUMMARY"
  done
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log "setup: using $PY"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  "$PY" - <<'EOF'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda)
try:
    import triton
    print("triton:", triton.__version__)
except ImportError as error:
    print("triton: missing", error)
props = torch.cuda.get_device_properties(0)
print("device:", torch.cuda.get_device_name(0), f"{props.total_memory / 2**30:.0f} GiB,",
      props.multi_processor_count, "SMs, count", torch.cuda.device_count())
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
    --format=csv 2>/dev/null || echo "nvidia-smi: unavailable"
} 2>&1 | tee "$OUT/env.txt"

# --- 2. GPU tests --------------------------------------------------------------------------
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  run_step pip-pytest 60 "$PY" -m pip install -q pytest hypothesis
fi
run_step pytest-gpu 180 "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider

# --- 3. kernel benchmark -------------------------------------------------------------------
run_step bench_lora_kernels 150 "$PY" benchmarks/bench_lora_kernels.py --device cuda

# --- 4. quick profile, when the CLI has `dlora profile` --------------------------------------
if [[ -x .venv/bin/dlora && "$PY" == .venv/bin/python ]]; then
  DLORA=(.venv/bin/dlora)
else
  DLORA=("$PY" -c 'import sys; from dlora.cli import main; sys.argv[0] = "dlora"; sys.exit(main())')
fi
if "${DLORA[@]}" profile --help >/dev/null 2>&1; then
  run_step profile 200 "${DLORA[@]}" profile --device cuda --model-config llama-2-7b \
    --dummy-weights --quick --out "$OUT/h200-llama-2-7b.yaml"
else
  log "profile: skipped (this checkout's CLI has no 'dlora profile' yet)"
fi

log "done in $((SECONDS - START_S))s; results in $OUT/"
exit "$FAILED"
