"""Write tests/golden/crf_pydensecrf.json: pydensecrf's marginals Q for two tiny, seeded, structured inputs, which
tests/test_crf.py compares linear_eval.dense_crf against without needing pydensecrf.

Needs pydensecrf (pip install --target SITE pydensecrf2):  PYDENSECRF_SITE=SITE python tools/crf_golden.py
"""
import base64
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.environ.get("PYDENSECRF_SITE", ""))
import pydensecrf.densecrf as dcrf  # noqa: E402

CASES = [  # name, H, W, classes, seed, CRF parameters (defaults of the authors' release first)
    ("release_params", 20, 24, 3, 0,
     dict(iters=10, gauss_sxy=1.0, gauss_compat=3.0, bilat_sxy=67.0, bilat_srgb=3.0, bilat_compat=4.0)),
    ("other_params", 16, 18, 4, 1,
     dict(iters=5, gauss_sxy=2.0, gauss_compat=2.0, bilat_sxy=10.0, bilat_srgb=20.0, bilat_compat=6.0)),
]


def make_inputs(h, w, c, seed):
    """Image: c colour regions (vertical bands plus a diagonal stripe) with +-12 grey-level noise.
    Labels: the region index with 15 % of the pixels flipped to a random class.
    probs = 0.5 * onehot(labels) + 0.5 / c (float32)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    region = (xx * c // w + ((xx + yy) % 9 < 2)) % c
    palette = rng.integers(30, 226, (c, 3))
    image = np.clip(palette[region] + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    labels = np.where(rng.random((h, w)) < 0.15, rng.integers(0, c, (h, w)), region)
    probs = (0.5 * np.eye(c, dtype=np.float32)[labels].transpose(2, 0, 1) + 0.5 / c).astype(np.float32)
    return image, labels, probs


def main():
    cases = []
    for name, h, w, c, seed, p in CASES:
        image, labels, probs = make_inputs(h, w, c, seed)
        d = dcrf.DenseCRF2D(w, h, c)
        d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(c, -1)))
        d.addPairwiseGaussian(sxy=p["gauss_sxy"], compat=p["gauss_compat"])
        d.addPairwiseBilateral(sxy=p["bilat_sxy"], srgb=p["bilat_srgb"], rgbim=image,
                               compat=p["bilat_compat"])
        q = np.array(d.inference(p["iters"]), dtype=np.float32).reshape(c, h, w)
        cases.append({
            "name": name, "height": h, "width": w, "classes": c, "params": p,
            "image_hwc_uint8_b64": base64.b64encode(image.tobytes()).decode(),
            "labels": "".join(map(str, labels.reshape(-1))),
            "q_uint16_b64": base64.b64encode(np.round(q * 65535).astype("<u2").tobytes()).decode(),
        })
    about = (
        "Made by tools/crf_golden.py with pydensecrf2 1.1 (PyPI), numpy " + np.__version__ + ". "
        "Per case: image = HxWx3 uint8 RGB, row-major, base64; labels = one digit per pixel, "
        "row-major; probs = 0.5*onehot(labels) + 0.5/classes in float32. pydensecrf call: "
        "DenseCRF2D(W, H, C); setUnaryEnergy(-log(clip(probs, 1e-5, 1)) as C x H*W float32); "
        "addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat); addPairwiseBilateral(sxy=bilat_sxy, "
        "srgb=bilat_srgb, rgbim=image, compat=bilat_compat); Q = inference(iters) (Potts, DIAG_KERNEL, "
        "NORMALIZE_SYMMETRIC). q = round(Q * 65535) as little-endian uint16, C x H x W, base64.")
    with open(os.path.join(HERE, "..", "tests", "golden", "crf_pydensecrf.json"), "w") as f:
        json.dump({"about": about, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
