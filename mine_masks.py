r"""Mine one salient-object mask per image, from raw images with no labels and no downloads (MaskContrast, Van Gansbeke
et al. ICCV 2021, Sec. 3.2 "mask proposals": the masks that pretrain.py contrasts).

The paper takes its masks from an off-the-shelf saliency estimator: unsupervised (DeepUSPS, Nguyen et al. NeurIPS
2019: hand-crafted priors → a network trained on them → bootstrapping) or supervised (BAS-Net trained on DUTS). The
release ships only the resulting PNGs. This script makes them, in one of three modes that share post-processing and
output:

1. unsupervised (default)
   a. two classical saliency priors, batched in torch (GPU when there is one), fused by their mean:
      - "mbd": Minimum Barrier salient object detection, Zhang et al. ICCV 2015 ("MB+"): the minimum-barrier distance
        of each pixel to the image border in each Lab channel (their FastMBD raster scan, run here as whole-line
        sweeps on uint8 images), plus their image-boundary contrast map (Mahalanobis distance to each border strip,
        minus the largest of the four), smoothing by morphological reconstruction, a centre bias and a sigmoid
        around the Otsu threshold;
      - "rbd": Saliency Optimization from Robust Background Detection, Zhu et al. CVPR 2014: SLIC superpixels
        (Achanta et al. TPAMI 2012, on a fixed lattice), boundary connectivity from geodesic distances on the
        superpixel graph (scipy's Dijkstra) → background probability, background-weighted contrast → foreground
        weight, and their least-squares saliency optimisation (one linear solve per image);
   b. a saliency network, common.SegModel's 1-channel head on any --arch, trained with BCE on the confident pixels of
      the fused prior only (> --fg-thresh as object, < --bg-thresh as background, the band between ignored);
   c. --rounds R: R networks, each fresh; the first learns from the priors, each next from its predecessor's
      predictions with flip test-time augmentation (DeepUSPS's and the paper's bootstrapping), averaged with the
      priors (--prior-weight 0.5; 0 = the predictions alone) so that an over-inclusive network cannot snowball.
2. supervised (--train-images DIR --train-masks DIR, e.g. DUTS-TR): the same network trained on labeled masks.
3. import (--import-maps DIR): saliency maps from any other tool (grey PNGs of any size) are only post-processed.

Post-processing (what the released masks went through): threshold 0.5, delete connected components (8-connected)
under 1 % of the image, drop the image when under 1 % foreground remains. Output: 0/255 PNGs at each image's original
size in OUT_ROOT/saliency_<name>/<id>.png (OUT_ROOT defaults to each data root: the folder pretrain.py reads via
common.saliency_dir), with dropped.txt (one dropped id a line) and summary.json beside them. --eval-masks DIR scores
every stage (MAE, max F-beta with beta² = 0.3, IoU at 0.5, at original size) and draws a grid
image | prior | prediction | mask | ground truth in --out.

Commands
  # CPU demo on the synthetic data (demo.sh), priors only, masks written to demo_out/data/saliency_mined/
  python mine_masks.py --data-root demo_out/data --name mined --rounds 0 --prior-size 96 \
      --eval-masks demo_out/data/saliency_oracle --out demo_out/mine_masks
  # 2-core CPU, ECSSD, priors + one network round (the measured run in README.md, about 10 minutes)
  OMP_NUM_THREADS=1 python mine_masks.py --data-root ../shared/data/ecssd/images --out-root runs/ecssd \
      --name unsup --eval-masks ../shared/data/ecssd/masks --arch resnet18 --size 96 --epochs 2 --batch-size 8 \
      --rounds 1 --workers 1 --out runs/mine_ecssd_cpu
  # one GPU, ECSSD, unsupervised, scored against its masks (masks written under runs/ecssd/saliency_unsup/)
  python mine_masks.py --data-root ../shared/data/ecssd/images --out-root runs/ecssd --name unsup \
      --eval-masks ../shared/data/ecssd/masks --arch resnet50 --backbone-init imagenet --out runs/mine_ecssd
  # supervised saliency model (the paper's stronger variant) trained on DUTS-TR, predicting PASCAL VOC
  python mine_masks.py --data-root VOCdevkit/VOC2012 --split trainaug --name sup \
      --train-images DUTS-TR/images --train-masks DUTS-TR/masks --out runs/mine_voc_sup
  # maps from another tool
  python mine_masks.py --data-root VOCdevkit/VOC2012 --name basnet --import-maps basnet_maps/
There is no torchrun mode: one process, one device (priors and prediction are batched instead).

Numbers the papers report (max F-beta on ECSSD): RBD 0.68 (the classical level), DeepUSPS ≈ 0.87 (pretrained
backbone), BAS-Net 0.938 (supervised). What this script reaches here, with the hardware it took: README.md, "Numbers".
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

import common


# ----------------------------------------------------------------------------------------------------------------------
# Prior 1: minimum-barrier distance (Zhang et al. ICCV 2015, MB+)

def rgb_to_lab(x):
    """(B, 3, H, W) RGB in [0, 1] → CIE Lab (D65 white): L in [0, 100], a and b roughly in [-110, 110]."""
    x = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], device=x.device, dtype=x.dtype)
    white = torch.tensor([0.950456, 1.0, 1.088754], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", m, x) / white
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-8) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def minmax(x):
    """Each map of a batch stretched to [0, 1]."""
    lo = x.flatten(1).min(1)[0].view(-1, *[1] * (x.dim() - 1))
    hi = x.flatten(1).max(1)[0].view(-1, *[1] * (x.dim() - 1))
    return (x - lo) / (hi - lo).clamp(min=1e-8)


def _barrier_sweeps(D, U, L, I):
    """One forward and one backward sweep over the rows of (N, H, W) maps, in place: a pixel takes the path through
    its (already swept) neighbour row when that path's barrier max(U, I) − min(L, I) is lower. A whole row is one
    vector step, which is what makes the raster scan fast in torch."""
    n = D.shape[1]
    for rows, step in ((range(1, n), -1), (range(n - 2, -1, -1), 1)):
        for i in rows:
            u = torch.maximum(U[:, i + step], I[:, i])
            lo = torch.minimum(L[:, i + step], I[:, i])
            c = u - lo
            better = c < D[:, i]
            D[:, i] = torch.where(better, c, D[:, i])
            U[:, i] = torch.where(better, u, U[:, i])
            L[:, i] = torch.where(better, lo, L[:, i])


def mbd_distance(img, iters=2):
    """Minimum-barrier distance of each pixel to the image border for (N, H, W) uint8 maps (FastMBD: sweeps down,
    up, right and left, `iters` times; uint8 keeps it exact and 4× lighter than float)."""
    D = torch.full_like(img, 255)
    D[:, 0] = D[:, -1] = D[:, :, 0] = D[:, :, -1] = 0
    U, L = img.clone(), img.clone()
    img_t = img.transpose(1, 2).contiguous()
    for _ in range(iters):
        _barrier_sweeps(D, U, L, img)
        dul = torch.stack([D, U, L]).transpose(2, 3).contiguous()  # columns become rows
        _barrier_sweeps(dul[0], dul[1], dul[2], img_t)
        D, U, L = dul.transpose(2, 3).contiguous()
    return D


def border_contrast(lab, frac=0.1):
    """MB+'s backgroundness cue: Mahalanobis colour distance to each of the four border strips, each scaled to a max
    of 1; the sum minus the largest ignores the one strip an object may touch."""
    B, _, H, W = lab.shape
    r = max(1, round(frac * min(H, W)))
    x = lab.flatten(2)
    dists = []
    for strip in (lab[..., :r, :], lab[..., -r:, :], lab[..., :, :r], lab[..., :, -r:]):
        v = strip.flatten(2)
        mu = v.mean(2, keepdim=True)
        cov = (v - mu) @ (v - mu).transpose(1, 2) / v.shape[2] + torch.eye(3, device=lab.device)
        y = x - mu
        d = (y * (torch.linalg.inv(cov) @ y)).sum(1).clamp(min=0).sqrt()
        dists.append(d / d.amax(1, keepdim=True).clamp(min=1e-8))
    d = torch.stack(dists)
    return (d.sum(0) - d.amax(0)).view(B, H, W)


def _dilate(x, steps):
    """Grey dilation by a (2·steps+1)² square, as `steps` 3×3 max filters made of shifted maxima (several times
    faster than max_pool2d with stride 1 on a CPU)."""
    for _ in range(steps):
        y = x.clone()
        y[..., 1:, :] = torch.maximum(y[..., 1:, :], x[..., :-1, :])
        y[..., :-1, :] = torch.maximum(y[..., :-1, :], x[..., 1:, :])
        x = y.clone()
        x[..., 1:] = torch.maximum(x[..., 1:], y[..., :-1])
        x[..., :-1] = torch.maximum(x[..., :-1], y[..., 1:])
    return x


def morph_smooth(s, k):
    """Opening then closing by reconstruction with a k×k square: removes bright and dark specks smaller than k and
    keeps the edges of what remains (reconstruction bounded to k/2 + 1 geodesic steps)."""
    r = k // 2
    marker = -_dilate(-s, r)
    for _ in range(r + 1):
        marker = torch.minimum(_dilate(marker, 1), s)
    s = marker
    marker = _dilate(s, r)
    for _ in range(r + 1):
        marker = torch.maximum(-_dilate(-marker, 1), s)
    return marker


def otsu(x, bins=64):
    """Otsu's threshold of each map of a (B, H, W) batch in [0, 1]."""
    q = (x.flatten(1) * (bins - 1)).round().long()
    p = torch.zeros(x.shape[0], bins, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    p = p / p.sum(1, keepdim=True)
    centres = torch.linspace(0, 1, bins, device=x.device)
    w0, m0 = p.cumsum(1), (p * centres).cumsum(1)
    between = (m0[:, -1:] * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp(min=1e-8)
    return centres[between.argmax(1)]


def centre_bias(H, W, device, sigma=0.4):
    yy = (torch.arange(H, device=device) + 0.5) / H - 0.5
    xx = (torch.arange(W, device=device) + 0.5) / W - 0.5
    return torch.exp(-(yy[:, None] ** 2 + xx[None] ** 2) / (2 * sigma ** 2))


def mbd_prior(rgb):
    """MB+ saliency of a (B, 3, H, W) batch in [0, 1] → (B, H, W) in [0, 1]."""
    lab = rgb_to_lab(rgb)
    q = torch.stack([lab[:, 0] * 2.55, lab[:, 1] + 128, lab[:, 2] + 128], 1).round().clamp(0, 255).to(torch.uint8)
    dist = mbd_distance(q.flatten(0, 1)).view(q.shape).float().sum(1)
    s = minmax(minmax(dist) + border_contrast(lab))
    H, W = s.shape[-2:]
    s = morph_smooth(s, max(3, round(0.05 * min(H, W)) | 1))
    s = minmax(s * centre_bias(H, W, s.device))
    return minmax(torch.sigmoid(10 * (s - otsu(s).view(-1, 1, 1))))  # MB+'s contrast stretch, b = 10


# ----------------------------------------------------------------------------------------------------------------------
# Prior 2: robust background detection (Zhu et al. CVPR 2014)

def slic(lab, grid=16, cell=8, compactness=10.0, iters=5):
    """SLIC superpixels on a grid×grid lattice, the image resampled to (grid·cell)²: each pixel joins the nearest
    (Lab + scaled position) of the 9 centres around its own block, as one batched matmul. Returns labels (B, n, n)
    in [0, grid²), pixel counts (B, K) and centres (B, K, 5): mean Lab and mean position (× compactness / cell)."""
    B, g, n = lab.shape[0], grid, grid * cell
    x = F.interpolate(lab, size=(n, n), mode="bilinear", align_corners=False, antialias=True)
    r = torch.arange(n, device=lab.device, dtype=lab.dtype) * (compactness / cell)
    f = torch.cat([x, r.view(1, 1, n, 1).expand(B, 1, n, n), r.view(1, 1, 1, n).expand(B, 1, n, n)], 1)
    blocks = f.view(B, 5, g, cell, g, cell).permute(0, 2, 4, 3, 5, 1).reshape(B * g * g, cell * cell, 5)
    cen = blocks.mean(1).view(B, g, g, 5).permute(0, 3, 1, 2)  # (B, 5, g, g)
    gi = torch.arange(g, device=lab.device)
    for _ in range(iters):
        far = F.pad(cen, (1, 1, 1, 1), value=1e4)  # centres outside the lattice never win
        cand = torch.stack([far[:, :, dy:dy + g, dx:dx + g] for dy in range(3) for dx in range(3)], -1)
        cand = cand.permute(0, 2, 3, 1, 4).reshape(B * g * g, 5, 9)
        # ‖f − c‖² = ‖f‖² − 2 f·c + ‖c‖²: ‖f‖² is the same for all 9 candidates of a pixel
        k = ((cand ** 2).sum(1, keepdim=True) - 2 * torch.bmm(blocks, cand)).argmin(-1).view(B, g, g, cell, cell)
        ly = gi.view(1, g, 1, 1, 1) + k // 3 - 1
        lx = gi.view(1, 1, g, 1, 1) + k % 3 - 1
        label = (ly * g + lx).permute(0, 1, 3, 2, 4).reshape(B, n * n)
        cnt = torch.zeros(B, g * g, device=lab.device).scatter_add_(1, label, torch.ones_like(label, dtype=f.dtype))
        tot = torch.zeros(B, 5, g * g, device=lab.device).scatter_add_(2, label[:, None].expand(-1, 5, -1),
                                                                         f.view(B, 5, -1))
        cen = torch.where((cnt > 0).view(B, 1, g, g), (tot / cnt.clamp(min=1)[:, None]).view(B, 5, g, g), cen)
    return label.view(B, n, n), cnt, cen.flatten(2).transpose(1, 2)


def rbd_prior(rgb, grid=16, cell=8, sigma_clr=10.0, sigma_bndcon=1.0, sigma_spa=0.25, mu=0.1):
    """Robust-background-detection saliency of a (B, 3, H, W) batch in [0, 1] → (B, H, W) in [0, 1]; the sigmas and
    mu are the paper's."""
    B, _, H, W = rgb.shape
    dev = rgb.device
    lab = rgb_to_lab(rgb)
    cell = min(cell, max(2, round(min(H, W) / grid)))  # no finer lattice than the image itself
    label, cnt, cen = slic(lab, grid, cell)
    n, K = grid * cell, grid * grid
    col, pos = cen[..., :3], cen[..., 3:] / (10.0 / cell) / n  # mean Lab; mean position in [0, 1]
    valid = cnt > 0
    eye = torch.eye(K, dtype=torch.bool, device=dev)
    adj = torch.zeros(B, K * K, device=dev)
    for a, b in ((label[:, :, :-1], label[:, :, 1:]), (label[:, :-1, :], label[:, 1:, :])):
        adj.scatter_add_(1, (a * K + b).flatten(1), torch.ones(B, a[0].numel(), device=dev))
    adj = adj.view(B, K, K)
    adj = ((adj + adj.transpose(1, 2)) > 0) & ~eye
    on_border = torch.zeros(B, K, dtype=torch.bool, device=dev)
    for edge in (label[:, 0], label[:, -1], label[:, :, 0], label[:, :, -1]):
        on_border.scatter_(1, edge, True)
    d_app = torch.cdist(col, col)
    # geodesic distance: paths through adjacent superpixels, the border ones all linked to each other (the paper's
    # graph); the tiny offset keeps identical neighbours connected (csgraph reads a 0 weight as "no edge")
    link = (adj | (on_border[:, :, None] & on_border[:, None, :])) & ~eye
    weights = ((d_app + 1e-3) * link).cpu().numpy()
    # paths longer than 4 sigma weigh under exp(−8): Dijkstra may stop there, which makes it several times faster
    geo = np.stack([scipy.sparse.csgraph.dijkstra(scipy.sparse.csr_matrix(w), directed=False, limit=4 * sigma_clr)
                    for w in weights])
    span = torch.exp(-torch.from_numpy(geo).to(dev, torch.float32) ** 2 / (2 * sigma_clr ** 2)) * valid[:, None]
    bndcon = (span * on_border[:, None]).sum(2) / span.sum(2).clamp(min=1e-8).sqrt()  # Len_bnd / sqrt(Area)
    w_bg = 1 - torch.exp(-bndcon ** 2 / (2 * sigma_bndcon ** 2))
    w_spa = torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * sigma_spa ** 2))
    w_fg = minmax((d_app * w_spa * (w_bg * valid)[:, None]).sum(2)) * valid  # background-weighted contrast
    w_bg = torch.where(valid, w_bg, torch.ones_like(w_bg))  # empty superpixels: pinned to 0
    w_ij = (torch.exp(-d_app ** 2 / (2 * sigma_clr ** 2)) + mu) * adj
    # min Σ w_bg s² + Σ w_fg (s − 1)² + Σ w_ij (s_i − s_j)²  ⇔  (diag(w_bg + w_fg) + Laplacian(w)) s = w_fg
    A = torch.diag_embed(w_bg + w_fg + 1e-4 + w_ij.sum(2)) - w_ij
    s = minmax(torch.cholesky_solve(w_fg[..., None], torch.linalg.cholesky(A))[..., 0])
    s = s.gather(1, label.flatten(1)).view(B, 1, n, n)
    return F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False)[:, 0]


PRIORS = {"mbd": mbd_prior, "rbd": rbd_prior}


# ----------------------------------------------------------------------------------------------------------------------
# Metrics and post-processing

class SaliencyMeter:
    """MAE, max F-beta and IoU at 0.5 over images at their original size, as saliency benchmarks compute them:
    MAE and IoU are means over images; for max F, precision and recall at the 256 thresholds k/255 (foreground when
    round(255·p) ≥ k; 0/0 counts as 0) are averaged over images first, F-beta taken on the means, then the max."""

    def __init__(self, beta2=0.3):
        self.beta2, self.mae, self.iou, self.prec, self.rec = beta2, [], [], [], []

    def add(self, prob, gt):
        prob, gt = torch.as_tensor(prob, dtype=torch.float32), torch.as_tensor(gt).bool()
        self.mae.append(float((prob - gt.float()).abs().mean()))
        q = (prob * 255).round().long().clamp(0, 255)
        hist = torch.bincount((q + 256 * gt).flatten(), minlength=512).view(2, 256)  # [background, object] × level
        fp, tp = hist.flip(1).cumsum(1).flip(1).double()  # tp[k]: object pixels with round(255 p) ≥ k
        n_fg = tp[0]
        self.prec.append(torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp)))
        self.rec.append(tp / n_fg if n_fg > 0 else torch.zeros_like(tp))
        union = n_fg + fp[128]  # p ≥ 0.5 ⇔ round(255 p) ≥ 128
        self.iou.append(float(tp[128] / union) if union > 0 else 1.0)

    def result(self):
        p, r = torch.stack(self.prec).mean(0), torch.stack(self.rec).mean(0)
        f = (1 + self.beta2) * p * r / (self.beta2 * p + r).clamp(min=1e-12)
        return {"mae": float(np.mean(self.mae)), "max_f": float(f.max()), "iou": float(np.mean(self.iou)),
                "images": len(self.mae)}


def postprocess(prob, threshold=0.5, min_area=0.01):
    """The released masks' recipe: threshold, delete 8-connected components under min_area of the image, and report
    the image as dropped (with why) when under min_area of foreground remains. Returns (mask, fg share, reason)."""
    fg = np.asarray(prob) >= threshold
    comp, _ = scipy.ndimage.label(fg, structure=np.ones((3, 3)))
    sizes = np.bincount(comp.ravel())
    keep = sizes >= min_area * fg.size
    keep[0] = False
    mask = keep[comp]
    share = float(mask.mean())
    reason = None
    if share < min_area:
        reason = (f"no pixel above {threshold}" if not fg.any() else
                  f"foreground {share:.2%} < {min_area:.0%} after removing components under {min_area:.0%}")
    return mask, share, reason


# ----------------------------------------------------------------------------------------------------------------------
# Data helpers

class _Resized(torch.utils.data.Dataset):
    """Images (and optionally masks) decoded and resized to size×size uint8, with their original (H, W)."""

    def __init__(self, images, size, masks=None):
        self.images, self.size, self.masks = images, size, masks

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = common.read_image(self.images[i])
        hw = tuple(img.shape[1:])
        x = v2.functional.resize(img, [self.size, self.size], antialias=True)
        if self.masks is None:
            return x, torch.zeros(0, dtype=torch.uint8), torch.tensor(hw)
        m = common.read_mask(self.masks[i])
        if tuple(m.shape) != hw:
            raise common.UserError(f"{self.masks[i]}: mask is {tuple(m.shape)}, its image {self.images[i]} is {hw}")
        m = v2.functional.resize(m[None].float(), [self.size, self.size], antialias=True)[0] >= 128
        return x, m.to(torch.uint8), torch.tensor(hw)


def load_resized(images, size, workers, masks=None, desc="load"):
    """All images at size×size in memory (uint8 (N, 3, S, S), 150 kB each at 224), masks (N, S, S) if given and the
    original sizes (N, 2): every later stage reads from here instead of decoding JPEGs again."""
    loader = torch.utils.data.DataLoader(_Resized(images, size, masks), batch_size=32, num_workers=workers)
    xs, ms, hws = [], [], []
    for x, m, hw in tqdm(loader, desc=desc, leave=False):
        xs.append(x), ms.append(m), hws.append(hw)
    return torch.cat(xs), (torch.cat(ms) if masks is not None else None), torch.cat(hws)


def match_by_stem(folder, ids, what):
    """folder/<id>.<any image suffix> for each id; a missing one is a UserError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise common.UserError(f"{folder}: no such folder ({what})")
    by_stem = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in common.IMAGE_SUFFIXES}
    if not by_stem:
        raise common.UserError(f"{folder}: no image files in it ({what})")
    missing = [i for i in ids if i not in by_stem]
    if missing:
        raise common.UserError(f"{folder}: no {what} for {len(missing)} of {len(ids)} images, e.g. '{missing[0]}' "
                               "(files are matched to images by name without suffix)")
    return [by_stem[i] for i in ids]


def read_grey(path):
    """A saliency map of any mode as (H, W) float in [0, 1]."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("L"), dtype=np.float32) / 255)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise common.UserError(f"{path}: cannot decode saliency map ({e}); replace or remove the file") from None


def to_size(m, hw):
    """A (h, w) map resized bilinearly to hw as float in [0, 1]."""
    m = torch.as_tensor(m)
    m = m.float() / 255 if m.dtype == torch.uint8 else m.float()
    if tuple(m.shape) == tuple(hw):
        return m
    return F.interpolate(m[None, None], size=tuple(int(v) for v in hw), mode="bilinear", align_corners=False)[0, 0]


# ----------------------------------------------------------------------------------------------------------------------
# The saliency network: train on pseudo-labels (0 / 1 / 255 = ignore), predict with flip TTA

class _PseudoLabeled(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x, y = self.transform(tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.labels[i]))
        return x, y.long()


def stage_config(args):
    """The settings a stored stage or network depends on (not --rounds: more rounds reuse the earlier ones)."""
    return {k: getattr(args, k) for k in ("priors", "prior_size", "arch", "backbone_init", "size", "epochs",
                                          "batch_size", "lr", "wd", "fg_thresh", "bg_thresh", "prior_weight", "seed",
                                          "train_images", "train_masks")}


def train_network(images, labels, args, device, ckpt_path, tag, seed):
    """A fresh SegModel trained with BCE on the labeled pixels of `labels`; checkpointed every epoch (resumable)."""
    common.seed_all(seed)
    model = common.SegModel(args.arch, 32, saliency_head=True)
    msg = common.load_backbone_weights(model.backbone, args.backbone_init, args.arch)
    model.to(device)
    # the released pretraining augmentation, image and pseudo-label jointly (crops, flip, colour jitter, greyscale)
    data = _PseudoLabeled(images, labels, common.train_transform(args.size, scale=(0.3, 1.0)))
    if len(data) < args.batch_size:
        raise common.UserError(f"only {len(data)} training images, fewer than --batch-size {args.batch_size}")
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
    scaler = common.make_scaler(device, args.amp)
    total = args.epochs * len(loader)
    start = 0
    ck = common.load_checkpoint(ckpt_path, kind="saliency") if args.resume and ckpt_path.is_file() else None
    if ck is not None and {k: ck["args"].get(k) for k in stage_config(args)} != stage_config(args):
        common.print0(f"[{tag}] {ckpt_path} was trained with other settings: starting afresh")
        ck = None
    if ck is not None:
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise common.UserError(f"{ckpt_path}: does not fit this --arch {args.arch} network ({str(e)[:100]}); "
                                   "remove it or drop --resume") from None
        start = ck["epoch"]
        common.print0(f"[{tag}] resumed from {ckpt_path} at epoch {start}")
    common.print0(f"[{tag}] {len(data)} images, {total} steps; {msg}")
    for epoch in range(start, args.epochs):
        model.train()
        seen, loss_sum = 0, 0.0
        bar = tqdm(loader, desc=f"[{tag}] epoch {epoch + 1}/{args.epochs}", leave=False)
        for it, (x, y) in enumerate(bar):
            for g in opt.param_groups:
                g["lr"] = common.poly_lr(args.lr, epoch * len(loader) + it, total)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with common.autocast(device, args.amp):
                _, logit = model(x)
            keep = y != common.IGNORE
            if not keep.any():
                continue
            loss = F.binary_cross_entropy_with_logits(logit.float()[keep], y[keep].float())
            if not torch.isfinite(loss):
                raise common.UserError(f"[{tag}] loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen, loss_sum = seen + 1, loss_sum + loss.item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        common.print0(f"[{tag}] epoch {epoch + 1}/{args.epochs} loss {loss_sum / max(seen, 1):.4f}")
        common.save_checkpoint(ckpt_path, kind="saliency", model=model.state_dict(), optimizer=opt.state_dict(),
                               epoch=epoch + 1, saliency_head=True, args={**vars(args), "dim": 32})
    return model


@torch.no_grad()
def predict(model, images, args, device, out_size):
    """Saliency probabilities of uint8 (N, 3, S, S) images, averaged with their mirror image, as uint8 maps
    (N, out_size, out_size)."""
    model.eval()
    norm = common.eval_transform(args.size)
    out = torch.empty(len(images), out_size, out_size, dtype=torch.uint8)
    for i in range(0, len(images), args.batch_size):
        x = norm(images[i:i + args.batch_size].to(device))
        with common.autocast(device, args.amp):
            p = torch.sigmoid(model(x)[1].float()) + torch.sigmoid(model(x.flip(-1))[1].float()).flip(-1)
        p = F.interpolate(p[:, None] / 2, size=(out_size, out_size), mode="bilinear", align_corners=False)[:, 0]
        out[i:i + len(p)] = (p.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return out


def pseudo_labels(maps, fg, bg):
    """uint8 maps → 1 above fg, 0 below bg, IGNORE between."""
    p = maps.float() / 255
    y = torch.full_like(maps, common.IGNORE)
    y[p > fg] = 1
    y[p < bg] = 0
    return y


# ----------------------------------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-root", nargs="+", required=True,
                   help="one or more VOC-layout roots or plain image folders: the images to mine masks for")
    common.add_download_arg(g)
    g.add_argument("--split", default=None, help="VOC split list to use (all JPEGImages when not given)")
    g.add_argument("--name", default="mined", help="masks go to OUT_ROOT/saliency_<name>/")
    g.add_argument("--out-root", "--mask-root", dest="out_root", default=None,
                   help="write saliency_<name>/ here instead of inside each data root (for read-only data); "
                        "pretrain.py's --mask-root then reads them")
    g.add_argument("--out", default="runs/mine_masks", help="work folder: checkpoints, stage maps, grid, summary")
    g.add_argument("--eval-masks", default=None, help="ground-truth masks (matched by file name) to score each stage")
    g = p.add_argument_group("mode (unsupervised when neither is given)")
    g.add_argument("--train-images", default=None, help="supervised mode: labeled saliency images (e.g. DUTS-TR)")
    g.add_argument("--train-masks", default=None, help="supervised mode: their masks, matched by file name")
    g.add_argument("--import-maps", default=None, help="import mode: grey saliency maps (any size) to post-process")
    g = p.add_argument_group("priors")
    g.add_argument("--priors", default="mbd,rbd", help=f"comma list of {', '.join(PRIORS)}; fused by their mean")
    g.add_argument("--prior-size", type=int, default=224, help="images are resized to this square for the priors; "
                   "stage maps are kept at this size")
    g.add_argument("--prior-batch", type=int, default=32, help="images per batch of the priors")
    g = p.add_argument_group("network")
    g.add_argument("--arch", default="resnet50", choices=list(common.ARCH_CHANNELS), help="saliency network backbone")
    g.add_argument("--backbone-init", default="random",
                   help="random, imagenet (torchvision's weights, needs a network) or a ResNet / MoCo state-dict file")
    g.add_argument("--rounds", type=int, default=2,
                   help="networks trained one after another (1st on the priors, next on the last one's "
                        "predictions); 0 = masks straight from the priors")
    g.add_argument("--prior-weight", type=float, default=0.5,
                   help="rounds after the first learn from this mix of priors and the last round's predictions "
                        "(0 = predictions alone, as DeepUSPS)")
    g.add_argument("--size", type=int, default=224, help="network input size")
    g.add_argument("--epochs", type=int, default=10, help="epochs per network")
    g.add_argument("--batch-size", type=int, default=16, help="training and prediction batch")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW, poly decay")
    g.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--fg-thresh", type=float, default=0.7, help="pseudo-label: object above this")
    g.add_argument("--bg-thresh", type=float, default=0.3, help="pseudo-label: background below this; between: ignored")
    g = p.add_argument_group("post-processing and output")
    g.add_argument("--threshold", type=float, default=0.5, help="a pixel is object when its map is at least this")
    g.add_argument("--min-area", type=float, default=0.01,
                   help="components and whole masks under this share of the image are removed / dropped")
    g.add_argument("--grid", type=int, default=6, help="images in the picture grid (0 = none)")
    g.add_argument("--resume", action="store_true", help="reuse finished stages and checkpoints in --out")
    common.add_runtime_args(p)
    args = p.parse_args(argv)
    if bool(args.train_images) != bool(args.train_masks):
        p.error("--train-images and --train-masks go together (supervised mode)")
    if args.import_maps and args.train_images:
        p.error("--import-maps and --train-images are different modes: pick one")
    args.priors = [s.strip() for s in args.priors.split(",") if s.strip()]
    bad = [s for s in args.priors if s not in PRIORS]
    if bad or not args.priors:
        p.error(f"--priors: unknown {bad or 'empty list'}; choose from {', '.join(PRIORS)}")
    if not 0 <= args.bg_thresh <= args.fg_thresh <= 1:
        p.error("need 0 <= --bg-thresh <= --fg-thresh <= 1")
    args.mode = "import" if args.import_maps else "supervised" if args.train_images else "unsupervised"
    return args


def main(argv=None):
    args = get_args(argv)
    common.resolve_download(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise common.UserError("mine_masks.py runs as a single process; start it with python, not torchrun")
    device = common.setup_runtime(args.device).device
    common.seed_all(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    S = args.prior_size
    times, stages = {}, []  # stages: (name, uint8 maps at S×S or None, metrics or None)

    # ---- data: the images to mine, where each one's mask goes, ground truth for scoring
    samples, dests = [], []
    for root in args.data_root:
        for s in common.list_samples(root, args.split):
            samples.append(s)
            dests.append(common.saliency_dir(root, args.name, args.out_root))
    seen = {}
    for s, d in zip(samples, dests):
        if seen.setdefault((d, s.id), s.image) != s.image:
            raise common.UserError(f"{s.image}: id '{s.id}' also names {seen[(d, s.id)]}, and both masks would go to "
                                   f"{d}/{s.id}.png; mine them under different --out-root or --name")
    ids = [s.id for s in samples]
    gt_paths = match_by_stem(args.eval_masks, ids, "ground-truth mask") if args.eval_masks else None
    t0 = time.time()
    images, _, sizes = load_resized([s.image for s in samples], S, args.workers, desc="images")
    times["load"] = time.time() - t0
    common.print0(f"{len(ids)} images from {', '.join(args.data_root)}; mode {args.mode}; device {device}")
    gts = None
    if gt_paths:
        gts = []
        for path, hw in zip(gt_paths, sizes.tolist()):
            g = common.read_mask(path)
            if list(g.shape) != hw:
                raise common.UserError(f"{path}: ground truth is {tuple(g.shape)}, its image is {tuple(hw)}; "
                                       "pass the masks that belong to these images")
            gts.append(g >= 128)

    def score(maps_at, name):
        """Metrics of a stage against the ground truth at original size (None without --eval-masks)."""
        if gts is None:
            return None
        meter = SaliencyMeter()
        for i in range(len(ids)):
            meter.add(maps_at(i), gts[i])
        r = meter.result()
        common.print0(f"  {name:<14} MAE {r['mae']:.3f}  max-F {r['max_f']:.3f}  IoU {r['iou']:.3f}")
        return r

    config = stage_config(args)

    def run_stage(name, compute):
        """Load a finished stage from --out when resuming, else compute it (returning uint8 maps) and store it."""
        path = out / f"maps_{name}.pt"
        if args.resume and path.is_file():
            try:
                st = torch.load(path, weights_only=True)
            except Exception as e:  # torch raises many types for a damaged file
                raise common.UserError(f"{path}: unreadable stage file ({type(e).__name__}); delete it or drop "
                                       "--resume") from None
            if st["ids"] == ids and st.get("config") == config:
                common.print0(f"[{name}] reused from {path}")
                times.update(st["times"])
                stages.append((name, st["maps"], st["metrics"]))
                for extra in st.get("extra", []):
                    stages.insert(-1, tuple(extra))
                return st["maps"]
            common.print0(f"[{name}] {path} was made for other images or settings: recomputing")
        t = time.time()
        before = len(stages)
        maps = compute()
        times[name] = time.time() - t
        metrics = score(lambda i: to_size(maps[i], sizes[i]), name)
        extra = [(n, None, m) for n, _, m in stages[before:]]
        stages.append((name, maps, metrics))
        common.atomic_write(path, lambda p: torch.save({"ids": ids, "config": config, "maps": maps, "metrics": metrics,
                                                       "extra": extra, "times": {k: v for k, v in times.items()
                                                                                 if k != "load"}}, p))
        return maps

    # ---- priors (unsupervised mode): each one scored on its own, then their mean
    def compute_priors():
        fused = torch.zeros(len(ids), S, S)
        for name in args.priors:
            t = time.time()
            m = torch.empty(len(ids), S, S, dtype=torch.uint8)
            for i in tqdm(range(0, len(ids), args.prior_batch), desc=f"prior {name}", leave=False):
                x = images[i:i + args.prior_batch].to(device).float() / 255
                m[i:i + len(x)] = (PRIORS[name](x) * 255).round().to(torch.uint8).cpu()
            times[f"prior_{name}"] = time.time() - t
            common.print0(f"[prior {name}] {len(ids) / times[f'prior_{name}']:.1f} images/s")
            stages.append((f"prior_{name}", None, score(lambda i: to_size(m[i], sizes[i]), f"prior_{name}")))
            fused += m.float()
        return (fused / len(args.priors)).round().to(torch.uint8)

    # ---- the network stages
    def net_stage(tag, train_images, train_labels, seed):
        def compute():
            model = train_network(train_images, train_labels, args, device, out / f"{tag}.pth", tag, seed)
            t = time.time()
            maps = predict(model, images, args, device, S)
            times[f"{tag}_predict"] = time.time() - t
            common.print0(f"[{tag}] prediction {len(ids) / times[f'{tag}_predict']:.1f} images/s (flip TTA)")
            return maps
        return compute

    if args.mode == "unsupervised":
        prior = final = run_stage("priors", compute_priors)
        for r in range(1, args.rounds + 1):
            # later rounds stay anchored to the priors: a young network calls most of its uncertain band object, and
            # relabelling from its maps alone snowballs (synthetic demo: 30 % → 57 % → 92 % of pixels "object")
            target = final if r == 1 else (args.prior_weight * prior + (1 - args.prior_weight) * final.float()).round()
            labels = pseudo_labels(target.to(torch.uint8), args.fg_thresh, args.bg_thresh)
            conf = (labels != common.IGNORE).float().mean().item()
            src = "priors" if r == 1 else f"round {r - 1} predictions" + (
                f" averaged with the priors (weight {args.prior_weight})" if args.prior_weight else "")
            common.print0(f"[round{r}] learns from {conf:.0%} confident pixels of the {src}; "
                          f"{(labels == 1).float().mean().item():.0%} object")
            final = run_stage(f"round{r}", net_stage(f"round{r}", images, labels, args.seed + r))
        final_at = lambda i: to_size(final[i], sizes[i])  # noqa: E731
    elif args.mode == "supervised":
        prior = None
        tr = common.list_samples(args.train_images)
        masks = match_by_stem(args.train_masks, [s.id for s in tr], "training mask")
        t = time.time()
        tr_images, tr_masks, _ = load_resized([s.image for s in tr], S, args.workers, masks, desc="train images")
        times["load_train"] = time.time() - t
        final = run_stage("supervised", net_stage("supervised", tr_images, tr_masks, args.seed))
        final_at = lambda i: to_size(final[i], sizes[i])  # noqa: E731
    else:
        maps = match_by_stem(args.import_maps, ids, "saliency map")
        final_at = lambda i: to_size(read_grey(maps[i]), sizes[i])  # noqa: E731
        t = time.time()
        stages.append(("imported", None, score(final_at, "imported")))
        times["import_score"] = time.time() - t
        prior = final = None

    # ---- post-processing and output, per destination folder
    t = time.time()
    kept, dropped, shares = {}, {}, []
    final_meter = SaliencyMeter() if gts is not None else None
    grid_masks = {}
    for i in tqdm(range(len(ids)), desc="masks", leave=False):
        mask, share, reason = postprocess(final_at(i).numpy(), args.threshold, args.min_area)
        png = dests[i] / f"{ids[i]}.png"
        if reason:
            dropped[(dests[i], ids[i])] = reason
            png.unlink(missing_ok=True)  # a mask left by an earlier run would contradict dropped.txt
            mask = np.zeros_like(mask)
        else:
            kept[(dests[i], ids[i])] = share
            shares.append(share)
            common.save_mask_png(mask, png)
        if final_meter is not None:
            final_meter.add(torch.from_numpy(mask).float(), gts[i])
        if i < args.grid:
            grid_masks[i] = torch.from_numpy(mask)
    times["postprocess"] = time.time() - t
    if final_meter is not None:
        r = final_meter.result()
        common.print0(f"  {'final masks':<14} MAE {r['mae']:.3f}  max-F {r['max_f']:.3f}  IoU {r['iou']:.3f}"
                      "  (dropped images count as empty)")
        stages.append(("final_masks", None, r))

    # ---- picture grid: image | prior | prediction | mask | ground truth
    if args.grid > 0:
        tiles, ncol = [], 0
        for i in range(min(args.grid, len(ids))):
            row = [images[i]]
            for m in (prior, final if final is not None else None):
                if m is not None:
                    row.append(m[i][None].expand(3, -1, -1))
            if args.mode == "import":
                row.append((to_size(final_at(i), (S, S)) * 255).round().to(torch.uint8)[None].expand(3, -1, -1))
            for m in [grid_masks[i]] + ([gts[i]] if gts is not None else []):
                m = F.interpolate(m[None, None].float(), size=(S, S), mode="nearest")[0]
                row.append((m * 255).to(torch.uint8).expand(3, -1, -1))
            tiles += row
            ncol = len(row)
        common.save_grid(tiles, out / "grid.png", ncol, size=min(S, 160))

    # ---- save: dropped.txt and summary.json in every destination folder, the summary also in --out
    n = len(ids)
    summary = {
        "mode": args.mode, "images": n, "kept": len(kept), "dropped": len(dropped),
        "mean_foreground_share": float(np.mean(shares)) if shares else 0.0,
        "stages": {name: m for name, _, m in stages if m is not None},
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "images_per_second": {k: round(n / v, 1) for k, v in times.items()
                              if (k.startswith("prior_") or k.endswith("_predict")) and v > 0},
        "dropped_why": {i: why for (_, i), why in dropped.items()},
        "args": {k: v for k, v in vars(args).items()},
        "device": str(device),
    }
    for d in sorted(set(dests)):
        mine = sorted(i for (dd, i) in dropped if dd == d)
        common.atomic_write(d / "dropped.txt", lambda p: p.write_text("".join(f"{i}\n" for i in mine)))
        common.write_json(d / "summary.json", {**summary, "folder_kept": sum(1 for (dd, _) in kept if dd == d),
                                               "folder_dropped": len(mine)})
    common.write_json(out / "summary.json", summary)
    if summary["stages"]:
        common.print_table([(k, f"{m['mae']:.3f}", f"{m['max_f']:.3f}", f"{m['iou']:.3f}")
                            for k, m in summary["stages"].items()], ["stage", "MAE", "max-F", "IoU@0.5"])
    common.print0(f"{len(kept)} masks written to {', '.join(str(d) for d in sorted(set(dests)))}; "
                  f"{len(dropped)} images dropped (listed in dropped.txt); mean foreground "
                  f"{summary['mean_foreground_share']:.1%}")


if __name__ == "__main__":
    common.run_main(main)
