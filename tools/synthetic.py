r"""A small seeded synthetic dataset in the PASCAL VOC layout, for the demo, the tests and the GPU check: four
classes that differ by shape and texture — never by colour: each object is a light and a dark shade of one random hue
— on muted, noisy backgrounds; one or two objects of one class an image, or with --multi two or three objects of
different classes. Labels in SegmentationClass/, the oracle object masks in saliency_oracle/ (only ever used to
score mined masks, or by tests), class names in classes.txt.
  python tools/synthetic.py OUT --train 160 --val 60 --size 96 [--multi]
"""
import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

CLASSES = ("background", "disc", "square", "triangle", "cross")


def _texture(kind, h, w, rng):
    """A two-colour pattern in [0,1]: stripes, checkerboard, dots or rings, at a random phase and period."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(5, 9)
    if kind == 1:  # stripes at a random angle
        a = rng.uniform(0, np.pi)
        t = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0
    elif kind == 2:  # checkerboard
        t = ((xx // (period / 2)).astype(int) + (yy // (period / 2)).astype(int)) % 2 == 0
    elif kind == 3:  # dots on a grid
        t = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 3.2) ** 2
    else:  # concentric rings
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = np.sin(np.hypot(yy - cy, xx - cx) * 2 * np.pi / period) > 0
    return t.astype(np.float32)


def _shape(kind, h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if kind == 1:
        return dy ** 2 + dx ** 2 < r ** 2
    if kind == 2:
        return (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
    if kind == 3:  # upward triangle
        return (dy < r * 0.7) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.65)
    return ((np.abs(dy) < r * 0.35) & (np.abs(dx) < r)) | ((np.abs(dx) < r * 0.35) & (np.abs(dy) < r))


def _synthetic_image(size, rng, multi=False):
    """One image: a noisy low-frequency background and one or two objects of one class (shape + texture), or with
    `multi` two or three objects of different classes, apart. Returns (image, class label, object ids)."""
    h = w = size
    # background: a smooth, muted random colour field plus fine noise (so that "not flat" does not mean "object"),
    # less saturated than the objects, as the backdrop of a photo usually is
    coarse = rng.uniform(0, 1, (3, 4, 4)).astype(np.float32)
    coarse = 0.35 * coarse + 0.65 * coarse.mean(0, keepdims=True)
    bg = F.interpolate(torch.from_numpy(coarse)[None], size=(h, w), mode="bicubic",
                       align_corners=False)[0].numpy().transpose(1, 2, 0)
    bg = np.clip(bg + rng.normal(0, 0.05, (h, w, 3)), 0, 1)
    cls = int(rng.integers(1, len(CLASSES)))
    label, objects = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    img = bg
    classes = rng.permutation(np.arange(1, len(CLASSES)))[:int(rng.integers(2, 4))] if multi else None
    for k in range(len(classes) if multi else 1 if rng.uniform() < 0.7 else 2):
        if multi:  # the next object where it overlaps the others least (of 10 tries)
            cls, r = int(classes[k]), rng.uniform(0.13, 0.2) * size
            tries = [(rng.uniform(r, h - r), rng.uniform(r, w - r)) for _ in range(10)]
            cy, cx = min(tries, key=lambda c: (_shape(cls, h, w, *c, r * 1.15) & (objects > 0)).sum())
        else:
            r = rng.uniform(0.22, 0.34) * size if k == 0 else rng.uniform(0.14, 0.2) * size
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        m = _shape(cls, h, w, cy, cx, r)
        # a light and a dark shade of one random hue: colour says nothing about the class, and demo.sh's full hue
        # jitter (--color-jitter 0.4 0.4 0.4 0.5) covers every hue, so pretraining can learn to ignore it
        hue = rng.uniform()
        c1 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 0.9), rng.uniform(0.85, 1.0)))
        c2 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 0.9), rng.uniform(0.25, 0.4)))
        t = _texture(cls, h, w, rng)[..., None]
        obj = t * c1 + (1 - t) * c2
        img = np.where(m[..., None], obj, img)
        label[m] = cls
        objects[m] = k + 1
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    return (img * 255).astype(np.uint8), label, objects


def make_synthetic_voc(root, n_train=160, n_val=60, size=96, seed=0, multi=False):
    """Write a small seeded VOC-layout dataset: one or two objects of one class per image on a textured background
    (with `multi`: two or three objects of different classes); labels in SegmentationClass, the oracle object masks
    in saliency_oracle (0/255; with `multi`, object ids), only ever used to score mined masks, or by tests. Returns
    the root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "saliency_oracle", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    splits = {"train": [f"train_{i:04d}" for i in range(n_train)], "val": [f"val_{i:04d}" for i in range(n_val)]}
    for ids in splits.values():
        for i in ids:
            img, label, objects = _synthetic_image(size, rng, multi)
            Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=92)
            common.save_label_png(label, root / "SegmentationClass" / f"{i}.png")
            if multi:
                common.save_objects_png(objects, root / "saliency_oracle" / f"{i}.png")
            else:
                common.save_mask_png(label > 0, root / "saliency_oracle" / f"{i}.png")
    for name, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("out")
    p.add_argument("--train", type=common.nonnegative_int, default=160)
    p.add_argument("--val", type=common.nonnegative_int, default=60)
    p.add_argument("--size", type=common.positive_int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multi", action="store_true", help="two or three objects of different classes an image")
    a = p.parse_args()
    make_synthetic_voc(a.out, a.train, a.val, a.size, a.seed, a.multi)
