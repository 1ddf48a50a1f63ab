#!/usr/bin/env bash
# One device call for glm_tma_kernel's option parts (A's fp16 parts made once per A; written without a GPU in the
# twelfth session, see bench/results/h200_summary.md, top section) and the GPU suite with the TMA defaults, most
# important first, each step capped so the call ends inside CALL_LIMIT (default 570 s):
#   build (sm_90, in the background) | bench/subspace_hvp.py: the parts paths against the default (A split in the
#       k-loop), cuBLAS fp16x3 on the same parts, cuBLAS fp32 and vmap, in one process
#   ->  every GPU test (pytest -m gpu tests, 4 workers)
#   ->  bench/linear_attn_configs.py: q/k windows (WINDOWS, thirteenth session) against the default at D = 9, 37, 182
#   ->  bench/subspace_hvp.py --sweep --sweep-precision fp16x3 (PARTS_SWEEP first) with the time left
# Usage (repository root on the GPU machine): OUT=dir [CALL_LIMIT=570] bash bench/gpu_tma.sh
# Returns under $OUT: subspace_hvp_h*.{json,md} (the paths), windows/linear_attn_configs.{json,md},
# sweep/subspace_hvp_h*.{json,md}, logs.tgz.
set -uo pipefail
LOGS=/tmp/gpu_tma_logs
source "$(dirname "$0")/gpu_common.sh"
LIMIT=${CALL_LIMIT:-570}
left() { local x=$(( LIMIT - ($(date +%s) - t0) - $1 )); [ "$x" -lt 20 ] && x=20; echo "$x"; }   # seconds left
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 &
build=$!
timeout 150 python3 bench/subspace_hvp.py --out "$OUT" --quick \
  --paths fused-triton,fused-triton-fp16x3-parts,fused-triton-fp16x3-parts64,fused-triton-fp16x3-parts64-chained,fused-triton-fp16x3-parts-cold,unfused-cublas-fp16x3,fused-triton-fp16x3-zacc,unfused-torch,vmap-autodiff \
  > "$LOGS/bench_subspace_hvp.log" 2>&1
el "subspace_hvp bench rc=$?"; grep -E "fused|unfused|vmap" "$LOGS/bench_subspace_hvp.log" | tail -12
wait $build; el "build rc=$?"; tail -1 "$LOGS/build.log"
timeout 240 python3 -m pytest -q -m gpu tests -n 4 -p no:cacheprovider > "$LOGS/gpu_tests.log" 2>&1
el "GPU tests rc=$?"; grep -E "FAILED|ERROR|passed|failed" "$LOGS/gpu_tests.log" | tail -12
mkdir -p "$OUT/windows"
timeout 170 python3 bench/linear_attn_configs.py --variants windows,windows_pointers --dims 9,37,182 \
  --out "$OUT/windows" > "$LOGS/bench_windows.log" 2>&1
el "windows rc=$?"; grep -E "^\| |compiled" "$LOGS/bench_windows.log" | cut -c1-220 | tail -12
mkdir -p "$OUT/sweep"
timeout "$(left 10)" python3 bench/subspace_hvp.py --out "$OUT/sweep" --quick --sweep --sweep-precision fp16x3 \
  --paths fused-triton,unfused-torch > "$LOGS/bench_sweep.log" 2>&1
el "sweep rc=$?"; grep -E "^sweep" "$LOGS/bench_sweep.log" | cut -c1-220 | tail -24
