# Sourced by the bench/gpu_*.sh device scripts: $OUT and a log folder, build variables, an elapsed-time echo, a
# logs.tgz packed into $OUT on exit, and the carried wheels (.whl/) installed to /tmp/site.
# Usage: LOGS=/tmp/<name>_logs; source bench/gpu_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -rf "$LOGS"; mkdir -p "$LOGS"
# TRITON_CACHE_AUTOTUNING: autotune results go to the disk cache, so the timed run reuses the prepare probes' tuning
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 TRITON_CACHE_AUTOTUNING=1
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
pack() { tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }
trap pack EXIT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
