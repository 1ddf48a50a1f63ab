#!/usr/bin/env bash
# One device call for glm_tma_kernel's options parts (A's fp16 parts made once per A; twelfth session) and PLO (two
# products a k-step for a Rademacher P; thirteenth), the GPU suite with the TMA defaults, and q/k windows for
# ragged D (thirteenth), most important first, each step capped so the call ends inside CALL_LIMIT (default 570 s):
#   build (sm_90, in the background) | bench/subspace_hvp.py: the parts paths against the default (A split in the
#       k-loop), cuBLAS fp16x3 on the same parts, cuBLAS fp32 and vmap, in one process (Gaussian P)
#   ->  the same with a Rademacher P: two products a k-step against three (plo), 3 load stages, vmap, unfused
#   ->  the GPU tests of the new code (windows, split precisions with a Rademacher P, the CUDA tensor-core passes),
#       then every other GPU test
#   ->  bench/linear_attn_configs.py: q/k windows (WINDOWS) against the default at D = 9, 182
# Usage (repository root on the GPU machine): OUT=dir [CALL_LIMIT=570] bash bench/gpu_tma.sh
# Returns under $OUT: subspace_hvp_h*.{json,md} (Gaussian P), rademacher/subspace_hvp_h*_rademacher.{json,md},
# windows/linear_attn_configs.{json,md}, logs.tgz. (The fp16x3 sweep, bench/subspace_hvp.py --sweep
# --sweep-precision fp16x3, is for a later call.)
set -uo pipefail
LOGS=/tmp/gpu_tma_logs
source "$(dirname "$0")/gpu_common.sh"
LIMIT=${CALL_LIMIT:-570}
left() { local x=$(( LIMIT - ($(date +%s) - t0) - $1 )); [ "$x" -lt 20 ] && x=20; echo "$x"; }   # seconds left
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 &
build=$!
timeout 130 python3 bench/subspace_hvp.py --out "$OUT" --quick \
  --paths fused-triton,fused-triton-fp16x3-parts,fused-triton-fp16x3-parts64,fused-triton-fp16x3-parts64-chained,fused-triton-fp16x3-parts-cold,unfused-cublas-fp16x3,fused-triton-fp16x3-zacc,unfused-torch,vmap-autodiff \
  > "$LOGS/bench_subspace_hvp.log" 2>&1
el "subspace_hvp bench rc=$?"; grep -E "fused|unfused|vmap" "$LOGS/bench_subspace_hvp.log" | tail -12
mkdir -p "$OUT/rademacher"
timeout 80 python3 bench/subspace_hvp.py --out "$OUT/rademacher" --quick --sketch rademacher \
  --paths fused-triton,fused-triton-fp16x3-plo,fused-triton-fp16x3-parts,fused-triton-fp16x3-parts-plo,unfused-torch,vmap-autodiff,fused-triton-fp16x3-s3,fused-triton-fp16x3-parts-s3,unfused-cublas-fp16x3 \
  > "$LOGS/bench_rademacher.log" 2>&1
el "rademacher bench rc=$?"; grep -E "fused|unfused|vmap" "$LOGS/bench_rademacher.log" | tail -10
wait $build; el "build rc=$?"; tail -1 "$LOGS/build.log"
NEW="windows or long_sums or tensor_cores"   # the new code's GPU tests first (q/k windows; split precisions with
#                                            a Rademacher P; the CUDA backend's tensor-core passes)
timeout 110 python3 -m pytest -q -m gpu tests/test_linear_attn_gpu.py tests/test_subspace_hvp.py -k "$NEW" -n 4 \
  -p no:cacheprovider > "$LOGS/gpu_tests_new.log" 2>&1
el "new GPU tests rc=$?"; grep -E "FAILED|ERROR|passed|failed" "$LOGS/gpu_tests_new.log" | tail -12
timeout 150 python3 -m pytest -q -m gpu tests -k "not ($NEW)" -n 4 -p no:cacheprovider > "$LOGS/gpu_tests.log" 2>&1
el "other GPU tests rc=$?"; grep -E "FAILED|ERROR|passed|failed" "$LOGS/gpu_tests.log" | tail -12
mkdir -p "$OUT/windows"
timeout "$(left 5)" python3 bench/linear_attn_configs.py --variants windows,windows_pointers --dims 9,182 \
  --out "$OUT/windows" > "$LOGS/bench_windows.log" 2>&1
el "windows rc=$?"; grep -E "^\{|^\| |compiled" "$LOGS/bench_windows.log" | cut -c1-220 | tail -30
