#!/usr/bin/env bash
# The whole MaskContrast pipeline on a small synthetic dataset, on CPU, with every flag in sight.
# Each stage is one script; on real data drop the small sizes and keep the defaults (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-demo_out}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# 0. data: 160 train / 60 val images of 4 shape+texture classes (colours random), VOC layout, oracle masks
python -c "import common; common.make_synthetic_voc('$OUT/data', n_train=160, n_val=60, size=96, seed=0)"

# 2. pretraining (Sec. 3.3, Algorithm 1): resnet18 from scratch, 64² views; the loss table is printed at the end
python pretrain.py --data-root $OUT/data --split train --saliency oracle --arch resnet18 --size 64 \
    --batch-size 16 --queue-size 64 --epochs 20 --lr 0.1 --momentum 0.99 --workers 2 --out $OUT/pretrain
