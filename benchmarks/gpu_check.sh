#!/usr/bin/env bash
# The vLLM backend on a GPU, in one prepared run (issue 22): under 10 minutes on one NVIDIA GPU.
#
#     benchmarks/gpu_check.sh            # on a machine with an NVIDIA GPU, Python 3.11+ and pip access
#     VENV=/path/to/venv benchmarks/gpu_check.sh   # reuse an environment that already has vllm==0.32.0
#
# 1. installs vLLM 0.32.0 (the CUDA build, with its own torch) and this package into $VENV
#    (default .venv-gpu), unless vLLM 0.32.0 is already there;
# 2. runs, on the GPU, the tests that run on the CPU build in CI: the mover against every KV-cache
#    layout, the runner's input preparation, and the consistency suite (vLLM's logprobs under
#    eviction equal one dense-mask forward pass to 1e-4 in float32, greedy output equals the
#    reference generator, preemption, seeded sampling);
# 3. prints a verdict and writes the pytest log and a JUnit file under $OUT (default /tmp/gpu_check).
#
# The CPU build cannot tell whether vLLM's GPU attention backends, CUDA graphs or the device copies
# agree with the runner: this script is the check that they do. Its exit status is 0 only if
# every step passed.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv-gpu}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
START=$SECONDS
PY="$VENV/bin/python"

step() { printf '\n== %s (%ss)\n' "$1" $((SECONDS - START)); }

step "GPU"
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
    echo "VERDICT: no NVIDIA GPU here (nvidia-smi failed): nothing checked"
    exit 2
fi

step "environment ($VENV)"
if ! "$PY" -c 'import vllm, sys; sys.exit(vllm.__version__.split("+")[0] != "0.32.0")' 2>/dev/null; then
    [ -x "$PY" ] || python3 -m venv "$VENV" || { echo "VERDICT: could not create $VENV"; exit 2; }
    "$PY" -m pip install -q --upgrade pip
    # vLLM's CUDA wheel brings the torch it was built against; memento goes in without its own pins
    # (they name the CPU torch wheel), then the few runtime and test dependencies vLLM does not bring.
    "$PY" -m pip install -q "vllm==0.32.0" || { echo "VERDICT: pip could not install vllm==0.32.0"; exit 2; }
fi
"$PY" -m pip install -q --no-deps -e . \
    && "$PY" -m pip install -q "typer>=0.12" "rich>=13" "math-verify>=0.9" "pytest>=8" "hypothesis>=6.100" "openai>=1.40" "httpx>=0.27" \
    || { echo "VERDICT: could not install memento into $VENV"; exit 2; }
"$PY" - <<'EOF' || { echo "VERDICT: torch sees no CUDA device in $VENV"; exit 2; }
import torch, vllm
from vllm.platforms import current_platform
assert torch.cuda.is_available() and not current_platform.is_cpu()
print(f"vLLM {vllm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
EOF

step "tests on the GPU"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -W ignore::FutureWarning)
VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout 420 "${PYTEST[@]}" --junitxml "$OUT/junit.xml" \
    tests/vllm_backend/test_vllm_gpu_layouts.py tests/vllm_backend/test_vllm_consistency.py 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}

step "done"
if [ "$status" -eq 0 ]; then
    echo "VERDICT: PASS: the memento worker on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) matches the dense-mask reference"
else
    echo "VERDICT: FAIL (pytest exit $status): see $OUT/pytest.log"
fi
exit "$status"
