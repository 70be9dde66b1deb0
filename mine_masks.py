r"""Mine object masks from raw images, no labels and no downloads: paper Sec. 3.2's "mask proposals" (the masks
pretrain.py contrasts) and Table 2a's three sources of them (--proposals). The paper takes them from an off-the-shelf
saliency estimator, unsupervised (DeepUSPS, Nguyen et al. NeurIPS 2019) or supervised (BAS-Net trained on DUTS); the
release ships only the PNGs. This script makes them, in one of three modes:
1. unsupervised (default): two classical priors batched in torch and fused by their mean, "mbd" (MB+, Zhang et al.
   ICCV 2015) and "rbd" (Zhu et al. CVPR 2014, on SLIC superpixels), then --rounds saliency networks (SegModel's
   1-channel head), the first on the priors' confident pixels, each next on its predecessor's flip-averaged
   predictions mixed with the priors (DeepUSPS's and the paper's bootstrapping);
2. supervised (--train-images DIR --train-masks DIR, e.g. DUTS-TR): the same network trained on real masks;
3. import (--import-maps DIR): saliency maps from any other tool (grey images of any size), only post-processed.
Post-processing (the release's): threshold strictly above 0.5, remove every contour whose filled area is under 1 % of
the image, drop the image when under 1 % of it is object. --proposals saliency (default) keeps that mask as one
object; components makes each connected component passing the area rule an object; hierarchical uses no saliency:
SLIC superpixels merged bottom-up by colour, each region between 1 % and --max-region of the image an object. Masks go
to MASK_ROOT/saliency_<name>/<id>.png (MASK_ROOT: each data root, unless --mask-root) at the image's size, 0/255 or
object ids 1…M (palette PNG), with dropped.txt and summary.json beside them: what pretrain.py and kmeans_eval.py read.

Commands (scored against ground truth: --eval-masks; Table 2a: --proposals components or hierarchical)
  python mine_masks.py --data-root VOC
  python mine_masks.py --data-root ECSSD/images --mask-root runs/ecssd --eval-masks ECSSD/masks --out runs/mine_ecssd
  python mine_masks.py --data-root VOC --name sup --train-images DUTS-TR/images --train-masks DUTS-TR/masks
  python mine_masks.py --data-root VOC --name basnet --import-maps basnet_maps/
  python mine_masks.py --data-root VOC --name hierarchical --proposals hierarchical
Images are read in chunks of 256 and each stage's maps go to an .npy file in --out, so memory does not grow with the
images; --resume continues a stage after its last finished chunk. Under torchrun each process mines its share of the
chunks and the networks train with DDP (--batch-size stays global); across machines --out and the mask folders must
be on a shared file system.
  torchrun --nproc_per_node 4 mine_masks.py --data-root COCO/train2017 --mask-root runs/coco_masks
"""
import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

import common


# ======================================================================================================================
# The classical priors

# ----------------------------------------------------------------------------------------------------------------------
# Prior 1: minimum-barrier distance (Zhang et al. ICCV 2015, MB+)

def rgb_to_lab(x):
    """B×3×H×W RGB in [0, 1] → CIE Lab (D65 white): L in [0, 100], a and b roughly in [-110, 110]."""
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
    """One forward and one backward sweep over the rows of N×H×W maps, in place: a pixel takes the path through
    its (already swept) neighbour row when that path's barrier maxU×I − minL×I is lower. A whole row is one
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
    """Minimum-barrier distance of each pixel to the image border for N×H×W uint8 maps (FastMBD: sweeps down,
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
    """Otsu's threshold of each map of a B×H×W batch in [0, 1]."""
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
    """MB+ saliency of a B×3×H×W batch in [0, 1] → B×H×W in [0, 1]."""
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

def slic_cell(size, grid=16, cell=8):
    """The SLIC lattice's cell for an image of `size`: no finer lattice than the image itself."""
    return min(cell, max(2, round(size / grid)))


def slic(lab, grid=16, cell=8, compactness=10.0, iters=5):
    """SLIC superpixels on a grid×grid lattice, the image resampled to (grid·cell)²: each pixel joins the nearest
    (Lab + scaled position) of the 9 centres around its own block, as one batched matmul. Returns labels B×n×n
    in [0, grid²), pixel counts B×K and centres B×K×5: mean Lab and mean position (× compactness / cell)."""
    B, g, n = lab.shape[0], grid, grid * cell
    x = F.interpolate(lab, size=(n, n), mode="bilinear", align_corners=False, antialias=True)
    r = torch.arange(n, device=lab.device, dtype=lab.dtype) * (compactness / cell)
    f = torch.cat([x, r.view(1, 1, n, 1).expand(B, 1, n, n), r.view(1, 1, 1, n).expand(B, 1, n, n)], 1)
    blocks = f.view(B, 5, g, cell, g, cell).permute(0, 2, 4, 3, 5, 1).reshape(B * g * g, cell * cell, 5)
    cen = blocks.mean(1).view(B, g, g, 5).permute(0, 3, 1, 2)  # B×5×g×g
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
    """Robust-background-detection saliency of a B×3×H×W batch in [0, 1] → B×H×W in [0, 1]; the sigmas and
    mu are the paper's."""
    B, _, H, W = rgb.shape
    dev = rgb.device
    lab = rgb_to_lab(rgb)
    cell = slic_cell(min(H, W), grid, cell)
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

def merge_regions(label, lab, count, merge_below=25.0, max_region=0.5):
    """A hierarchical segmentation of one image, bottom-up from its SLIC superpixels (label: n×n ids in [0, K); lab:
    their mean CIE Lab colours K×3; count: their pixels (K,)): the two adjacent regions whose mean colours are
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
    prior computes them) merged by merge_regions. Returns N×n×n uint8 region ids."""
    out = []
    for i in range(0, len(images), batch):
        lab = rgb_to_lab(images[i:i + batch].to(device).float() / 255)
        label, cnt, cen = slic(lab, cell=slic_cell(images.shape[-1]))
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
    round(255·p) ≥ k; 0/0 counts as 0) are averaged over images first, F-beta taken on the means, then the max.
    Kept as sums (`sums`: images, MAE, IoU, precision[256], recall[256]), so that memory does not grow with the
    images and processes can add theirs up."""

    def __init__(self, beta2=0.3):
        self.beta2, self.sums = beta2, torch.zeros(3 + 2 * 256, dtype=torch.float64)

    def add(self, prob, gt):
        prob, gt = torch.as_tensor(prob, dtype=torch.float32), torch.as_tensor(gt).bool()
        mae = (prob - gt.float()).abs().mean().double()
        q = (prob * 255).round().long().clamp(0, 255)
        hist = torch.bincount((q + 256 * gt).flatten(), minlength=512).view(2, 256)  # [background, object] × level
        fp, tp = hist.flip(1).cumsum(1).flip(1).double()  # tp[k]: object pixels with round(255 p) ≥ k
        n_fg = tp[0]
        prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
        rec = tp / n_fg if n_fg > 0 else torch.zeros_like(tp)
        union = n_fg + fp[128]  # p ≥ 0.5 ⇔ round(255 p) ≥ 128
        iou = tp[128] / union if union > 0 else torch.tensor(1.0, dtype=torch.float64)
        self.sums += torch.cat([torch.stack([torch.tensor(1.0, dtype=torch.float64), mae, iou]), prec, rec])

    def result(self):
        n = self.sums[0]
        p, r = self.sums[3:259] / n, self.sums[259:] / n
        f = (1 + self.beta2) * p * r / (self.beta2 * p + r).clamp(min=1e-12)
        return {"mae": float(self.sums[1] / n), "max_f": float(f.max()), "iou": float(self.sums[2] / n),
                "images": int(n)}


# ======================================================================================================================
# Streaming: images read from disk in chunks, each stage's maps in an .npy array file of the work folder

CHUNK = 256  # images per chunk: the unit of work of a process, and of --resume within a stage


class Resized(torch.utils.data.Dataset):
    """Images decoded and resized to size×size uint8 3×S×S."""

    def __init__(self, images, size):
        self.images, self.size = images, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return v2.functional.resize(common.read_image(self.images[i]), [self.size, self.size], antialias=True)


def chunks(n, world):
    """This process's chunks: (index, first image, end) for every world.size-th chunk from its rank."""
    return [(c, c * CHUNK, min(n, (c + 1) * CHUNK)) for c in range(world.rank, -(-n // CHUNK), world.size)]


def chunk_images(images, size, todo, workers):
    """The images of each chunk in `todo`, one uint8 n×3×S×S tensor per chunk, read by DataLoader workers."""
    return torch.utils.data.DataLoader(Resized(images, size), batch_sampler=[list(range(a, b)) for _, a, b in todo],
                                       num_workers=workers)


def barrier(world):
    if world.size > 1:
        dist.barrier()


class MapFile:
    """One stage's uint8 maps N×S×S in an .npy file of the work folder, written a chunk and read a map at a time
    with plain file I/O: no memory map, whose touched pages would stay in the process's memory, so that memory does
    not grow with the images."""

    def __init__(self, path, shape=None):
        if shape is not None:  # a new file: the .npy header, then N·S·S zero bytes (sparse on disk until written)
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                f.truncate(f.tell() + int(np.prod(shape)))
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, self.offset = header(f)[0], f.tell()
        self.path, self.row = path, int(np.prod(self.shape[1:]))

    def __getitem__(self, i):
        with open(self.path, "rb") as f:
            f.seek(self.offset + i * self.row)
            return np.frombuffer(f.read(self.row), np.uint8).reshape(self.shape[1:])

    def write(self, first, rows):
        with open(self.path, "r+b") as f:
            f.seek(self.offset + first * self.row)
            f.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())


def stage_arrays(run, stage, names, shape):
    """The MapFiles work/maps_<name>.npy of `shape` for the outputs `names` of one stage, with the stage's chunk
    flags (work/<stage>.done.npy, set once a chunk's rows are on disk) and settings (<stage>.json). With --resume and
    the same settings the files are reopened and the finished chunks kept; else made afresh."""
    work, world, config = run.work, run.world, {**run.config, "stage": stage}
    meta, done_path = work / f"{stage}.json", work / f"{stage}.done.npy"
    paths = [work / f"maps_{n}.npy" for n in names]
    same = run.resume and meta.is_file() and json.loads(meta.read_text()) == config and all(p.is_file() for p in paths)
    if not same and world.is_main:
        for p in paths:
            MapFile(p, shape)
        np.save(done_path, np.zeros(-(-shape[0] // CHUNK), bool))
        common.write_json(meta, config)
    barrier(world)
    return [MapFile(p) for p in paths], np.load(done_path, mmap_mode="r+")


def stage_done(run, stage):
    """Whether --resume finds this stage finished with these settings."""
    meta, done = run.work / f"{stage}.json", run.work / f"{stage}.done.npy"
    return bool(run.resume and meta.is_file() and json.loads(meta.read_text()) == {**run.config, "stage": stage}
                and done.is_file() and np.load(done).all())


def fill_stage(run, stage, names, shape, produce):
    """Run `produce` (a chunk's uint8 images n×3×S×S → one uint8 array per name) over this process's unfinished
    chunks, writing each chunk's rows before its flag. Returns (the arrays, read-only, once every process is done;
    seconds)."""
    arrays, done = stage_arrays(run, stage, names, shape)
    todo = [c for c in chunks(shape[0], run.world) if not done[c[0]]]
    if done.all():
        common.print0(f"[{stage}] reused from {run.work}")
    t = time.time()
    for (c, a, b), x in zip(todo, tqdm(chunk_images(run.images, run.size, todo, run.workers), desc=stage,
                                       total=len(todo), leave=False, disable=not todo)):
        for arr, rows in zip(arrays, produce(x)):
            arr.write(a, np.asarray(rows))
        done[c] = True
        done.flush()
    seconds = time.time() - t
    barrier(run.world)
    return arrays, seconds


def score(maps, images, gt_paths, world, name):
    """The metrics of one stage's maps (S×S, uint8) against the ground truth at each image's original size, every
    process scoring its share of the images (None without --eval-masks)."""
    if gt_paths is None:
        return None
    meter = SaliencyMeter()
    for i in range(world.rank, len(images), world.size):
        gt = read_gt(gt_paths[i], images[i])
        meter.add(map_at(maps, i, gt.shape), gt)
    if world.size > 1:
        dist.all_reduce(meter.sums)
    r = meter.result()
    common.print0(f"  {name:<14} MAE {r['mae']:.3f}  max-F {r['max_f']:.3f}  IoU {r['iou']:.3f}")
    return r


def map_at(maps, i, hw):
    """Map i — a row of a stage's uint8 array, or an imported grey file of any size — at size hw, float in [0, 1]
    (resized bilinearly)."""
    m = read_grey(maps[i]) if isinstance(maps, list) else torch.from_numpy(np.array(maps[i])).float() / 255
    if tuple(m.shape) == tuple(hw):
        return m
    return F.interpolate(m[None, None], size=tuple(hw), mode="bilinear", align_corners=False)[0, 0]


def read_gt(path, image):
    """A ground-truth mask as bool H×W: a grey or 0/255 mask thresholded at 128, or object ids > 0."""
    g = common.read_mask(path)
    common.check_same_size(g, common.image_size(image), path, image, "ground truth")
    return g >= 128 if g.max() == 255 else g > 0


def read_grey(path):
    """A saliency map of any mode as H×W float in [0, 1]."""
    return common.read_mask(path).float() / 255


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


class PseudoLabels:
    """Image i's labels 0 / 1 / IGNORE S×S from stored maps: the confident pixels of `target` (or, with a
    `prior` and weight w < 1 after the first round, of the mix w·prior + (1 − w)·target). Opens the map files
    arrays lazily, in each loader worker."""

    def __init__(self, target, fg, bg, prior=None, weight=0.0):
        self.paths, self.fg, self.bg, self.weight, self.maps = (target, prior), fg, bg, weight, None

    def __call__(self, i):
        if self.maps is None:
            self.maps = [MapFile(p) if p else None for p in self.paths]
        target, prior = self.maps
        m = torch.from_numpy(np.array(target[i]))
        if prior is not None:
            m = (self.weight * torch.from_numpy(np.array(prior[i])) + (1 - self.weight) * m.float()).round().byte()
        return pseudo_labels(m, self.fg, self.bg)


class MaskLabels:
    """Image i's labels 0 / 1 from a mask file (supervised mode), resized to S×S."""

    def __init__(self, masks, images, size):
        self.masks, self.images, self.size = masks, images, size

    def __call__(self, i):
        m = common.read_mask(self.masks[i])
        common.check_same_size(m, common.image_size(self.images[i]), self.masks[i], self.images[i], "mask")
        return (v2.functional.resize(m[None].float(), [self.size, self.size], antialias=True)[0] >= 128).byte()


class Labelled(torch.utils.data.Dataset):
    """A random view (crop, flip, as pretrain.py's) of an image read from disk at S×S and its labels, with colour
    parameters for the device; items are (index, seed) from common.SeededSampler."""

    def __init__(self, images, labels, size, out_size):
        self.images, self.labels, self.size, self.out = Resized(images, size), labels, size, out_size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, seed = item
        x, y = self.images[i], self.labels(i)
        with common.seeded(seed):
            view = common.draw_view(x.shape[-2:], scale=(0.3, 1.0))
        return (common.crop_view(x, view, self.out), common.crop_view(y, view, self.out),
                common.draw_color_params(np.random.default_rng(seed)))


def train_saliency_network(data, net, seed, world, checkpoint, resume, tag):
    """A fresh SegModel whose saliency head learns the labels of `data` (a Labelled set) with BCE over the labelled
    pixels, AdamW with a poly schedule, DDP under torchrun (--batch-size stays global); checkpointed every epoch, and
    resumed exactly from `checkpoint` when `resume` and it was made with the same settings."""
    device = world.device
    common.seed_all(seed)
    model = common.SegModel(net.arch, saliency_head=True)
    report = common.load_backbone_weights(model.backbone, net.backbone_init, net.arch)
    model.head.requires_grad_(False)  # the embedding head takes no part (and DDP wants every trained weight used)
    model.to(device)
    ddp = model if world.size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = net.batch_size // world.size
    if len(data) < net.batch_size or per_rank < 2:
        raise common.UserError(f"{len(data)} training images and --batch-size {net.batch_size}: a batch needs at least "
                               f"2 images (BatchNorm) per process and the set at least one batch")
    sampler = common.SeededSampler(len(data), seed, world.rank, world.size)
    loader = torch.utils.data.DataLoader(data, batch_size=per_rank, sampler=sampler, drop_last=True,
                                         num_workers=net.workers, persistent_workers=net.workers > 0,
                                         generator=torch.Generator())
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=net.lr, weight_decay=net.wd)
    step = common.TrainStep(optimizer, [model], device, net.amp,
                            advice=f"a learning rate too high (--lr {net.lr:g})")
    total, start, made_with = net.epochs * len(loader), 0, {"net": asdict(net), "seed": seed}
    ck = None
    if resume and checkpoint.is_file():
        ck = common.restart_from_checkpoint(checkpoint, "saliency", made_with, afresh_on_change=True, model=model,
                                            optimizer=optimizer, train_step=step)
    if ck:
        start, step.checkpoint = ck["epoch"], checkpoint
    common.print0(f"[{tag}] {len(data)} images, {total} steps; {report}")
    for epoch in range(start, net.epochs):
        sampler.set_epoch(epoch)
        common.seed_all(seed, epoch, world.rank)
        ddp.train()
        loss_sum = torch.zeros((), device=device)
        for it, (x, y, c) in enumerate(tqdm(loader, desc=f"[{tag}] epoch {epoch + 1}/{net.epochs}", leave=False,
                                            disable=not world.is_main)):
            for g in optimizer.param_groups:
                g["lr"] = common.poly_lr(net.lr, epoch * len(loader) + it, total)
            x, y, c = x.to(device, non_blocking=True), y.to(device, non_blocking=True), c.to(device, non_blocking=True)
            x = common.normalize(common.apply_color_params(x.float() / 255, c))
            with common.autocast(device, net.amp):
                logit = ddp(x).saliency
            labelled = (y != common.IGNORE).float()
            bce = F.binary_cross_entropy_with_logits(logit.float(), y.clamp(max=1).float(), reduction="none")
            loss = (bce * labelled).sum() / labelled.sum().clamp(min=1)  # over the labelled pixels, no host sync
            loss_sum += step(loss)
        step.check(f"[{tag}] epoch {epoch + 1}")
        if world.size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world.size
        common.print0(f"[{tag}] epoch {epoch + 1}/{net.epochs} loss {float(loss_sum) / len(loader):.4f}")
        if world.is_main:
            common.save_checkpoint(checkpoint, "saliency", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   train_step=step.state_dict(), epoch=epoch + 1, made_with=made_with,
                                   args={"arch": net.arch})
        barrier(world)
        step.checkpoint = checkpoint
    return model


@torch.no_grad()
def predict_saliency(model, images, size, batch_size, device, amp, out_size):
    """Saliency probabilities of uint8 images N×3×S×S, averaged with those of their mirror image, as uint8 maps
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
            p = torch.sigmoid(model(x).saliency.float())
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
# The stages, each returning its maps (MapFiles, S×S) and filling `metrics` and `seconds`

@dataclass
class Run:
    """What every stage shares: the images to mine, where the work goes, this process, the stored settings."""
    images: list
    gt_paths: list
    work: Path
    size: int
    world: object
    workers: int
    resume: bool
    config: dict


def priors_stage(run, priors, batch, metrics, seconds):
    """The priors of every image and their mean, the fused prior map (each prior's own maps are stored too when
    there is a ground truth to score them on)."""
    each = run.gt_paths is not None

    def produce(x):
        maps = []
        for name in priors:
            m = torch.cat([PRIORS[name](x[i:i + batch].to(run.world.device).float() / 255).cpu()
                           for i in range(0, len(x), batch)])
            maps.append((m * 255).round().to(torch.uint8))
        return (maps if each else []) + [(torch.stack(maps).float().mean(0)).round().to(torch.uint8)]

    names = [f"prior_{p}" for p in priors if each] + ["priors"]
    shape = (len(run.images), run.size, run.size)
    arrays, s = fill_stage(run, "priors", names, shape, produce)
    for name, arr in zip(names, arrays):
        metrics[name] = score(arr, run.images, run.gt_paths, run.world, name)
    seconds["priors"] = s
    return arrays[-1]


def network_stage(run, name, data, net, seed, metrics, seconds):
    """A saliency network trained on `data` (a Labelled set), then its maps of every image."""
    t = time.time()
    model = None if stage_done(run, name) else \
        train_saliency_network(data, net, seed, run.world, run.work / f"{name}.pth", run.resume, name)
    shape = (len(run.images), run.size, run.size)
    produce = lambda x: [predict_saliency(model, x, net.size, net.batch_size, run.world.device, net.amp,  # noqa: E731
                                          run.size)]
    (maps,), _ = fill_stage(run, name, [name], shape, produce)
    metrics[name], seconds[name] = score(maps, run.images, run.gt_paths, run.world, name), time.time() - t
    return maps


@dataclass
class Bootstrap:
    """The unsupervised mode's settings: the priors (their batch), then `rounds` networks, each on the pixels of the
    last maps above `fg` (object) or below `bg` (background), after the first mixed with the priors by
    `prior_weight`."""
    priors: list
    prior_batch: int = 256
    rounds: int = 2
    prior_weight: float = 0.5
    fg: float = 0.7
    bg: float = 0.3
    seed: int = 0


def mine_unsupervised(run, boot, net, metrics, seconds):
    """Priors → boot.rounds saliency networks, each on the confident pixels of the last stage's maps."""
    fg, bg = boot.fg, boot.bg
    final = priors_stage(run, boot.priors, boot.prior_batch, metrics, seconds)
    for r in range(1, boot.rounds + 1):
        # later rounds stay anchored to the priors: a young network calls most of its uncertain band object, and
        # relabelling from its maps alone snowballs (synthetic demo: 30 % → 57 % → 92 % of the pixels "object")
        target = run.work / f"maps_{'priors' if r == 1 else f'round{r - 1}'}.npy"
        labels = PseudoLabels(target, fg, bg, run.work / "maps_priors.npy" if r > 1 else None, boot.prior_weight)
        common.print0(f"[round{r}] learns from the confident pixels (> {fg}, < {bg}) of the "
                      f"{'priors' if r == 1 else f'round {r - 1} predictions mixed with the priors'}")
        data = Labelled(run.images, labels, run.size, net.size)
        final = network_stage(run, f"round{r}", data, net, boot.seed + r, metrics, seconds)
    return final


def regions_stage(run, batch, merge_below, max_region, seconds):
    """Table 2a's hierarchical segmentation: every image's regions, uint8 ids on the superpixel lattice."""
    n = 16 * slic_cell(run.size)  # slic's lattice: grid × cell
    produce = lambda x: [hierarchical_regions(x, batch, run.world.device, merge_below, max_region)]  # noqa: E731
    (regions,), seconds["regions"] = fill_stage(run, "regions", ["regions"], (len(run.images), n, n), produce)
    return regions


def post_process(i, run, maps, proposals, threshold, min_area, max_region):
    """Image i's objects at its original size (`proposals` as --proposals) from its row of `maps` (a stage's
    MapFile, or the imported files), its foreground share and why it is dropped (or None)."""
    hw = common.image_size(run.images[i])
    if proposals == "hierarchical":  # the regions at the image's size, each under the area rule
        regions = torch.from_numpy(np.array(maps[i]))[None, None]
        objects = area_rule(F.interpolate(regions, size=hw, mode="nearest")[0, 0].numpy(), min_area)
        reason = None if objects.any() else f"no region between {min_area:.0%} and {max_region:.0%}"
        return objects, float((objects > 0).mean()), reason
    mask, share, reason = postprocess(map_at(maps, i, hw).numpy(), threshold, min_area)
    if proposals == "saliency":
        return mask.astype(np.uint8), share, reason
    objects = common.components(mask, min_area)
    return objects, share, reason or (None if objects.any() else f"no component of {min_area:.0%} of the image")


def mining_targets(roots, split, name, mask_root):
    """The images to mine and the folder each one's mask goes to (MASK_ROOT/saliency_<name>/); two images whose
    masks would land on the same file are refused."""
    samples, dests, seen = [], [], {}
    for root in roots:
        for s in common.list_samples(root, split):
            d = common.saliency_dir(root, name, mask_root)
            if seen.setdefault((d, s.id), s.image) != s.image:
                raise common.UserError(f"{s.image}: id '{s.id}' also names {seen[(d, s.id)]}, and both masks would go "
                                       f"to {d}/{s.id}.png; mine them under different --mask-root or --name")
            samples.append(s)
            dests.append(d)
    return samples, dests


def save_picture(run, masks, prior, final):
    """work/grid.png, a row per image of `masks` (the first images): the image, its prior and final maps (when given),
    its objects, its ground truth."""
    S, tiles = run.size, []
    for i, png in enumerate(masks):
        row = [Resized(run.images, S)[i]]
        for m in (prior, final):
            if m is not None:
                row.append(torch.from_numpy(np.array(m[i]))[None].expand(3, -1, -1))
        objects = common.read_objects(png) if png.exists() else torch.zeros(1, 1, dtype=torch.uint8)
        row.append(common.colorize(F.interpolate(objects[None, None].float(), size=(S, S))[0, 0]))
        if run.gt_paths:
            gt = read_gt(run.gt_paths[i], run.images[i])
            row.append((F.interpolate(gt[None, None].float(), size=(S, S))[0] * 255).byte().expand(3, -1, -1))
        tiles += row
    common.save_grid(tiles, run.work / "grid.png", len(row), size=min(S, 160))


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
    g.add_argument("--prior-batch", type=pos, default=None, help="images per batch of the priors; default 256 on "
                   "CUDA (MB+'s sweeps are row by row: on an H200, 7.7× faster than 32), 32 on the CPU (1.4× faster "
                   "than 256 there, 0.75 GiB less)")
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
        p.error("--proposals hierarchical uses no saliency: drop --" + ("import-maps" if args.import_maps else
                                                                         "train-images"))
    return args


def main(argv=None):
    # ================================================================================================== args, runtime
    args = get_args(argv)
    common.resolve_download(args)
    world = common.setup_world(args.device)
    args.prior_batch = args.prior_batch or (256 if world.device.type == "cuda" else 32)
    work, S = Path(args.out), args.prior_size
    net = NetConfig(args.arch, args.backbone_init, args.size, args.epochs, args.batch_size, args.lr, args.wd,
                    args.workers, args.amp)

    # =========================================================================================================== data
    samples, dests = mining_targets(args.data_root, args.split, args.name, args.mask_root)
    ids, images = [s.id for s in samples], [s.image for s in samples]
    gt_paths = match_by_stem(args.eval_masks, ids, "ground-truth mask") if args.eval_masks else None
    import_files = match_by_stem(args.import_maps, ids, "saliency map") if args.import_maps else None
    # outputs are checked before the work: the work folder, and each mask folder (never overwritten silently)
    common.prepare_out(work, args.resume, ["summary.json", "maps_*.npy", "*.pth"], is_main=world.is_main)
    for d in sorted(set(dests)):
        common.prepare_out(d, args.resume, ["summary.json"], flag="--name or --mask-root", is_main=world.is_main)
    barrier(world)
    # what the stored stages depend on (not --rounds: more rounds reuse the earlier ones)
    digest = hashlib.sha1("\n".join(map(str, images)).encode()).hexdigest()
    config = {"images": digest, "priors": args.priors, "prior_size": S, "net": asdict(net),
              "fg_thresh": args.fg_thresh, "bg_thresh": args.bg_thresh, "prior_weight": args.prior_weight,
              "seed": args.seed, "train_images": args.train_images, "train_masks": args.train_masks,
              "merge_below": args.merge_below, "max_region": args.max_region}
    run = Run(images, gt_paths, work, S, world, args.workers, args.resume, config)
    common.print0(f"{len(ids)} images from {', '.join(args.data_root)}; mode {args.mode}, proposals "
                  f"{args.proposals}; device {world.device}, {world.size} process(es)")

    # ================================================================================================ the maps, by mode
    metrics, seconds = {}, {}
    if args.proposals == "hierarchical":  # no saliency maps: regions of the images themselves
        maps = regions_stage(run, args.prior_batch, args.merge_below, args.max_region, seconds)
    elif args.mode == "unsupervised":
        boot = Bootstrap(args.priors, args.prior_batch, args.rounds, args.prior_weight, args.fg_thresh, args.bg_thresh,
                         args.seed)
        maps = mine_unsupervised(run, boot, net, metrics, seconds)
    elif args.mode == "supervised":
        tr = [s.image for s in common.list_samples(args.train_images)]
        masks = match_by_stem(args.train_masks, [Path(p).stem for p in tr], "training mask")
        maps = network_stage(run, "supervised", Labelled(tr, MaskLabels(masks, tr, S), S, net.size), net, args.seed,
                             metrics, seconds)
    else:
        maps = None
        metrics["imported"] = score(import_files, images, gt_paths, world, "imported")

    # ========================================= post-processing: each process writes the masks of its share at full size
    t = time.time()
    records, meter = [], SaliencyMeter() if gt_paths else None
    for i in tqdm(range(world.rank, len(ids), world.size), desc="masks", leave=False, disable=not world.is_main):
        objects, share, reason = post_process(i, run, import_files or maps, args.proposals, args.mask_threshold,
                                              args.min_area, args.max_region)
        png = dests[i] / f"{ids[i]}.png"
        if reason:
            png.unlink(missing_ok=True)  # a mask left by an earlier run would contradict dropped.txt
            objects = np.zeros_like(objects)
        else:
            common.save_objects_png(objects, png)
        if meter is not None:
            meter.add(torch.from_numpy(objects > 0).float(), read_gt(gt_paths[i], images[i]))
        records.append((i, share, int(objects.max()), reason))
    seconds["postprocess"] = time.time() - t
    if world.size > 1:
        gathered = [None] * world.size
        dist.all_gather_object(gathered, records)
        records = sorted(r for part in gathered for r in part)
        if meter is not None:
            dist.all_reduce(meter.sums)
    kept = [r for r in records if r[3] is None]
    if not kept:
        raise common.UserError(f"every one of the {len(ids)} images was dropped (under {args.min_area:.0%} object "
                               f"after post-processing, e.g. {ids[0]}: {records[0][3]}); no mask was written: "
                               "check the maps (or --mask-threshold / --min-area)")
    if meter is not None:
        metrics["final_masks"] = r = meter.result()
        common.print0(f"  {'final masks':<14} MAE {r['mae']:.3f}  max-F {r['max_f']:.3f}  IoU {r['iou']:.3f}"
                      "  (dropped images count as empty)")
    if dist.is_initialized():  # the rest is rank 0's: pictures and summaries
        dist.destroy_process_group()
    if not world.is_main:
        return None

    # ========================================================= picture: image | prior | prediction | objects | truth
    if args.grid > 0:
        prior = MapFile(work / "maps_priors.npy") if args.mode == "unsupervised" and maps is not None \
            and args.proposals != "hierarchical" else None
        save_picture(run, [dests[i] / f"{ids[i]}.png" for i in range(min(args.grid, len(ids)))], prior,
                     maps if args.proposals != "hierarchical" else None)

    # =========================================================== save: dropped.txt and summary.json per mask folder
    n, n_objects = len(ids), [r[2] for r in kept]
    dropped = {ids[r[0]]: r[3] for r in records if r[3] is not None}
    summary = {
        "mode": args.mode, "proposals": args.proposals, "images": n, "kept": len(kept), "dropped": len(dropped),
        "mean_foreground_share": float(np.mean([r[1] for r in kept])),
        "objects_per_image": {"mean": float(np.mean(n_objects)), "max": max(n_objects),
                              "histogram": {str(k): n_objects.count(k) for k in sorted(set(n_objects))}},
        "stages": {k: m for k, m in metrics.items() if m is not None},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "images_per_second": {k: round(n / v, 1) for k, v in seconds.items() if v > 0},
        "processes": world.size, "dropped_why": dropped, "args": vars(args), "device": str(world.device),
    }
    for d in sorted(set(dests)):
        mine = sorted(ids[r[0]] for r in records if r[3] is not None and dests[r[0]] == d)
        common.write_text(d / "dropped.txt", "".join(f"{i}\n" for i in mine))
        common.write_json(d / "summary.json", {**summary, "folder_kept": sum(1 for r in kept if dests[r[0]] == d),
                                               "folder_dropped": len(mine)})
    common.write_json(work / "summary.json", summary)
    if summary["stages"]:
        common.print_table([(k, f"{m['mae']:.3f}", f"{m['max_f']:.3f}", f"{m['iou']:.3f}")
                            for k, m in summary["stages"].items()], ["stage", "MAE", "max-F", "IoU@0.5"])
    common.print0(f"{len(kept)} masks written to {', '.join(str(d) for d in sorted(set(dests)))}; "
                  f"{len(dropped)} images dropped (listed in dropped.txt); mean foreground "
                  f"{summary['mean_foreground_share']:.1%}; {summary['objects_per_image']['mean']:.2f} objects an "
                  "image")
    return summary


if __name__ == "__main__":
    common.run_main(main)
