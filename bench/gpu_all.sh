#!/usr/bin/env bash
# One H200 call for every kernel benchmark, most important first, each capped so the call ends inside its limit:
#   build (sm_90) | fla probes + compile warm-up of our kernels (parallel workers) | GPU tests ($GPU_TESTS)
#   ->  bench/subspace_hvp.py  ->  bench/seq_logps.py  ->  bench/linear_attn.py (last: it saves rows as it goes)
# Usage (repository root on the GPU machine): OUT=dir CALL_LIMIT=seconds [GPU_TESTS="tests/..."] bash bench/gpu_all.sh
# LA_ARGS: extra bench/linear_attn.py flags (e.g. "--Ts 65536,4096 --backends triton"); HVP_S: seconds for bench/subspace_hvp.py (0 skips it).
# (all GPU tests: GPU_TESTS=tests TEST_TIMEOUT=240 — the linear-attention ones alone took 168 s with 6 workers).
# TEST_MARK: the pytest -m expression (default gpu; TEST_MARK= runs every test of $GPU_TESTS, on the GPU where a
# test picks the device). TEST_WORKERS: pytest-xdist workers (default 4; 8 next to the fla prepare ran an 80 GB H100
# out of memory, 2026-12-07). HVP_ARGS: extra bench/subspace_hvp.py
# flags (e.g. "--quick --sweep --paths ..."). SEQ_S: seconds for bench/seq_logps.py (0 skips it).
# Returns under $OUT (8 files at most): linear_attn_h200.{json,md}, linear_attn_partial.jsonl,
# seq_logps_gpu.{json,md}, subspace_hvp_h200.{json,md}, fla_probe.json, logs.tgz (build, tests, probes, bench logs).
set -uo pipefail
LOGS=/tmp/gpu_all_logs
source "$(dirname "$0")/gpu_common.sh"
LIMIT=${CALL_LIMIT:-560}
FLA_DIMS=${FLA_DIMS:-32,64,128}
GPU_TESTS=${GPU_TESTS:-tests/test_seq_logps_triton.py tests/test_subspace_hvp.py}
cap() { local x=$(( LIMIT - ($(date +%s) - t0) - $1 )); [ "$x" -lt 10 ] && x=10; echo "$x"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$LOGS/nvidia-smi.txt" 2>&1

# fla compiles and autotunes every new D in its probe worker: 140 s was too little for its backward (2026-12-01)
# PREPARE_S=0 skips it (for LA_ARGS with --no-fla; `timeout 0` would mean no limit at all)
PREPARE_S=${PREPARE_S:-240}
if [ "$PREPARE_S" -gt 0 ]; then
  # LA_ARGS here too: the probes cover the grid that the timed run uses (fla autotunes anew for every T)
  timeout "$PREPARE_S" python3 bench/linear_attn.py --prepare --prepare-timeout $(( PREPARE_S - 10 )) \
    --fla-dims "$FLA_DIMS" --probe-file "$LOGS/fla_probe.json" --out "$LOGS" ${LA_ARGS:-} > "$LOGS/prepare.log" 2>&1 &
else
  sleep 0 &
fi
prep=$!
timeout 200 python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1; el "build rc=$?"; tail -1 "$LOGS/build.log"
python3 -m fastattn.cli env > "$LOGS/env.txt" 2>&1
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -m "${TEST_MARK-gpu}" $GPU_TESTS -n "${TEST_WORKERS:-4}" -p no:cacheprovider \
  > "$LOGS/gpu_tests.log" 2>&1
el "GPU tests rc=$?"; grep -E "passed|failed" "$LOGS/gpu_tests.log" | tail -3
wait $prep; el "prepare rc=$?"; tail -1 "$LOGS/prepare.log"

HVP_S=${HVP_S:-60}   # seconds for bench/subspace_hvp.py (0: not run); SEQ_S likewise for bench/seq_logps.py
if [ "$HVP_S" -gt 0 ]; then
  timeout "$HVP_S" python3 bench/subspace_hvp.py --out "$OUT" ${HVP_ARGS:-} > "$LOGS/bench_subspace_hvp.log" 2>&1
  el "subspace_hvp bench rc=$?"
fi
SEQ_S=${SEQ_S:-110}
if [ "$SEQ_S" -gt 0 ]; then
  timeout "$SEQ_S" python3 bench/seq_logps.py --out "$OUT" > "$LOGS/bench_seq_logps.log" 2>&1
  el "seq_logps bench rc=$?"
fi
timeout "$(cap 5)" python3 bench/linear_attn.py --fla-dims "$FLA_DIMS" --probe-file "$LOGS/fla_probe.json" \
  --out "$OUT" ${LA_ARGS:-} > "$LOGS/bench_linear_attn.log" 2>&1; el "linear_attn bench rc=$?"
cp "$LOGS/fla_probe.json" "$OUT/" 2>/dev/null
cat "$OUT/linear_attn_h200.md" "$OUT/seq_logps_gpu.md" "$OUT/subspace_hvp_h200.md" 2>/dev/null | head -120
