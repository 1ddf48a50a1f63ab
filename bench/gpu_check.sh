#!/usr/bin/env bash
# One device call: build the CUDA extension for sm_90, run the GPU tests, run the linear-attention benchmark.
# Usage (on the GPU machine, repository root): OUT=dir bash bench/gpu_check.sh [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/fla_core-*.whl .whl/einops-*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
t0=$(date +%s)
timeout 200 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$? $(( $(date +%s) - t0 ))s"
tail -3 "$OUT/build.log"
python3 -m fastattn.cli env | tee "$OUT/env.txt"
timeout ${TEST_TIMEOUT:-120} python3 -m pytest tests/test_linear_attn_gpu.py -q -x -m gpu -k "${TEST_FILTER:-long or graph or auto or compile}" \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "tests done $(( $(date +%s) - t0 ))s"
timeout ${BENCH_TIMEOUT:-150} python3 bench/linear_attn.py --out "$OUT" "$@" > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
tail -40 "$OUT/bench.log"
