#!/usr/bin/env bash
# The GPU path on one fresh GPU machine in about 8 minutes (issue 14): install as the README
# says, then benchmarks/gpu_check.py (throughput through submit vs a bare loop, Caffe SGD vs
# foreach SGD, refusals, a GPU checkpoint evaluated on the CPU). Writes OUT/summary.{json,txt}.
#
#   benchmarks/gpu_check.sh [--out DIR] [--no-install] [--cpu]
#
# --no-install: use the python on PATH as it is (a machine without internet, or a second run).
# --cpu: check the script's logic without a GPU (tiny sizes; the figures mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=gpu-check
INSTALL=1
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --cpu) EXTRA+=(--cpu); shift ;;
    *) echo "usage: $0 [--out DIR] [--no-install] [--cpu]" >&2; exit 2 ;;
  esac
done
start=$(date +%s)
if [ "$INSTALL" = 1 ]; then
  # README "Quick start": the default torch wheel (CUDA on Linux x86_64), then the project
  python3 -m venv .venv-gpu-check
  . .venv-gpu-check/bin/activate
  pip install -q --upgrade pip
  pip install -q torch==2.13.0
  pip install -q -e . -c constraints.txt
  echo "[gpu_check.sh] installed in $(( $(date +%s) - start )) s"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
mkdir -p "$OUT"
set +e
python benchmarks/gpu_check.py --out "$OUT" "${EXTRA[@]}" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
set -e
echo "[gpu_check.sh] done in $(( $(date +%s) - start )) s, exit $rc; summary: $OUT/summary.txt"
exit "$rc"
