#!/usr/bin/env bash
# Table 2a of our own: MaskContrast pretrained on the mask proposals of each source — the salient mask (one object,
# the paper's), its connected components, a hierarchical segmentation without saliency — each scored with the linear
# classifier and K-Means (one prototype per image, and one per connected component: --objects components), against
# the same resnet18 with random weights. CPU-sized; the sizes can be set from the environment.
#   bash tools/table2a.sh                                   # synthetic images of 2-3 objects of different classes
#   DATA=../shared/data/voc_mini OUT=runs/table2a_voc bash tools/table2a.sh     # real images (voc_mini)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/table2a_synthetic}
SIZES="NET=64 EVAL=96 BATCH=16 EPOCHS=30 LR=0.2 LC_EPOCHS=5 JITTER_H=0.5 PRIOR=96"
for kv in $SIZES; do  # a size set in the environment wins
    k=${kv%%=*}
    [ -n "${!k:-}" ] || declare "$kv"
done
if [ -z "${DATA:-}" ]; then  # 160 train / 60 val images of 2-3 objects of different classes, in random hues
    DATA=$OUT/data
    [ -d "$DATA" ] || python3 tools/synthetic.py $DATA --train 160 --val 60 --size 96 --multi
fi
COMMON="--data-root $DATA --workers 2"
for P in saliency components hierarchical; do
    python3 mine_masks.py $COMMON --rounds 0 --prior-size $PRIOR --proposals $P --name $P --mask-root $OUT/masks \
        --out $OUT/mine_$P
    python3 pretrain.py $COMMON --train-split train --saliency $P --mask-root $OUT/masks --arch resnet18 \
        --size $NET --batch-size $BATCH --queue-size $((4 * BATCH)) --epochs $EPOCHS --lr $LR --key-momentum 0.99 \
        --color-jitter 0.4 0.4 0.4 $JITTER_H --out $OUT/pretrain_$P
done
for P in saliency components hierarchical random; do
    if [ $P = random ]; then CK="--checkpoint random --arch resnet18 --features backbone"
    else CK="--checkpoint $OUT/pretrain_$P/checkpoint.pth"; fi
    python3 linear_eval.py $COMMON --train-split train $CK --size $EVAL --epochs $LC_EPOCHS \
        --lr-step $((LC_EPOCHS - 1)) --out $OUT/linear_$P
    for O in image components; do  # random weights: the foreground of the salient masks
        python3 kmeans_eval.py $COMMON $CK --saliency saliency --mask-root $OUT/masks --size $EVAL --pca-dim 0 \
            --objects $O --out $OUT/kmeans_${P}_$O
    done
done
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
o = Path(sys.argv[1])
j = lambda p: json.loads((o / p).read_text())
print(f"\nTable 2a on {o} (mIoU %)      LC   K-Means/image  K-Means/components  objects an image (mined)")
for p in ("saliency", "components", "hierarchical", "random"):
    km = [next(iter(j(f"kmeans_{p}_{x}/kmeans_eval.json")["clusters"].values())) for x in ("image", "components")]
    mined = j(f"mine_{p}/summary.json")["objects_per_image"]["mean"] if p != "random" else float("nan")
    lc = j(f"linear_{p}/linear_eval.json")["miou"]
    print(f"{p:<28s}{lc:6.1f}  {km[0]['miou_mean']:9.1f} ± {km[0]['miou_std']:3.1f}"
          f"  {km[1]['miou_mean']:11.1f} ± {km[1]['miou_std']:3.1f}  {mined:10.2f}")
EOF
