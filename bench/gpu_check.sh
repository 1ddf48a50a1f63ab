#!/usr/bin/env bash
# One device call for the H200 kernels: carried wheels, the CUDA build for sm_90, the GPU tests (linear attention
# against fp64, and the distill/hf tests on the GPU), then the timed benchmark. fla probes and the compile
# warm-up of every kernel run in parallel worker processes while the extension builds and the tests run, so the
# timed run compiles nothing. Everything stays inside one 10-minute call.
# Usage (repository root on the GPU machine): OUT=dir bash bench/gpu_check.sh [bench/linear_attn.py args...]
# Returns under $OUT: linear_attn_h200.{json,md}, linear_attn_partial.jsonl, fla_probe.json, logs.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOGS=/tmp/gpu_check_logs; rm -rf "$LOGS"; mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
pack() { tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }
trap pack EXIT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$LOGS/nvidia-smi.txt" 2>&1

python3 bench/linear_attn.py --prepare --out "$OUT" "$@" > "$LOGS/prepare.log" 2>&1 &
prep=$!
timeout 240 python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1; el "build rc=$?"; tail -2 "$LOGS/build.log"
python3 -m fastattn.cli env 2>&1 | tee "$LOGS/env.txt"

timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -m gpu tests/test_linear_attn_gpu.py -n 6 -p no:cacheprovider \
  > "$LOGS/gpu_tests.log" 2>&1 &
tests=$!
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q tests/test_distill.py tests/test_hf.py -p no:cacheprovider \
  > "$LOGS/hf_tests.log" 2>&1
el "distill/hf tests (cuda device) rc=$?"; tail -3 "$LOGS/hf_tests.log"
wait $tests; el "gpu tests rc=$?"; grep -E "passed|failed|error" "$LOGS/gpu_tests.log" | tail -15
wait $prep; el "prepare rc=$?"; tail -2 "$LOGS/prepare.log"

left=$(( ${CALL_LIMIT:-570} - ($(date +%s) - t0) ))
el "bench with ${left}s left"
timeout $left python3 bench/linear_attn.py --out "$OUT" "$@" > "$LOGS/bench.log" 2>&1; el "bench rc=$?"
tail -5 "$LOGS/bench.log"
cat "$OUT/linear_attn_h200.md" 2>/dev/null
