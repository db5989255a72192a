#!/usr/bin/env bash
# The black-box benchmarks of docs/benchmarks.md. Needs ../shared and the bench extra (kserve).
#   bash benchmarks/blackbox.sh [OUT_DIR]
# The target (ResNet-20) is used only through its answers: in process, then served over
# HTTP by KServe's model server on loopback. Surrogates start from random weights and learn
# from 10,000 target answers on CIFAR-10 train images.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-blackbox}
MODEL=cifar_resnet20:../shared/models/cifar10_resnet20.th
TEST=../shared/data/cifar10-jpeg/test
TRAIN=../shared/data/cifar10-jpeg/train
FB=${FB:-.venv/bin/flipback}
PY=${PY:-.venv/bin/python}
PORT=${PORT:-18080}
mkdir -p "$OUT"

for output in scores label; do
  # 1. surrogate from the target's answers (scores, or top-1 labels only)
  [ -f "$OUT/surrogate-$output.th" ] || time $FB --quiet surrogate --target $MODEL --data $TRAIN \
      --budget 10000 --output $output --out "$OUT/surrogate-$output.th"
  # 2. in process
  time $FB bench paper --mode black-box --model $MODEL --data $TEST --output $output \
      --surrogate "$OUT/surrogate-$output.th" --out "$OUT/inprocess-$output"
done

# 3. the same target over HTTP (Open Inference Protocol), same surrogates
$PY -m flipback.targets.blackbox.serve --model r20=$MODEL --num-classes 10 --http_port $PORT \
    --enable_grpc false --threads 1 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break; sleep 1; done
for output in scores label; do
  time $FB bench paper --mode black-box --model "http://127.0.0.1:$PORT/v2/models/r20" --data $TEST \
      --output $output --surrogate "$OUT/surrogate-$output.th" --out "$OUT/http-$output"
done

# 4. the same per-image results in process and over HTTP
for output in scores label; do
  for method in paper fast; do
    $PY benchmarks/same_results.py "$OUT/inprocess-$output/$method" "$OUT/http-$output/$method"
  done
done
