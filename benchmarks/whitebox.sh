#!/usr/bin/env bash
# The white-box benchmarks of docs/benchmarks.md. Needs ../shared and the bench extra.
#   bash benchmarks/whitebox.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-whitebox}
MODEL=cifar_resnet20:../shared/models/cifar10_resnet20.th
DATA=../shared/data/cifar10-jpeg/test
FB=.venv/bin/flipback
rm -rf "$OUT"
# 1. paper / fast / minimal on all misclassified images, side by side with the paper.
time $FB bench paper --mode white-box --model $MODEL --data $DATA --out "$OUT/bench"
# 2. the paper method's step size (the paper does not give it).
for s in 2/255 3/255; do
  time $FB --quiet explain --method paper --step $s --no-figures --model $MODEL --data $DATA --out "$OUT/paper-step-${s%/255}"
  python3 -c "import json,sys; s=json.load(open('$OUT/paper-step-${s%/255}/summary.json')); print('paper step $s', s['success_rate'], s['mean_queries'], s['median_l2'])"
done
# 3. minimal against Foolbox DDN (all errors) and FMN (first 300), speed measured in the same run.
time .venv/bin/python benchmarks/whitebox_minimal.py --model $MODEL --data $DATA --attacks ddn --out "$OUT/foolbox-ddn.json"
time .venv/bin/python benchmarks/whitebox_minimal.py --model $MODEL --data $DATA --attacks fmn,fmn-fixed --limit 300 --out "$OUT/foolbox-fmn.json"
# 4. the adv-lib anchors at AttackBench's settings (1,000 steps), with Foolbox DDN-100 and minimal, first 200 errors
.venv/bin/pip install -q --no-deps adv-lib==0.2.8
time .venv/bin/python benchmarks/whitebox_minimal.py --model $MODEL --data $DATA --limit 200 --attacks ddn \
  --advlib alma,apgd-min,fmn,ddn,ddn-q --out "$OUT/advlib-200.json"
# 5. ALMA and FMN on all 1,897 errors, in four runs of 475 (about 30 min each on two CPU cores),
#    joined by --merge; the best anchor (ddn-q) on all errors in one run.
for off in 0 475 950 1425; do
  time .venv/bin/python benchmarks/whitebox_minimal.py --model $MODEL --data $DATA --offset $off --limit 475 \
    --attacks '' --advlib alma,fmn --out "$OUT/anchors-$off.json"
done
.venv/bin/python benchmarks/whitebox_minimal.py --merge "$OUT"/anchors-{0,475,950,1425}.json --out "$OUT/anchors-all.json"
time .venv/bin/python benchmarks/whitebox_minimal.py --model $MODEL --data $DATA --attacks ddn --advlib ddn-q \
  --out "$OUT/ddnq-all.json"
# 6. APGD minimum-norm and float DDN-1000 on all 1,897 errors, in five runs of 380 (36 to 41 min each
#    on two quiet CPU cores), joined by --merge.
for off in 0 380 760 1140 1520; do
  time .venv/bin/python benchmarks/whitebox_minimal.py --model $MODEL --data $DATA --offset $off --limit 380 \
    --attacks '' --advlib apgd-min,ddn --out "$OUT/apgd-ddn-$off.json"
done
.venv/bin/python benchmarks/whitebox_minimal.py --merge "$OUT"/apgd-ddn-{0,380,760,1140,1520}.json --out "$OUT/apgd-ddn-all.json"
