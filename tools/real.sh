#!/usr/bin/env bash
# The five stages on real images (README "Numbers"): masks mined without labels on PASCAL VOC images (voc_mini) and
# DUTS-TR images (their masks unused), MaskContrast pretraining on them, then the linear classifier, K-Means (5 seeds,
# overclustering, retrieval) and fine-tuning on voc_mini (382 train / 160 val), each against the same architecture
# with random weights (and, on a GPU, the saliency network's own features: Table 1's first row). On one H200,
# mining 2,042 images, 12 pretraining epochs and one linear classifier fit in 262 s (README).
#   bash tools/real.sh                  # sized for one H100/H200 (not yet run to its end)
#   CPU=1 bash tools/real.sh            # sized for a 2-core CPU: resnet18, fewer images, small inputs (about 20 min)
#   PT_EPOCHS=40 FT_ITERS=0 bash tools/real.sh    # any size below can be set from the environment (FT_ITERS=0: no
#                                                 # fine-tuning)
# A finished run is not overwritten: pass another OUT=... to run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/real}
if [ "${CPU:-0}" = 1 ]; then
    SIZES="ARCH=resnet18 DUTS=600 ROUNDS=0 MINE_EPOCHS=1 PT_SIZE=96 PT_BATCH=16 PT_EPOCHS=6 PT_LR=0.1 PT_M=0.99
           EVAL_SIZE=128 LC_EPOCHS=3 LC_STEP=2 FT_ITERS=60 FT_SIZE=128 WORKERS=2"
else
    SIZES="ARCH=resnet50 DUTS=3000 ROUNDS=1 MINE_EPOCHS=5 PT_SIZE=224 PT_BATCH=64 PT_EPOCHS=25 PT_LR=0.004 PT_M=0.999
           EVAL_SIZE=320 LC_EPOCHS=20 LC_STEP=14 FT_ITERS=400 FT_SIZE=320 WORKERS=12"
fi
for kv in $SIZES; do  # a size set in the environment wins
    k=${kv%%=*}
    [ -n "${!k:-}" ] || declare "$kv"
done
echo "real.sh: arch $ARCH, $DUTS DUTS-TR images + voc_mini, mining rounds $ROUNDS, pretraining $PT_EPOCHS epochs" \
     "at ${PT_SIZE}², evaluation at ${EVAL_SIZE}², LC $LC_EPOCHS epochs, fine-tuning $FT_ITERS iterations"

# the unlabeled pool: voc_mini's images (train and val, labels unused) and the first $DUTS DUTS-TR images
mkdir -p $OUT/duts
DUTS_ALL=("$DATA"/duts_tr/images/*.jpg)
for f in "${DUTS_ALL[@]:0:$DUTS}"; do ln -sf "$(realpath "$f")" $OUT/duts/; done

# 1. masks without labels, written under $OUT/masks/saliency_unsup/ (the data folders are read-only)
python3 mine_masks.py --data-root $DATA/voc_mini $OUT/duts --name unsup --mask-root $OUT/masks --arch $ARCH \
    --size $PT_SIZE --rounds $ROUNDS --epochs $MINE_EPOCHS --workers $WORKERS --out $OUT/mine

# 2. MaskContrast pretraining on voc_mini/train + DUTS-TR images with their mined masks
python3 pretrain.py --data-root $DATA/voc_mini $OUT/duts --train-split train --mask-root $OUT/masks \
    --arch $ARCH --size $PT_SIZE --batch-size $PT_BATCH --queue-size $((2 * PT_BATCH)) \
    --epochs $PT_EPOCHS --lr $PT_LR --key-momentum $PT_M --workers $WORKERS --out $OUT/pretrain

# 3a/3b. linear classifier and K-Means for MaskContrast and for random weights (mined masks as its foreground)
for M in maskcontrast random; do
    if [ $M = maskcontrast ]; then CK="--checkpoint $OUT/pretrain/checkpoint.pth"
    else CK="--checkpoint random --arch $ARCH --features backbone"; fi  # only what a network trained is scored
    python3 linear_eval.py --data-root $DATA/voc_mini --train-split train $CK --size $EVAL_SIZE \
        --epochs $LC_EPOCHS --lr-step $LC_STEP --workers $WORKERS --out $OUT/linear_$M
    # the random network has no saliency head: its foreground comes from the mined masks (--mask-root)
    python3 kmeans_eval.py --data-root $DATA/voc_mini $CK --mask-root $OUT/masks --size $EVAL_SIZE \
        --clusters 21 50 100 --workers $WORKERS --out $OUT/kmeans_$M
done
if [ "$ROUNDS" -gt 0 ]; then  # Table 1's first row: the saliency network's own features
    SAL=$OUT/mine/round$ROUNDS.pth
    python3 linear_eval.py --data-root $DATA/voc_mini --train-split train --checkpoint $SAL --size $EVAL_SIZE \
        --epochs $LC_EPOCHS --lr-step $LC_STEP --workers $WORKERS --out $OUT/linear_saliency
fi

# 3c. fine-tuning with ~5 % (19 images) and 100 % of voc_mini's train labels
if [ "$FT_ITERS" -gt 0 ]; then
    python3 finetune.py --data-root $DATA/voc_mini --arch $ARCH --size $FT_SIZE --fraction 0.05 1.0 --splits 1 \
        --iters $FT_ITERS --batch-size 8 --workers $WORKERS --checkpoint $OUT/pretrain/checkpoint.pth random \
        --names maskcontrast random --out $OUT/finetune
fi

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
o = Path(sys.argv[1])
j = lambda p: json.loads((o / p).read_text()) if (o / p).exists() else None
print("\nprotocol (mIoU %, voc_mini val)    MaskContrast  random init")
le, le0 = j("linear_maskcontrast/linear_eval.json"), j("linear_random/linear_eval.json")
print(f"linear classifier                  {le['miou']:12.1f}  {le0['miou']:11.1f}")
km, km0 = j("kmeans_maskcontrast/kmeans_eval.json"), j("kmeans_random/kmeans_eval.json")
nan = {"miou_mean": float("nan"), "miou_std": float("nan")}  # a setting skipped: too few images
for k in km["clusters"]:
    a, b = ({**nan, **x["clusters"][k]} for x in (km, km0))
    print(f"K-Means, {k:>3s} clusters (5 seeds)    {a['miou_mean']:7.1f} ± {a['miou_std']:3.1f} "
          f"{b['miou_mean']:6.1f} ± {b['miou_std']:3.1f}")
for k in km["retrieval"]:
    if k != "split":
        print(f"retrieval, {k:<24s}{km['retrieval'][k]['miou']:12.1f}  {km0['retrieval'][k]['miou']:11.1f}")
ft = (j("finetune/results.json") or {"table": {"maskcontrast": {}}})["table"]
for frac in ft["maskcontrast"]:
    label = f"fine-tuning, {float(frac):.0%} of the labels"
    print(f"{label:<35s}{ft['maskcontrast'][frac]['mean']:12.1f}  {ft['random'][frac]['mean']:11.1f}")
sal = j("linear_saliency/linear_eval.json")
if sal:
    print(f"saliency network's features, LC    {sal['miou']:12.1f}")
EOF
