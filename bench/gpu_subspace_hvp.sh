#!/usr/bin/env bash
# One device call for the subspace-HVP kernels on the H200: the CUDA build for sm_90, the GPU tests of
# tests/test_subspace_hvp.py (triton, cuda and torch GLM paths against fp64), then bench/subspace_hvp.py
# (correctness to 1e-5 first, then do_bench timings), then, with the time left, a short GPU run of `fastattn rshtr`
# on the rank-deficient GLM. Usage (repository root on the GPU machine): OUT=dir [SWEEP=1] bash bench/gpu_subspace_hvp.sh
# (SWEEP=1 adds the Triton configuration sweep of bench/subspace_hvp.py --sweep).
# Returns under $OUT: subspace_hvp_h200.{json,md}, rshtr_gpu/ (report.md, metrics.json, plots), logs.tgz.
set -uo pipefail
LOGS=/tmp/gpu_subspace_hvp_logs
source "$(dirname "$0")/gpu_common.sh"
timeout 300 python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1; el "build rc=$?"; tail -2 "$LOGS/build.log"
python3 -m fastattn.cli env 2>&1 | tee "$LOGS/env.txt"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -m gpu tests/test_subspace_hvp.py -p no:cacheprovider \
  > "$LOGS/gpu_tests.log" 2>&1
el "gpu tests rc=$?"; grep -E "passed|failed|Error|error" "$LOGS/gpu_tests.log" | tail -15
timeout ${BENCH_TIMEOUT:-300} python3 bench/subspace_hvp.py --out "$OUT" ${SWEEP:+--sweep} > "$LOGS/bench.log" 2>&1
el "bench rc=$?"
tail -20 "$LOGS/bench.log"
left=$(( ${CALL_LIMIT:-570} - ($(date +%s) - t0) - 20 ))
if [ "$left" -gt 60 ]; then
  timeout $left python3 -m fastattn.cli rshtr --preset gpu --problems glm_rankdef --seeds 0 \
    --methods rshtr,rshtr_jl,hsodm_mf,lbfgs,newton_cg,trust_ncg --subspace-dims 200,400 --dims-by-problem "" \
    --max-time $(( (left - 60) / 10 )) --out "$OUT/rshtr_gpu" > "$LOGS/rshtr_gpu.log" 2>&1
  el "rshtr gpu rc=$?"; tail -3 "$LOGS/rshtr_gpu.log"
fi
cat "$OUT/subspace_hvp_h200.md" 2>/dev/null
