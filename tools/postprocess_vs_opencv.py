"""mine_masks.postprocess (scipy.ndimage) against the release's recipe written with OpenCV, on random saliency maps
(NOTES.md). OpenCV is used here only, never by the project: pip install --target SITE opencv-python-headless, then

    python tools/postprocess_vs_opencv.py --site SITE [--maps 300]
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mine_masks  # noqa: E402


def release_postprocess(cv2, prob):
    """The release's snippet (saliency/README.md): threshold > 0.5, every contour of cv2.findContours(RETR_TREE)
    drawn filled and set to 0 where that filled area is under 1 % of the image; None when under 1 % remains."""
    mask = (prob > 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    out = mask.copy()
    for c in contours:
        filled = np.zeros_like(mask)
        cv2.drawContours(filled, [c], -1, 1, -1)
        if filled.sum() < 0.01 * mask.size:
            out[filled == 1] = 0
    return None if out.mean() < 0.01 else out.astype(bool)


def random_map(rng, h, w):
    """Smooth noise at a random scale, thresholded softly: blobs, rings, holes and specks of all sizes."""
    cells = int(rng.integers(2, 24))
    noise = torch.from_numpy(rng.normal(size=(1, 1, cells, cells)).astype(np.float32))
    smooth = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0, 0].numpy()
    return 1 / (1 + np.exp(-4 * (smooth - rng.normal(0.5, 0.5))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", required=True)
    ap.add_argument("--maps", type=int, default=300)
    args = ap.parse_args()
    sys.path.append(args.site)  # after the installed numpy, which the site may also hold
    import cv2
    rng = np.random.default_rng(0)
    same_keep = same_mask = kept = 0
    worst = 0.0
    for _ in range(args.maps):
        h, w = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        prob = (random_map(rng, h, w) * 255).round() / 255  # as mine_masks' uint8 maps
        ref = release_postprocess(cv2, prob)
        mask, _, reason = mine_masks.postprocess(prob)
        same_keep += (ref is None) == (reason is not None)
        if ref is not None and reason is None:
            kept += 1
            same_mask += bool(np.array_equal(ref, mask))
            worst = max(worst, float((ref != mask).mean()))
    print(f"{args.maps} maps: keep/drop decision equal on {same_keep}; of {kept} kept by both, {same_mask} masks equal "
          f"to the pixel; largest difference {100 * worst:.3f} % of the pixels")


if __name__ == "__main__":
    main()
