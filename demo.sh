#!/usr/bin/env bash
# The whole MaskContrast pipeline on a small synthetic dataset, on CPU, every flag in sight: the five stages with
# their defaults except for sizes (and, for the demo's random hues, the colour jitter), each against the same
# resnet18 with random weights. About 7 minutes on 2 cores. On real data keep the defaults instead (README.md).
# Every size below can be set from the environment (the tests run the demo at toy sizes).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-demo_out}
START=$SECONDS
SIZES="N_TRAIN=160 N_VAL=60 IMG=96 NET=64 BATCH=16 PT_EPOCHS=30 LC_EPOCHS=5 FT_ITERS=30 FT_SPLITS=2"
for kv in $SIZES; do  # a size set in the environment wins
    k=${kv%%=*}
    [ -n "${!k:-}" ] || declare "$kv"
done

# 0. data: 160 train / 60 val images of 4 shape+texture classes in random hues, VOC layout; the oracle masks in
#    saliency_oracle only score the mined masks
python3 tools/synthetic.py $OUT/data --train $N_TRAIN --val $N_VAL --size $IMG

# 1. mask proposals without labels (Sec. 3.2): MB+ and robust-background priors, fused, post-processed as released,
#    written to data/saliency_unsup/ (what pretrain.py reads); scored against the oracle masks. --rounds N would add
#    saliency networks trained on them, which need a GPU to beat the priors (README)
python3 mine_masks.py --data-root $OUT/data --rounds 0 --prior-size $IMG --eval-masks $OUT/data/saliency_oracle \
    --out $OUT/mine_masks

# 2. pretraining (Sec. 3.3, Algorithm 1): resnet18 from scratch, 64² views, the hue jittered fully (an object's hue is
#    random, so it must not tell objects apart)
python3 pretrain.py --data-root $OUT/data --arch resnet18 --size $NET --batch-size $BATCH --queue-size $((4 * BATCH)) \
    --epochs $PT_EPOCHS \
    --lr 0.2 --key-momentum 0.99 --color-jitter 0.4 0.4 0.4 0.5 --workers 0 --out $OUT/pretrain

# 3a. linear classifier on the frozen 256-d decoder (Sec. 4.1-I); then the same resnet18 with random weights, read
#     at its backbone (a random decoder is refused: only what a network trained is scored)
python3 linear_eval.py --data-root $OUT/data --checkpoint $OUT/pretrain/checkpoint.pth --size $NET \
    --epochs $LC_EPOCHS --lr-step $((LC_EPOCHS - 1)) --batch-size $BATCH --workers 0 --out $OUT/linear_pretrain
python3 linear_eval.py --data-root $OUT/data --checkpoint random --arch resnet18 --features backbone --size $NET \
    --epochs $LC_EPOCHS --lr-step $((LC_EPOCHS - 1)) --batch-size $BATCH --workers 0 --out $OUT/linear_random

# 3b. K-Means of object prototypes (Sec. 4.1-II), overclustering and retrieval. MaskContrast takes its foreground from
#     its own saliency head; the random network has none, so its backbone's prototypes are taken over the mined
#     masks. No PCA whitening: on 60 prototypes, whitening to 32 dims weighs noise directions as much as the signal
#     (NOTES.md)
python3 kmeans_eval.py --data-root $OUT/data --checkpoint $OUT/pretrain/checkpoint.pth --size $NET --pca-dim 0 \
    --clusters 5 10 --workers 0 --out $OUT/kmeans_pretrain
python3 kmeans_eval.py --data-root $OUT/data --checkpoint random --arch resnet18 --features backbone --size $NET \
    --pca-dim 0 --clusters 5 10 --workers 0 --out $OUT/kmeans_random

# 3c. semi-supervised fine-tuning (Sec. 4.6, Table 6): 2 % of the labels (3 images) × 2 subsets, MaskContrast init
#     (the low-data recipe: lr 0.001, classifier 0.1, BatchNorm frozen) against random init (lr 0.004)
python3 finetune.py --data-root $OUT/data --checkpoint $OUT/pretrain/checkpoint.pth random --names maskcontrast random \
    --arch resnet18 --size $NET --fraction 0.02 --splits $FT_SPLITS --iters $FT_ITERS --workers 0 --out $OUT/finetune

# the demo's table, from the JSON files the stages wrote
python3 - "$OUT" $((SECONDS - START)) <<'PY'
import json, sys
from pathlib import Path
o = Path(sys.argv[1])
j = lambda p: json.loads((o / p).read_text())
le, le0 = j("linear_pretrain/linear_eval.json"), j("linear_random/linear_eval.json")
km, km0 = j("kmeans_pretrain/kmeans_eval.json"), j("kmeans_random/kmeans_eval.json")
ft = j("finetune/results.json")["table"]
print("\nprotocol (mIoU %, synthetic val)   MaskContrast  random init")
print(f"linear classifier                  {le['miou']:12.1f}  {le0['miou']:11.1f}")
for k in km["clusters"]:
    a, b = (x["clusters"][k].get("miou_mean", float("nan")) for x in (km, km0))  # nan: skipped (too few images)
    print(f"K-Means, {k:>3s} clusters              {a:12.1f}  {b:11.1f}")
r, r0 = (next(v for k, v in x["retrieval"].items() if k != "split") for x in (km, km0))
print(f"nearest-neighbour retrieval        {r['miou']:12.1f}  {r0['miou']:11.1f}")
for frac in ft["maskcontrast"]:
    label = f"fine-tuning, {float(frac):.0%} of the labels"
    print(f"{label:<35s}{ft['maskcontrast'][frac]['mean']:12.1f}  {ft['random'][frac]['mean']:11.1f}")
print(f"(demo.sh took {int(sys.argv[2]) // 60} min {int(sys.argv[2]) % 60} s)")
PY
