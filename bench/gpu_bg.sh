#!/usr/bin/env bash
# A long run in the background of a warm GPU machine, across device calls (the machine stays warm ~30 s between
# calls; files outside the tree survive while it does):
#   bash bench/gpu_bg.sh start NAME RUN_DIR command args...   # setsid: /root/NAME.log, /root/NAME.pid
#   OUT=$OUT [WAIT_S=540] bash bench/gpu_bg.sh wait NAME RUN_DIR   # waits up to WAIT_S while it runs, then packs
# pack: $OUT/NAME.log (progress-bar lines dropped) and $OUT/NAME_results.tgz (RUN_DIR without checkpoints,
# weights or adapters). `wait` prints whether NAME is still running and the log's tail.
set -uo pipefail
cmd=${1:-}; name=${2:-}; run=${3:-}
[ -n "$cmd" ] && [ -n "$name" ] && [ -n "$run" ] || { echo "usage: $0 start|wait NAME RUN_DIR [command...]" >&2; exit 2; }
shift 3
OUT=${OUT:-/tmp/out}
running() { kill -0 "$(cat "/root/$name.pid" 2>/dev/null)" 2>/dev/null; }
case "$cmd" in
  start)
    setsid nohup "$@" > "/root/$name.log" 2>&1 < /dev/null &
    echo $! > "/root/$name.pid"
    echo "$name started (pid $(cat "/root/$name.pid"))" ;;
  wait)
    mkdir -p "$OUT"
    t0=$(date +%s)
    while running && [ $(( $(date +%s) - t0 )) -lt "${WAIT_S:-540}" ]; do sleep 5; done
    if running; then echo "$name still running"; else echo "$name finished"; fi
    tr '\r' '\n' < "/root/$name.log" 2>/dev/null | grep -v -E "it/s\]?$|s/it\]?$" > "$OUT/$name.log"
    [ -d "$run" ] && tar czf "$OUT/${name}_results.tgz" -C "$run" --exclude='adapters' --exclude='*.pt' \
      --exclude='*.tmp' --exclude='*.safetensors' .
    tail -20 "$OUT/$name.log" ;;
  *) echo "usage: $0 start|wait NAME RUN_DIR [command...]" >&2; exit 2 ;;
esac
