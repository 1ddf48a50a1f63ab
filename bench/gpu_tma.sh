#!/usr/bin/env bash
# One device call for the TMA-descriptor kernels of the tenth session (written without a GPU; see
# bench/results/h200_summary.md, top section), most important first, each step capped so the call ends inside
# CALL_LIMIT (default 570 s):
#   build (sm_90) | their GPU tests against fp64 (subspace HVP split precisions, linear attention through TMA)
#   ->  bench/subspace_hvp.py: fp16x3 / bf16x3 on glm_tma_kernel against glm_gram_kernel, tf32x3, cuBLAS fp32 and
#       vmap in one process, then the TMA_SWEEP configs
#   ->  bench/linear_attn_configs.py: the variants pointers, pointers_w8, bwd_pointers and w8 against the defaults
#       (TMA descriptors since the run of bench/results/linear_attn_h100_tma.md; D = 64, 96, 128)
# Usage (repository root on the GPU machine): OUT=dir [CALL_LIMIT=570] bash bench/gpu_tma.sh
# Returns under $OUT: subspace_hvp_h*.{json,md}, linear_attn_configs JSON / markdown (bench/linear_attn_configs.py's
# names), logs.tgz.
set -uo pipefail
LOGS=/tmp/gpu_tma_logs
source "$(dirname "$0")/gpu_common.sh"
LIMIT=${CALL_LIMIT:-570}
left() { local x=$(( LIMIT - ($(date +%s) - t0) - $1 )); [ "$x" -lt 20 ] && x=20; echo "$x"; }   # seconds left
timeout 200 python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1; el "build rc=$?"; tail -1 "$LOGS/build.log"
timeout 150 python3 -m pytest -q -m gpu tests/test_subspace_hvp.py tests/test_linear_attn_gpu.py \
  -k "split_precisions or tma or pointer" -n 4 -p no:cacheprovider > "$LOGS/gpu_tests.log" 2>&1
el "GPU tests rc=$?"; grep -E "passed|failed|Error" "$LOGS/gpu_tests.log" | tail -8
timeout "$(( $(left 0) / 2 ))" python3 bench/subspace_hvp.py --out "$OUT" --quick --sweep --sweep-precision fp16x3 \
  --paths fused-triton,fused-triton-fp16x3-zacc,fused-triton-fp16x3-chained,fused-triton-bf16x3,fused-triton-bf16x3-chained,fused-triton-bf16x3-gram,fused-triton-tf32x3,unfused-torch,vmap-autodiff \
  > "$LOGS/bench_subspace_hvp.log" 2>&1
el "subspace_hvp bench rc=$?"; grep -E "fused|unfused|vmap|sweep" "$LOGS/bench_subspace_hvp.log" | tail -20
timeout "$(left 10)" python3 bench/linear_attn_configs.py --out "$OUT" --variants pointers,pointers_w8,bwd_pointers,w8 \
  --dims 64,96,128 > "$LOGS/bench_configs.log" 2>&1
el "linear_attn configs rc=$?"; tail -30 "$LOGS/bench_configs.log"
