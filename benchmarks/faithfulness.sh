#!/usr/bin/env bash
# Issue 4: do explanations point at the cause? flipback's regions against Captum baselines.
# Usage: benchmarks/faithfulness.sh [OUT_DIR]   (default /tmp/faithfulness); needs ../shared for CIFAR-10.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/faithfulness}
FB=.venv/bin/flipback
CIFAR=../shared/data/cifar10-jpeg
R20=cifar_resnet20:../shared/models/cifar10_resnet20.th

# Planted cue on Fashion-MNIST (Debian's package): small_cnn trained from scratch, cued and uncued.
$FB bench faithfulness --limit 500 --out "$OUT/fmnist-planted"
# Planted cue on CIFAR-10: ResNet-20 fine-tuned from the public checkpoint, cued and uncued.
$FB bench faithfulness --data $CIFAR --model $R20 --limit 500 --out "$OUT/cifar-planted"
# The public ResNet-20's own 1,897 errors on the CIFAR-10 JPEG test set.
$FB bench faithfulness --real --data $CIFAR --model $R20 --limit 1897 --out "$OUT/cifar-real"
# Issue 14: graded cue kinds, on Fashion-MNIST (all) and CIFAR-10 (all but the background).
# 60 planted errors each: what fits 2 CPU cores; raise --limit where there is more.
for k in checker sticker or and blend background; do
  $FB bench faithfulness --kind $k --limit 60 --out "$OUT/fmnist-$k"
done
for k in checker sticker or and blend; do
  $FB bench faithfulness --kind $k --data $CIFAR --model $R20 --limit 60 --out "$OUT/cifar-$k"
done
# The checkerboard's other sizes (2, 3 and 6 px; 4 is `checker` above), on both.
for n in 2 3 6; do
  $FB bench faithfulness --kind checker --cue-size $n --limit 60 --out "$OUT/fmnist-checker$n"
  $FB bench faithfulness --kind checker --cue-size $n --data $CIFAR --model $R20 --limit 60 --out "$OUT/cifar-checker$n"
done
.venv/bin/python benchmarks/faithfulness_kinds_table.py "$OUT"/fmnist-{checker,sticker,or,and,blend,background} \
  "$OUT"/cifar-{checker,sticker,or,and,blend}
.venv/bin/python benchmarks/faithfulness_kinds_table.py "$OUT"/fmnist-checker{2,3,6} "$OUT"/cifar-checker{2,3,6}
.venv/bin/python benchmarks/faithfulness_table.py "$OUT"/fmnist-planted "$OUT"/cifar-planted "$OUT"/cifar-real
