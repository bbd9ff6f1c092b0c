#!/usr/bin/env bash
# GPU check for fxdit: environment report, the GPU tests with the real Triton compiler, then the GPU benchmarks.
#
#   bash tools/gpu_check.sh
#
# Runs in a copy of the repository on a machine with an NVIDIA GPU, in at most about 8 minutes: the tests are
# stopped after FXDIT_GPU_TEST_TIMEOUT seconds (default 300), the benchmark starts no new row after
# FXDIT_GPU_BENCH_BUDGET seconds (default 150) and is stopped after FXDIT_GPU_BENCH_TIMEOUT (default 190).
#
# What it expects: a Python that imports a CUDA build of torch (>= 2.11) and triton, plus pytest and hypothesis.
# It uses .venv/bin/python when that exists and sees CUDA, else python3. It installs nothing:
#   * the checkout goes on PYTHONPATH (fxdit finds kernels/ and passes/ from a checkout by itself), so the
#     interpreter's own torch and triton are used;
#   * when that Python has no fxdit distribution (no `pip install -e . --no-deps` was run), the `fxdit` entry point
#     of the `torch_dynamo_backends` group (what torch.compile(backend="fxdit") looks up) comes from a temporary
#     dist-info folder put on PYTHONPATH.
#
# Writes benchmarks/gpu.md. When $OUT is set, also copies there: gpu_env.txt, gpu_tests.log, gpu_tests.xml
# (JUnit), bench_gpu.log and gpu.md.
#
# Exit status: non-zero when a GPU test fails or is skipped (the benchmark still runs), or when the benchmark fails.

set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
LOGDIR=${OUT:-}
if [ -z "$LOGDIR" ]; then
    LOGDIR=$(mktemp -d)
fi
mkdir -p "$LOGDIR"
TEST_TIMEOUT=${FXDIT_GPU_TEST_TIMEOUT:-300}
BENCH_TIMEOUT=${FXDIT_GPU_BENCH_TIMEOUT:-190}
BENCH_BUDGET=${FXDIT_GPU_BENCH_BUDGET:-150}

has_cuda() {
    "$1" -c 'import sys, torch, triton; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

if [ -x .venv/bin/python ] && has_cuda .venv/bin/python; then
    PY=.venv/bin/python
else
    PY=python3
fi

# fxdit from this checkout, whatever is installed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" - <<'EOF'
import sys
from importlib.metadata import entry_points

sys.exit(0 if any(e.name == "fxdit" for e in entry_points(group="torch_dynamo_backends")) else 1)
EOF
then
    SHIM=$(mktemp -d)
    mkdir -p "$SHIM/fxdit-0.1.0.dist-info"
    printf 'Metadata-Version: 2.1\nName: fxdit\nVersion: 0.1.0\n' >"$SHIM/fxdit-0.1.0.dist-info/METADATA"
    printf '[torch_dynamo_backends]\nfxdit = fxdit.backend:fxdit_backend\n' \
        >"$SHIM/fxdit-0.1.0.dist-info/entry_points.txt"
    export PYTHONPATH="$PYTHONPATH:$SHIM"
    echo "gpu_check: fxdit entry point provided from $SHIM"
fi

{
    echo "== date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "== nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    echo "== python: $PY"
    "$PY" - <<'EOF'
import platform
import sys

print("python", sys.version.split()[0], platform.machine())
try:
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
              "memory GiB", round(p.total_memory / 2**30, 1))
except Exception as exc:  # noqa: BLE001
    print("torch import failed:", exc)
for name in ("triton", "pytest", "hypothesis", "safetensors", "numpy"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", exc)
import fxdit

print("fxdit", fxdit.__version__, "from", fxdit.__file__)
EOF
} 2>&1 | tee "$LOGDIR/gpu_env.txt"

if ! has_cuda "$PY"; then
    echo "gpu_check: $PY does not see CUDA (or lacks torch/triton); nothing to run" | tee -a "$LOGDIR/gpu_env.txt"
    exit 2
fi

# Triton compiles the autotuning configurations one after another, so the tests spread over several processes
# (pytest-xdist, when installed; FXDIT_GPU_TEST_WORKERS=1 runs them in one) to use the host's cores. They share the
# GPU; no test measures time.
WORKERS=${FXDIT_GPU_TEST_WORKERS:-4}
XDIST_ARGS=""
if [ "$WORKERS" -gt 1 ] && "$PY" -c 'import xdist' >/dev/null 2>&1; then
    XDIST_ARGS="-n $WORKERS"
fi
echo "== GPU tests (TRITON_INTERPRET=0, timeout ${TEST_TIMEOUT}s, ${XDIST_ARGS:-one process})"
set -o pipefail
# shellcheck disable=SC2086  # XDIST_ARGS is empty or two words
TRITON_INTERPRET=0 TRITON_PRINT_AUTOTUNING=1 PYTHONUNBUFFERED=1 \
    timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -m gpu tests/gpu $XDIST_ARGS -rfEs --durations=15 \
    --junitxml="$LOGDIR/gpu_tests.xml" 2>&1 | tee "$LOGDIR/gpu_tests.log"
TEST_RC=$?
SKIPPED=$("$PY" - "$LOGDIR/gpu_tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:  # noqa: BLE001 - no report (timeout, crash)
    print(-1)
    sys.exit(0)
suites = [root] if root.tag == "testsuite" else list(root)
print(sum(int(s.get("skipped", 0)) for s in suites))
EOF
)
echo "== GPU tests: pytest exit status $TEST_RC, skipped $SKIPPED" | tee -a "$LOGDIR/gpu_tests.log"
STATUS=0
if [ "$TEST_RC" -ne 0 ] || [ "$SKIPPED" != "0" ]; then
    STATUS=1
fi

echo "== GPU benchmark (timeout ${BENCH_TIMEOUT}s)"
PYTHONUNBUFFERED=1 timeout "$BENCH_TIMEOUT" "$PY" tools/bench_gpu.py --budget-s "$BENCH_BUDGET" \
    --out benchmarks/gpu.md 2>&1 | tee "$LOGDIR/bench_gpu.log"
BENCH_RC=$?
echo "== GPU benchmark: exit status $BENCH_RC" | tee -a "$LOGDIR/bench_gpu.log"
if [ -f benchmarks/gpu.md ] && [ "$LOGDIR" != "$ROOT/benchmarks" ]; then
    cp benchmarks/gpu.md "$LOGDIR/gpu.md"
fi
if [ "$BENCH_RC" -ne 0 ] && [ "$STATUS" -eq 0 ]; then
    STATUS=3
fi
echo "gpu_check: logs in $LOGDIR; exit status $STATUS (0 ok, 1 tests failed or skipped, 3 benchmark failed)"
exit "$STATUS"
