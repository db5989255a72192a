#!/usr/bin/env bash
# CUDA against CPU on 200 CIFAR-10 errors: the same records (within rounding), and images/s on both.
#
# Two steps, because the device machine sees only this repository (not ../shared) and has no network:
#   bash benchmarks/gpu_check.sh prepare   # here: writes .gpu-check/ (ignored by git): 200 errors as .npz + weights
#   bash benchmarks/gpu_check.sh run       # there, in one call: run(command="bash benchmarks/gpu_check.sh run",
#                                          #   carry=[".gpu-check"], timeout_s=540); results land in $OUT
# The device image has PyTorch and most of flipback's dependencies; flipback runs from src/ there.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu-check
case "${1:-}" in
prepare)
  mkdir -p $DIR
  grep -qx "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude
  cp ../shared/models/cifar10_resnet20.th $DIR/
  .venv/bin/python benchmarks/gpu_check.py prepare --data ../shared/data/cifar10-jpeg/test \
      --model cifar_resnet20:$DIR/cifar10_resnet20.th --n 200 --out $DIR/errors.npz
  du -sh $DIR
  ;;
run)
  OUT=${OUT:-/tmp/gpu-check-out}
  mkdir -p "$OUT"
  PY=${PY:-python3}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true
  PYTHONPATH=src FLIPBACK_CACHE=/tmp/flipback-cache $PY benchmarks/gpu_check.py run \
      --data $DIR/errors.npz --model cifar_resnet20:$DIR/cifar10_resnet20.th --out "$OUT" 2>&1 | tee "$OUT/log.txt"
  ;;
*)
  echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
