r"""Mine object masks, from raw images with no labels and no downloads: paper Sec. 3.2, "mask proposals" — the masks
pretrain.py contrasts — and Table 2a's three sources of them (--proposals).

The paper takes its masks from an off-the-shelf saliency estimator, unsupervised (DeepUSPS, Nguyen et al. NeurIPS
2019: hand-crafted priors → a network trained on them → bootstrapping) or supervised (BAS-Net trained on DUTS); the
release ships only the resulting PNGs. This script makes them, in one of three modes:

1. unsupervised (default): two classical saliency priors computed batched in torch (GPU when there is one) and fused
   by their mean — "mbd", Minimum Barrier salient object detection (Zhang et al. ICCV 2015, MB+), and "rbd", Saliency
   Optimization from Robust Background Detection (Zhu et al. CVPR 2014, on SLIC superpixels) — then --rounds saliency
   networks (common.SegModel's 1-channel head), the first trained on the confident pixels of the priors, each next one
   on its predecessor's flip-averaged predictions mixed with the priors (DeepUSPS's and the paper's bootstrapping);
2. supervised (--train-images DIR --train-masks DIR, e.g. DUTS-TR): the same network trained on real masks — the
   paper's "supervised saliency" variant;
3. import (--import-maps DIR): saliency maps from any other tool (grey images of any size), only post-processed.

The post-processing is the release's: threshold strictly above 0.5; remove every contour whose filled area (holes
included) is under 1 % of the image; drop the image when under 1 % of it is object. --proposals saliency (default,
the paper's) keeps that mask as one object; components makes each of its connected components that passes the area
rule an object (any mode); hierarchical uses no saliency at all: the SLIC superpixels merged bottom-up by colour,
every region between 1 % and --max-region of the image an object. Masks go to MASK_ROOT/saliency_<name>/<id>.png at
each image's original size (MASK_ROOT: each data root, unless --mask-root) — 0/255 for one object, object ids
1…M (a palette PNG) for several — with dropped.txt and summary.json (objects per image) beside them: what
pretrain.py and kmeans_eval.py read by default.

Commands
  # default: every image of the root, unsupervised, written to VOC/saliency_unsup/
  python mine_masks.py --data-root VOC
  # scored against ground-truth masks (MAE, max F-beta, IoU at 0.5 per stage; grid.png), masks under runs/ecssd/
  python mine_masks.py --data-root ECSSD/images --mask-root runs/ecssd --eval-masks ECSSD/masks --out runs/mine_ecssd
  # the supervised variant, trained on DUTS-TR, predicting VOC (VOC/saliency_sup/)
  python mine_masks.py --data-root VOC --name sup --train-images DUTS-TR/images --train-masks DUTS-TR/masks
  # maps from another tool
  python mine_masks.py --data-root VOC --name basnet --import-maps basnet_maps/
  # Table 2a: each salient component an object; regions of a hierarchical segmentation (no saliency)
  python mine_masks.py --data-root VOC --name components --proposals components
  python mine_masks.py --data-root VOC --name hierarchical --proposals hierarchical
One process, one device (priors and prediction are batched instead of spread over processes).
"""
import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

import common


# ======================================================================================================================
# The classical priors
# ======================================================================================================================

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


# ======================================================================================================================
# Post-processing and metrics
# ======================================================================================================================

def postprocess(prob, threshold=0.5, min_area=0.01):
    """The release's recipe, on a map in [0, 1]: threshold strictly above `threshold`; every contour whose filled
    area is under `min_area` of the image is set to 0 — an object's outer contour encloses its holes (so a large ring
    stays), a hole's contour encloses the hole and the object pixels along its edge (so the edge of a small hole
    goes); the image is dropped when under `min_area` of it remains. This is cv2.findContours(RETR_TREE) + filled
    drawContours written with scipy.ndimage (tests/golden). Returns (mask, object share, why it was dropped or None)."""
    fg = np.asarray(prob) > threshold
    limit = min_area * fg.size
    mask = fg.copy()
    objects, _ = scipy.ndimage.label(fg, structure=np.ones((3, 3)))  # 8-connected objects, as OpenCV's
    for k, box in enumerate(scipy.ndimage.find_objects(objects), start=1):
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        filled = scipy.ndimage.binary_fill_holes(objects[box] == k)
        if filled.sum() < limit:
            mask[box][filled] = False
    holes, _ = scipy.ndimage.label(~fg)  # 4-connected background regions; those off the border are holes
    outside = set(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]).tolist())
    for k, box in enumerate(scipy.ndimage.find_objects(holes), start=1):
        if box is None or k in outside:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        hole = holes[box] == k
        region = scipy.ndimage.binary_fill_holes(hole) | scipy.ndimage.binary_dilation(hole)
        if region.sum() < limit:
            mask[box][region] = False
    share = float(mask.mean())
    reason = None
    if share < min_area:
        reason = (f"no pixel above {threshold}" if not fg.any() else
                  f"foreground {share:.2%} < {min_area:.0%} after removing contours under {min_area:.0%}")
    return mask, share, reason


# ======================================================================================================================
# Proposals: Sec. 3.3's non-overlapping objects {M0, …, MN}, from the three sources of Table 2a
# ======================================================================================================================

def merge_regions(label, lab, count, merge_below=25.0, max_region=0.5):
    """A hierarchical segmentation of one image, bottom-up from its SLIC superpixels (label: n×n ids in [0, K); lab:
    their mean CIE Lab colours (K, 3); count: their pixels (K,)): the two adjacent regions whose mean colours are
    closest merge, their mean and size updated, until no adjacent pair is closer than `merge_below` Lab units. Regions
    larger than `max_region` of the image — sky, ground, walls — are background; every other region is an object.
    Returns n×n uint8 ids (0 background, 1… the regions, in the order of their first superpixel)."""
    K = len(count)
    adj = np.zeros((K, K), bool)
    for a, b in ((label[:, :-1], label[:, 1:]), (label[:-1], label[1:])):
        adj[a.ravel(), b.ravel()] = True
    adj |= adj.T
    np.fill_diagonal(adj, False)
    count, mean = count.astype(np.float64).copy(), lab.astype(np.float64).copy()
    dist = np.where(adj, np.linalg.norm(mean[:, None] - mean[None], axis=-1), np.inf)  # dist: K×K
    parent = np.arange(K)
    while True:
        i, j = divmod(int(dist.argmin()), K)
        if not dist[i, j] < merge_below:
            break
        mean[i] = (mean[i] * count[i] + mean[j] * count[j]) / (count[i] + count[j])
        count[i], count[j] = count[i] + count[j], 0
        adj[i] |= adj[j]
        adj[j], adj[i, i] = False, False
        adj[:, i], adj[:, j] = adj[i], False
        parent[parent == j] = i
        dist[j], dist[:, j] = np.inf, np.inf
        dist[i] = dist[:, i] = np.where(adj[i], np.linalg.norm(mean - mean[i], axis=1), np.inf)
    region = parent[label]
    keep = [r for r in dict.fromkeys(region.ravel().tolist()) if count[r] <= max_region * label.size][:254]
    ids = np.zeros(K, np.uint8)
    ids[keep] = np.arange(1, len(keep) + 1)
    return ids[region]


def hierarchical_regions(images, batch, device, merge_below, max_region):
    """Table 2a's first source, no saliency at all: each image's SLIC superpixels (batched on the device, as the RBD
    prior computes them) merged by merge_regions. Returns (N, n, n) uint8 region ids."""
    out = []
    for i in tqdm(range(0, len(images), batch), desc="regions", leave=False):
        lab = rgb_to_lab(images[i:i + batch].to(device).float() / 255)
        label, cnt, cen = slic(lab)
        for b in range(len(label)):
            out.append(torch.from_numpy(merge_regions(label[b].cpu().numpy(), cen[b, :, :3].cpu().numpy(),
                                                      cnt[b].cpu().numpy(), merge_below, max_region)))
    return torch.stack(out)


def area_rule(objects, min_area):
    """Object ids with every object under `min_area` of the image set to background, the rest renumbered 1…M."""
    share = np.bincount(objects.ravel(), minlength=256) / objects.size
    keep = np.flatnonzero(share >= min_area)
    ids = np.zeros(256, np.uint8)
    keep = keep[keep > 0]
    ids[keep] = np.arange(1, len(keep) + 1)
    return ids[objects]


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


# ======================================================================================================================
# Maps: in memory at S×S, or files of any size; read at each image's original size
# ======================================================================================================================

@dataclass
class Maps:
    """The saliency maps of one stage: uint8 (N, S, S) in memory, or one grey file per image (import mode)."""
    sizes: torch.Tensor           # (N, 2): each image's original (H, W)
    maps: torch.Tensor = None     # (N, S, S) uint8
    files: list = None

    def at(self, i):
        """Map i at its image's original size, float in [0, 1] (resized bilinearly)."""
        m = self.maps[i].float() / 255 if self.files is None else read_grey(self.files[i])
        hw = tuple(int(v) for v in self.sizes[i])
        if tuple(m.shape) == hw:
            return m
        return F.interpolate(m[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0]


def read_grey(path):
    """A saliency map of any mode as (H, W) float in [0, 1]."""
    return common.read_mask(path).float() / 255


def score(maps, gts, name):
    """The metrics of one stage against the ground truth at original size (None without --eval-masks)."""
    if gts is None:
        return None
    meter = SaliencyMeter()
    for i, gt in enumerate(gts):
        meter.add(maps.at(i), gt)
    r = meter.result()
    common.print0(f"  {name:<14} MAE {r['mae']:.3f}  max-F {r['max_f']:.3f}  IoU {r['iou']:.3f}")
    return r


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
        common.check_same_size(m, hw, self.masks[i], self.images[i], "mask")
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


# ======================================================================================================================
# The saliency network: trained on (pseudo-)labels 0 / 1 / IGNORE, predicting with flip test-time augmentation
# ======================================================================================================================

@dataclass
class NetConfig:
    """How a saliency network is built and trained (the flags of the 'network' group)."""
    arch: str = "resnet50"
    backbone_init: str = "random"
    size: int = 224
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    wd: float = 1e-4
    workers: int = 0
    amp: str = "bf16"


class _Labelled(torch.utils.data.Dataset):
    """A random view (crop, flip, as pretrain.py's) of an in-memory image and its label, with colour parameters for
    the device; items are (index, seed) from common.SeededSampler."""

    def __init__(self, images, labels, size):
        self.images, self.labels, self.size = images, labels, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, seed = item
        with common.seeded(seed):
            view = common.draw_view(self.images.shape[-2:], scale=(0.3, 1.0))
        return (common.crop_view(self.images[i], view, self.size), common.crop_view(self.labels[i], view, self.size),
                common.draw_color_params(np.random.default_rng(seed)))


def train_saliency_network(images, labels, net, seed, device, checkpoint, resume, tag):
    """A fresh SegModel whose saliency head learns `labels` (N, S, S: 0, 1 or IGNORE) of the uint8 `images`
    (N, 3, S, S) with BCE over the labelled pixels, AdamW with a poly schedule; checkpointed every epoch, and resumed
    exactly from `checkpoint` when `resume` and the checkpoint was made with the same settings."""
    common.seed_all(seed)
    model = common.SegModel(net.arch, saliency_head=True)
    report = common.load_backbone_weights(model.backbone, net.backbone_init, net.arch)
    model.to(device)
    data = _Labelled(images, labels, net.size)
    if len(data) < net.batch_size or net.batch_size < 2:
        raise common.UserError(f"{len(data)} training images and --batch-size {net.batch_size}: a batch needs at least "
                               "2 images (BatchNorm) and the set at least one batch")
    sampler = common.SeededSampler(len(data), seed)
    loader = torch.utils.data.DataLoader(data, batch_size=net.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=net.workers, persistent_workers=net.workers > 0,
                                         generator=torch.Generator())
    optimizer = torch.optim.AdamW(model.parameters(), lr=net.lr, weight_decay=net.wd)
    step = common.TrainStep(optimizer, [model], device, net.amp,
                            advice=f"a learning rate too high (--lr {net.lr:g})")
    total, start = net.epochs * len(loader), 0
    if resume and checkpoint.is_file():
        ck = common.load_checkpoint(checkpoint, kind="saliency")
        if ck["net"] == asdict(net) and ck["seed"] == seed:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            step.load_state_dict(ck["train_step"])
            start, step.checkpoint = ck["epoch"], checkpoint
            common.print0(f"[{tag}] resumed {checkpoint} at epoch {start}")
        else:
            common.print0(f"[{tag}] {checkpoint} was trained with other settings: starting afresh")
    common.print0(f"[{tag}] {len(data)} images, {total} steps; {report}")
    for epoch in range(start, net.epochs):
        sampler.set_epoch(epoch)
        common.seed_all(seed, epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        for it, (x, y, c) in enumerate(tqdm(loader, desc=f"[{tag}] epoch {epoch + 1}/{net.epochs}", leave=False)):
            for g in optimizer.param_groups:
                g["lr"] = common.poly_lr(net.lr, epoch * len(loader) + it, total)
            x, y, c = x.to(device, non_blocking=True), y.to(device, non_blocking=True), c.to(device, non_blocking=True)
            x = common.normalize(common.apply_color_params(x.float() / 255, c))
            with common.autocast(device, net.amp):
                logit = model(x)[1]
            labelled = (y != common.IGNORE).float()
            bce = F.binary_cross_entropy_with_logits(logit.float(), y.clamp(max=1).float(), reduction="none")
            loss = (bce * labelled).sum() / labelled.sum().clamp(min=1)  # over the labelled pixels, no host sync
            loss_sum += step(loss)
        step.check(f"[{tag}] epoch {epoch + 1}")
        common.print0(f"[{tag}] epoch {epoch + 1}/{net.epochs} loss {float(loss_sum) / len(loader):.4f}")
        common.save_checkpoint(checkpoint, "saliency", model=model.state_dict(), optimizer=optimizer.state_dict(),
                               train_step=step.state_dict(), epoch=epoch + 1, net=asdict(net), seed=seed,
                               args={"arch": net.arch})
        step.checkpoint = checkpoint
    return model


@torch.no_grad()
def predict_saliency(model, images, size, batch_size, device, amp, out_size):
    """Saliency probabilities of uint8 images (N, 3, S, S), averaged with those of their mirror image, as uint8 maps
    (N, out_size, out_size)."""
    model.eval()
    norm = common.eval_transform(size, "bilinear")  # (the maps are made at the size the images were read at)
    out = torch.empty(len(images), out_size, out_size, dtype=torch.uint8)
    for i in range(0, len(images), batch_size):
        x = norm(images[i:i + batch_size].to(device))
        x = torch.cat([x, x.flip(-1)])  # 2B×3×S×S: the images and their mirror images in one pass
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)  # cuDNN's faster layout
        with common.autocast(device, amp):
            p = torch.sigmoid(model(x)[1].float())
        p = (p[:len(p) // 2] + p[len(p) // 2:].flip(-1)) / 2
        p = F.interpolate(p[:, None], size=(out_size, out_size), mode="bilinear", align_corners=False)[:, 0]
        out[i:i + len(p)] = (p.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return out


def pseudo_labels(maps, fg, bg):
    """uint8 maps → 1 above fg, 0 below bg, IGNORE between."""
    p = maps.float() / 255
    y = torch.full_like(maps, common.IGNORE)
    y[p > fg] = 1
    y[p < bg] = 0
    return y


# ======================================================================================================================
# Stages: each stored in the work folder, reused by --resume when made from the same images and settings
# ======================================================================================================================

def load_stage(path, ids, config):
    """A stage stored by save_stage for these ids and settings, or None."""
    if not path.is_file():
        return None
    st = common.torch_load(path)
    if st.get("ids") == ids and st.get("config") == config:
        common.print0(f"[{path.stem[5:]}] reused from {path}")
        return st
    common.print0(f"[{path.stem[5:]}] {path} was made for other images or settings: recomputing")
    return None


def save_stage(path, ids, config, maps, metrics, seconds):
    common.save_object(path, {"ids": ids, "config": config, "maps": maps, "metrics": metrics, "seconds": seconds})


def network_stage(name, train_images, labels, images, net, seed, device, work, resume, ids, config, sizes, gts):
    """A saliency network trained on `labels` of `train_images`, predicting `images`: a stage (reused when stored)."""
    st = load_stage(work / f"maps_{name}.pt", ids, config) if resume else None
    if st is None:
        t = time.time()
        model = train_saliency_network(train_images, labels, net, seed, device, work / f"{name}.pth", resume, name)
        maps = predict_saliency(model, images, net.size, net.batch_size, device, net.amp, images.shape[-1])
        st = {"maps": maps, "metrics": score(Maps(sizes, maps), gts, name), "seconds": time.time() - t}
        save_stage(work / f"maps_{name}.pt", ids, config, maps, st["metrics"], st["seconds"])
    return st


# ======================================================================================================================
# The three modes, each returning (the prior maps or None, the final maps, {stage: metrics}, {stage: seconds})
# ======================================================================================================================

def mine_unsupervised(images, sizes, gts, priors, prior_batch, rounds, prior_weight, fg_thresh, bg_thresh, net, seed,
                      device, work, resume, ids, config):
    """Priors → `rounds` saliency networks, each on the confident pixels of the last stage's maps."""
    S = images.shape[-1]
    metrics, seconds = {}, {}
    st = load_stage(work / "maps_priors.pt", ids, config) if resume else None
    if st is None:
        fused, t0 = torch.zeros(len(images), S, S), time.time()
        for name in priors:
            t = time.time()
            m = torch.empty(len(images), S, S, dtype=torch.uint8)
            for i in tqdm(range(0, len(images), prior_batch), desc=f"prior {name}", leave=False):
                x = images[i:i + prior_batch].to(device).float() / 255
                m[i:i + len(x)] = (PRIORS[name](x) * 255).round().to(torch.uint8).cpu()
            seconds[f"prior_{name}"] = time.time() - t
            common.print0(f"[prior {name}] {len(images) / seconds[f'prior_{name}']:.1f} images/s")
            metrics[f"prior_{name}"] = score(Maps(sizes, m), gts, f"prior_{name}")
            fused += m.float()
        maps = (fused / len(priors)).round().to(torch.uint8)
        metrics["priors"] = score(Maps(sizes, maps), gts, "priors")
        seconds["priors"] = time.time() - t0
        st = {"maps": maps, "metrics": metrics, "seconds": seconds}
        save_stage(work / "maps_priors.pt", ids, config, maps, metrics, seconds)
    prior = final = st["maps"]
    metrics, seconds = dict(st["metrics"]), dict(st["seconds"])
    for r in range(1, rounds + 1):
        # later rounds stay anchored to the priors: a young network calls most of its uncertain band object, and
        # relabelling from its maps alone snowballs (synthetic demo: 30 % → 57 % → 92 % of the pixels "object")
        target = final if r == 1 else (prior_weight * prior + (1 - prior_weight) * final.float()).round().byte()
        labels = pseudo_labels(target, fg_thresh, bg_thresh)
        common.print0(f"[round{r}] learns from the {(labels != common.IGNORE).float().mean():.0%} confident pixels of "
                      f"the {'priors' if r == 1 else f'round {r - 1} predictions mixed with the priors'}; "
                      f"{(labels == 1).float().mean():.0%} object")
        st = network_stage(f"round{r}", images, labels, images, net, seed + r, device, work, resume, ids, config,
                           sizes, gts)
        final = st["maps"]
        metrics[f"round{r}"], seconds[f"round{r}"] = st["metrics"], st["seconds"]
    return Maps(sizes, prior), Maps(sizes, final), metrics, seconds


def mine_supervised(images, sizes, gts, train_images, train_masks, net, seed, device, workers, work, resume, ids,
                    config):
    """One saliency network trained on labelled masks (e.g. DUTS-TR), predicting `images`."""
    S = images.shape[-1]
    tr = common.list_samples(train_images)
    masks = match_by_stem(train_masks, [s.id for s in tr], "training mask")
    tr_images, tr_masks, _ = load_resized([s.image for s in tr], S, workers, masks, desc="train images")
    st = network_stage("supervised", tr_images, tr_masks, images, net, seed, device, work, resume, ids, config, sizes,
                       gts)
    return None, Maps(sizes, st["maps"]), {"supervised": st["metrics"]}, {"supervised": st["seconds"]}


def mine_import(sizes, gts, import_maps, ids):
    """Maps of another tool, one grey file per image (any size)."""
    maps = Maps(sizes, files=match_by_stem(import_maps, ids, "saliency map"))
    t = time.time()
    return None, maps, {"imported": score(maps, gts, "imported")}, {"imported": time.time() - t}


# ======================================================================================================================

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    pos, frac = common.positive_int, common.nonnegative_float
    g = p.add_argument_group("data")
    g.add_argument("--data-root", nargs="+", required=True,
                   help="one or more VOC-layout roots or plain image folders: the images to mine masks for")
    common.add_download_arg(g)
    g.add_argument("--split", default=None, help="VOC split list to mine (default: every image in JPEGImages, so "
                   "that every split pretrain.py and kmeans_eval.py may read has its masks)")
    g.add_argument("--name", default="unsup", help="masks go to MASK_ROOT/saliency_<name>/ (pretrain.py reads "
                   "saliency_unsup by default)")
    g.add_argument("--mask-root", default=None, help="write saliency_<name>/ here instead of inside each data root "
                   "(for read-only data); pass the same --mask-root to pretrain.py and kmeans_eval.py")
    g.add_argument("--out", default="runs/mine_masks", help="work folder: checkpoints, stage maps, grid, summary")
    g.add_argument("--eval-masks", default=None, help="ground-truth masks (matched by file name) to score each stage")
    g = p.add_argument_group("mode (unsupervised when neither is given)")
    g.add_argument("--train-images", default=None, help="supervised mode: labeled saliency images (e.g. DUTS-TR)")
    g.add_argument("--train-masks", default=None, help="supervised mode: their masks, matched by file name")
    g.add_argument("--import-maps", default=None, help="import mode: grey saliency maps (any size) to post-process")
    g = p.add_argument_group("priors")
    g.add_argument("--priors", default="mbd,rbd", help=f"comma list of {', '.join(PRIORS)}; fused by their mean")
    g.add_argument("--prior-size", type=pos, default=224, help="images are resized to this square for the priors; "
                   "stage maps are kept at this size")
    g.add_argument("--prior-batch", type=pos, default=256, help="images per batch of the priors (MB+'s sweeps are "
                   "row by row: on an H200, 256 images a batch ran 7.7× faster than 32)")
    g = p.add_argument_group("network")
    g.add_argument("--arch", default="resnet50", choices=list(common.ARCH_CHANNELS), help="saliency network backbone")
    g.add_argument("--backbone-init", default="random", help="random, imagenet (torchvision's V1, needs a network), "
                   "imagenet-v2, or a ResNet / MoCo state-dict file")
    g.add_argument("--rounds", type=common.nonnegative_int, default=2,
                   help="networks trained one after another (1st on the priors, next on the last one's "
                        "predictions); 0 = masks straight from the priors")
    g.add_argument("--prior-weight", type=frac, default=0.5,
                   help="rounds after the first learn from this mix of priors and the last round's predictions "
                        "(0 = predictions alone, as DeepUSPS)")
    g.add_argument("--size", type=pos, default=224, help="network input size")
    g.add_argument("--epochs", type=pos, default=10, help="epochs per network")
    g.add_argument("--batch-size", type=pos, default=16, help="training and prediction batch")
    g.add_argument("--lr", type=common.positive_float, default=1e-3, help="AdamW, poly decay")
    g.add_argument("--wd", type=frac, default=1e-4, help="AdamW weight decay")
    g.add_argument("--fg-thresh", type=common.probability, default=0.7, help="pseudo-label: object where the map's "
                   "probability is above this")
    g.add_argument("--bg-thresh", type=common.probability, default=0.3, help="pseudo-label: background below this "
                   "probability; between: ignored")
    g = p.add_argument_group("proposals (Table 2a)")
    g.add_argument("--proposals", default="saliency", choices=["saliency", "components", "hierarchical"],
                   help="saliency: one object, the salient mask (the paper's); components: each connected component of "
                   "it an object; hierarchical: no saliency, the regions of a bottom-up merging of SLIC superpixels")
    g.add_argument("--merge-below", type=common.positive_float, default=25.0, help="hierarchical: adjacent regions "
                   "whose mean colours are closer than this (CIE Lab units) merge")
    g.add_argument("--max-region", type=common.probability, default=0.5, help="hierarchical: regions larger than this "
                   "share of the image are background")
    g = p.add_argument_group("post-processing and output")
    g.add_argument("--mask-threshold", type=common.probability, default=0.5, help="a pixel is object when its map's "
                   "probability is above this")
    g.add_argument("--min-area", type=common.probability, default=0.01,
                   help="contours and whole masks under this share of the image are removed / dropped")
    g.add_argument("--grid", type=common.nonnegative_int, default=6, help="images in the picture grid (0 = none)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (finished stages are reused, a "
                   "network in training continues from its last epoch)")
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
    if args.proposals == "hierarchical" and args.mode != "unsupervised":
        p.error(f"--proposals hierarchical uses no saliency: drop --{'import-maps' if args.import_maps else 'train-images'}")
    return args


def main(argv=None):
    # =========================================================================================================== args
    args = get_args(argv)
    common.resolve_download(args)
    common.single_process("mine_masks.py")
    device = common.setup_world(args.device).device
    work, S = Path(args.out), args.prior_size
    net = NetConfig(args.arch, args.backbone_init, args.size, args.epochs, args.batch_size, args.lr, args.wd,
                    args.workers, args.amp)
    # what a stored stage or network depends on (not --rounds: more rounds reuse the earlier ones)
    config = {"priors": args.priors, "prior_size": S, "net": asdict(net), "fg_thresh": args.fg_thresh,
              "bg_thresh": args.bg_thresh, "prior_weight": args.prior_weight, "seed": args.seed,
              "train_images": args.train_images, "train_masks": args.train_masks}

    # =========================================================================================================== data
    samples, dests = [], []  # the images to mine, and the folder each one's mask goes to
    for root in args.data_root:
        for s in common.list_samples(root, args.split):
            samples.append(s)
            dests.append(common.saliency_dir(root, args.name, args.mask_root))
    seen = {}
    for s, d in zip(samples, dests):
        if seen.setdefault((d, s.id), s.image) != s.image:
            raise common.UserError(f"{s.image}: id '{s.id}' also names {seen[(d, s.id)]}, and both masks would go to "
                                   f"{d}/{s.id}.png; mine them under different --mask-root or --name")
    ids = [s.id for s in samples]
    gt_paths = match_by_stem(args.eval_masks, ids, "ground-truth mask") if args.eval_masks else None
    # outputs are checked before the work: the work folder, and each mask folder (never overwritten silently)
    common.prepare_out(work, args.resume, ["summary.json", "maps_*.pt", "*.pth"])
    for d in sorted(set(dests)):
        common.prepare_out(d, args.resume, ["summary.json"], flag="--name or --mask-root")
    t0 = time.time()
    images, _, sizes = load_resized([s.image for s in samples], S, args.workers, desc="images")
    load_s = time.time() - t0
    common.print0(f"{len(ids)} images from {', '.join(args.data_root)}; mode {args.mode}; device {device}")
    gts = None
    if gt_paths:
        gts = []
        for path, s, hw in zip(gt_paths, samples, sizes.tolist()):
            g = common.read_mask(path)
            common.check_same_size(g, hw, path, s.image, "ground truth")
            gts.append(g >= 128 if g.max() == 255 else g > 0)  # a grey or 0/255 mask, or object ids

    # ================================================================================================ the maps, by mode
    if args.proposals == "hierarchical":  # no saliency maps: regions of the images themselves
        t = time.time()
        regions = hierarchical_regions(images, args.prior_batch, device, args.merge_below, args.max_region)
        prior, final, metrics, seconds = None, None, {}, {"regions": time.time() - t}
    elif args.mode == "unsupervised":
        prior, final, metrics, seconds = mine_unsupervised(
            images, sizes, gts, args.priors, args.prior_batch, args.rounds, args.prior_weight, args.fg_thresh,
            args.bg_thresh, net, args.seed, device, work, args.resume, ids, config)
    elif args.mode == "supervised":
        prior, final, metrics, seconds = mine_supervised(images, sizes, gts, args.train_images, args.train_masks, net,
                                                         args.seed, device, args.workers, work, args.resume, ids,
                                                         config)
    else:
        prior, final, metrics, seconds = mine_import(sizes, gts, args.import_maps, ids)

    # ======================================================================= post-processing, masks at original size
    t = time.time()
    kept, dropped, shares, shown = {}, {}, [], []
    final_meter = SaliencyMeter() if gts is not None else None
    n_objects = []
    for i in tqdm(range(len(ids)), desc="masks", leave=False):
        if args.proposals == "hierarchical":  # the regions at the image's size, each under the area rule
            hw = tuple(int(v) for v in sizes[i])
            objects = area_rule(F.interpolate(regions[i][None, None], size=hw, mode="nearest")[0, 0].numpy(),
                                args.min_area)
            share = float((objects > 0).mean())
            reason = None if objects.any() else f"no region between {args.min_area:.0%} and {args.max_region:.0%}"
        else:
            mask, share, reason = postprocess(final.at(i).numpy(), args.mask_threshold, args.min_area)
            objects = common.components(mask, args.min_area) if args.proposals == "components" else mask.astype(np.uint8)
            if args.proposals == "components" and not objects.any():
                reason = reason or f"no component of {args.min_area:.0%} of the image"
        png = dests[i] / f"{ids[i]}.png"
        if reason:
            dropped[(dests[i], ids[i])] = reason
            png.unlink(missing_ok=True)  # a mask left by an earlier run would contradict dropped.txt
            objects = np.zeros_like(objects)
        else:
            kept[(dests[i], ids[i])] = share
            shares.append(share)
            n_objects.append(int(objects.max()))
            common.save_objects_png(objects, png)
        if final_meter is not None:
            final_meter.add(torch.from_numpy(objects > 0).float(), gts[i])
        if i < args.grid:
            shown.append(torch.from_numpy(objects))
    seconds["postprocess"] = time.time() - t
    if not kept:
        raise common.UserError(f"every one of the {len(ids)} images was dropped (under {args.min_area:.0%} object "
                               f"after post-processing, e.g. {ids[0]}: {next(iter(dropped.values()))}); no mask was "
                               "written: check the maps (or --mask-threshold / --min-area)")
    if final_meter is not None:
        metrics["final_masks"] = final_meter.result()
        r = metrics["final_masks"]
        common.print0(f"  {'final masks':<14} MAE {r['mae']:.3f}  max-F {r['max_f']:.3f}  IoU {r['iou']:.3f}"
                      "  (dropped images count as empty)")

    # ========================================================= picture: image | prior | prediction | mask | truth
    if args.grid > 0:
        tiles, ncol = [], 0
        for i, mask in enumerate(shown):
            row = [images[i]] + [(F.interpolate(m.at(i)[None, None], size=(S, S), mode="bilinear")[0] * 255).byte()
                                 .expand(3, -1, -1) for m in (prior, final) if m is not None]
            row.append(common.colorize(F.interpolate(mask[None, None].float(), size=(S, S))[0, 0]))  # the objects
            if gts is not None:
                row.append((F.interpolate(gts[i][None, None].float(), size=(S, S))[0] * 255).byte().expand(3, -1, -1))
            tiles += row
            ncol = len(row)
        common.save_grid(tiles, work / "grid.png", ncol, size=min(S, 160))

    # =========================================================== save: dropped.txt and summary.json per mask folder
    n = len(ids)
    summary = {
        "mode": args.mode, "proposals": args.proposals, "images": n, "kept": len(kept), "dropped": len(dropped),
        "mean_foreground_share": float(np.mean(shares)),
        "objects_per_image": {"mean": float(np.mean(n_objects)), "max": max(n_objects),
                              "histogram": {str(k): n_objects.count(k) for k in sorted(set(n_objects))}},
        "stages": {k: m for k, m in metrics.items() if m is not None},
        "seconds": {"load": round(load_s, 2), **{k: round(v, 2) for k, v in seconds.items()}},
        "images_per_second": {k: round(n / v, 1) for k, v in seconds.items() if k.startswith("prior_") and v > 0},
        "dropped_why": {i: why for (_, i), why in dropped.items()},
        "args": vars(args), "device": str(device),
    }
    for d in sorted(set(dests)):
        mine = sorted(i for (dd, i) in dropped if dd == d)
        common.write_text(d / "dropped.txt", "".join(f"{i}\n" for i in mine))
        common.write_json(d / "summary.json", {**summary, "folder_kept": sum(1 for (dd, _) in kept if dd == d),
                                               "folder_dropped": len(mine)})
    common.write_json(work / "summary.json", summary)
    if summary["stages"]:
        common.print_table([(k, f"{m['mae']:.3f}", f"{m['max_f']:.3f}", f"{m['iou']:.3f}")
                            for k, m in summary["stages"].items()], ["stage", "MAE", "max-F", "IoU@0.5"])
    common.print0(f"{len(kept)} masks written to {', '.join(str(d) for d in sorted(set(dests)))}; "
                  f"{len(dropped)} images dropped (listed in dropped.txt); mean foreground "
                  f"{summary['mean_foreground_share']:.1%}; {summary['objects_per_image']['mean']:.2f} objects an image")


if __name__ == "__main__":
    common.run_main(main)
