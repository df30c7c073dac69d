#!/usr/bin/env bash
# Issue 22, part B: the Triton kernels on an NVIDIA GPU, in about 8 minutes (docs/codegen.md).
#
#   bash benchmarks/gpu_check.sh [bench_gpu.py options, e.g. --budget 200]
#
# 1. installs the package (editable, no dependencies, no build isolation: the machine may be offline);
# 2. runs the kernel tests on CUDA (route, dispatch, combine, aggregate, code generation), at most 3.5 minutes;
# 3. runs benchmarks/bench_gpu.py: the copy roof, then route, dispatch, combine (forward and backward),
#    aggregate and the MoE layer against torch, in bfloat16, for --budget seconds (default 210).
# Writes benchmarks/results/gpu_check.json (device, driver, CUDA, torch and triton versions, every timing,
# the targets missed) and benchmarks/results/gpu_check_tests.log. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    || { echo "gpu_check.sh: no NVIDIA GPU (nvidia-smi failed)" >&2; exit 1; }
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")'

"$PYTHON" -m pip install --quiet --no-build-isolation --no-deps -e .

tests=0
timeout 210 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_route.py tests/test_dispatch.py \
    tests/test_combine.py tests/test_aggregate.py tests/test_codegen.py 2>&1 \
    | tee "$RESULTS/gpu_check_tests.log" || tests=$?

"$PYTHON" benchmarks/bench_gpu.py "$@"
if [ "$tests" -ne 0 ]; then
    echo "gpu_check.sh: the kernel tests failed or timed out (exit $tests), see $RESULTS/gpu_check_tests.log" >&2
    exit "$tests"
fi
