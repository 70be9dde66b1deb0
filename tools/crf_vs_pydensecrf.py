"""Compare linear_eval.dense_crf with pydensecrf on the 160 PASCAL VOC 2012 val images of voc_mini (NOTES.md).

Unaries come from the ground truth: the label map (255 -> background) is reduced by 8 with a
majority vote per 8x8 cell, one-hot encoded at that resolution, upsampled bilinearly to full size
and softened to p = 0.5 * onehot_up + 0.5 / 21.  The "noisy" set additionally replaces the label of
20 % of the low-resolution cells by a class drawn uniformly from the 21 (seeded per image; a draw
may hit the right class, so ~19 % of the cells end up wrong).

pydensecrf is used here only, never by the project: pip install --target SITE pydensecrf2, then

    python tools/crf_vs_pydensecrf.py --site SITE [--root ../shared/data/voc_mini] [--limit N] [--out results.json]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from linear_eval import dense_crf  # noqa: E402

NC = 21


def pydensecrf_q(image_hwc, probs, iters=10):
    """The authors' release: unary_from_softmax (clip 1e-5), Gaussian sxy=1 compat=3,
    bilateral sxy=67 srgb=3 compat=4, 10 mean-field iterations."""
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(c, -1)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image_hwc), compat=4)
    return np.array(d.inference(iters), dtype=np.float32).reshape(c, h, w)


def unary_probs(label, noise, rng):
    """label (H, W) uint8 -> probs (C, H, W) float32, as described in the module docstring."""
    h, w = label.shape
    lab = torch.from_numpy(np.where(label == 255, 0, label).astype(np.int64))
    onehot = F.one_hot(lab, NC).permute(2, 0, 1).float()                   # (C, H, W)
    low = F.avg_pool2d(onehot[None], 8, ceil_mode=True)[0].argmax(0)       # (ceil H/8, ceil W/8)
    if noise:
        flip = torch.from_numpy(rng.random(tuple(low.shape)) < noise)
        low[flip] = torch.from_numpy(rng.integers(0, NC, int(flip.sum())))
    onehot_low = F.one_hot(low, NC).permute(2, 0, 1).float()[None]
    up = F.interpolate(onehot_low, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (0.5 * up + 0.5 / NC).numpy().astype(np.float32)


def miou(conf):
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean() * 100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", required=True, help="where pip installed pydensecrf2 (--target)")
    ap.add_argument("--root", default=os.path.join(HERE, "..", "..", "shared", "data", "voc_mini"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default="crf_vs_pydensecrf.json")
    args = ap.parse_args()
    sys.path.append(args.site)  # after the installed numpy, which the site may also hold
    global dcrf
    import pydensecrf.densecrf as dcrf
    torch.set_num_threads(1)
    ROOT = args.root
    ids = open(f"{ROOT}/ImageSets/Segmentation/val.txt").read().split()[: args.limit]

    summary = {}
    for name, noise in (("clean", 0.0), ("noisy20", 0.2)):
        conf = {k: np.zeros((NC, NC), np.int64) for k in ("unary", "pydensecrf", "ours")}
        agree_all = agree_valid = n_all = n_valid = 0
        t_ref = t_ours = 0.0
        max_dq = []
        for k, iid in enumerate(ids):
            image = np.array(Image.open(f"{ROOT}/JPEGImages/{iid}.jpg").convert("RGB"))
            label = np.array(Image.open(f"{ROOT}/SegmentationClass/{iid}.png"))
            probs = unary_probs(label, noise, np.random.default_rng(k))

            t0 = time.perf_counter()
            q_ref = pydensecrf_q(image, probs)
            t1 = time.perf_counter()
            q_ours = dense_crf(torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                               torch.from_numpy(probs)).numpy()
            t2 = time.perf_counter()
            t_ref += t1 - t0
            t_ours += t2 - t1

            valid = label != 255
            pred = {"unary": probs.argmax(0), "pydensecrf": q_ref.argmax(0), "ours": q_ours.argmax(0)}
            same = pred["pydensecrf"] == pred["ours"]
            agree_all += int(same.sum())
            agree_valid += int(same[valid].sum())
            n_all += same.size
            n_valid += int(valid.sum())
            max_dq.append(float(np.abs(q_ref - q_ours).max()))
            for key, p in pred.items():
                conf[key] += np.bincount(label[valid].astype(np.int64) * NC + p[valid],
                                         minlength=NC * NC).reshape(NC, NC)
            print(f"{name} {k + 1}/{len(ids)} {iid} {label.shape} agree {same.mean():.5f} "
                  f"max|dQ| {max_dq[-1]:.2e} ref {t1 - t0:.2f}s ours {t2 - t1:.2f}s", flush=True)

        s = {
            "images": len(ids),
            "agree_all_pct": 100 * agree_all / n_all,
            "agree_valid_pct": 100 * agree_valid / n_valid,
            "disagreeing_pixels": n_all - agree_all,
            "max_abs_dQ_max": max(max_dq),
            "max_abs_dQ_median": float(np.median(max_dq)),
            "miou_unary": miou(conf["unary"]),
            "miou_pydensecrf": miou(conf["pydensecrf"]),
            "miou_ours": miou(conf["ours"]),
            "sec_per_image_pydensecrf": t_ref / len(ids),
            "sec_per_image_ours": t_ours / len(ids),
        }
        s["gain_pydensecrf"] = s["miou_pydensecrf"] - s["miou_unary"]
        s["gain_ours"] = s["miou_ours"] - s["miou_unary"]
        summary[name] = s
        print(json.dumps({name: s}, indent=1), flush=True)

    json.dump(summary, open(args.out, "w"), indent=1)
    print("| set | agree all % | agree non-255 % | mIoU unary | mIoU pydensecrf | mIoU ours "
          "| gain ref / ours | s/img ref | s/img ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['agree_all_pct']:.4f} | {s['agree_valid_pct']:.4f} | "
              f"{s['miou_unary']:.2f} | {s['miou_pydensecrf']:.2f} | {s['miou_ours']:.2f} | "
              f"{s['gain_pydensecrf']:+.2f} / {s['gain_ours']:+.2f} | "
              f"{s['sec_per_image_pydensecrf']:.2f} | {s['sec_per_image_ours']:.2f} |")


if __name__ == "__main__":
    main()
