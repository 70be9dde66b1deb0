r"""MaskContrast pretraining: paper Sec. 3.3, Algorithm 1 and Fig. 3; the ablations of Table 2b.

Every image has its non-overlapping objects {M0, …, MN} (Sec. 3.3): by default one, the pixels its saliency mask
(mine_masks.py) calls salient; a mask of object ids gives several. Each object pixel of a query view is pulled to the
mean embedding (prototype) of its object in a second augmented view, computed by a momentum key network, and pushed
from the prototypes of every other object of the batch — the same image's other objects too — and of a queue of
earlier batches. A 1-channel saliency head on the same decoder features learns the union of the objects with a
class-balanced BCE.

Commands
  # default: VOC trainaug (train where SBD is absent) with the masks mine_masks.py wrote by default (saliency_unsup)
  python pretrain.py --data-root VOC
  # the release's unsupervised-saliency configuration: MoCo v2 backbone (ImageNet, 800 epochs), batch 128, K = 256
  python pretrain.py --data-root VOC --backbone-init moco_v2_800ep_pretrain.pth.tar --batch-size 128 \
      --queue-size 256 --epochs 40 --out runs/pretrain_unsup
  # the release's supervised-saliency configuration: masks of a saliency network trained on DUTS-TR (mine_masks.py
  # --name sup --train-images ... --train-masks ...), ImageNet classifier V1, stem to layer2 frozen
  python pretrain.py --data-root VOC --saliency sup --backbone-init imagenet --freeze conv1,bn1,layer1,layer2 \
      --epochs 40 --out runs/pretrain_sup
  # two GPUs as the release trained: --batch-size stays global (32 per GPU), keys shuffled across GPUs
  torchrun --nproc_per_node 2 pretrain.py --data-root VOC --batch-size 64
  # speed (images/s, data wait, MFU, the profiler's top operators): python tools/bench_pretrain.py --data-root VOC
  # the CPU demo on synthetic data: demo.sh

Outputs in --out: checkpoint.pth (every epoch; the query network f_q is what the later stages load), log.json,
results.json, views.png (the first batch's view pairs with their masks).
"""
import argparse
import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import draw_segmentation_masks
from tqdm import tqdm

import common


# ======================================================================================================================
# Algorithm 1: the loss

def maskcontrast_loss(q, k, s_q, s_k, queue, temperature=0.5, weighting="enet"):
    """The contrastive loss of Algorithm 1 for one batch, over every object of every image (Sec. 3.3's {M0, …, MN});
    with one object per image it is the release's, to the bit (tests/golden).

    q, k: N×D×H×W unit-norm pixel embeddings of the query and key views (k carries no gradient);
    s_q, s_k: N×H×W object ids of the two views — 0 background, 1…M the objects of each image — or bool masks
    (one object per image); queue: D×K unit-norm prototypes of earlier batches. Returns (loss, p_k), p_k P×D
    being the unit-norm key prototypes, one per object present in the key view, in (image, id) order, for the queue.
    A query pixel of an object absent from the key view has no target and is ignored; at least one object of the
    batch must be in both views.
    """
    N, D, H, W = q.shape
    s_q, s_k = s_q.long(), s_k.long()
    M = max(int(s_q.max()), int(s_k.max()), 1)
    # p_k: the prototype of each object j of image n in the key view, its mean key embedding, L2-normalised
    sums = torch.stack([torch.einsum("ndhw,nhw->nd", k, (s_k == j).to(k.dtype)) for j in range(1, M + 1)], 1)
    present = torch.stack([(s_k == j).flatten(1).any(1) for j in range(1, M + 1)], 1)  # present: N×M
    p_k = F.normalize(sums[present], dim=1)                                       # p_k: P×D (sums: N×M×D)
    # every query pixel against the batch's prototypes and the queue
    q = q.permute(0, 2, 3, 1).reshape(N * H * W, D)                              # q: NHW×D
    l_pos = q @ p_k.T                          # l_pos: NHW×P, column p is the positive of object p's pixels and a
    l_neg = q @ queue                          # negative of all others; l_neg: NHW×K, only negatives
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature                      # logits: NHW×(P+K)
    # s_r, the remapped targets: a query pixel's class is its object's column among the P prototypes; background
    # pixels and the pixels of an object the key view lacks take no part (ignored)
    column = torch.where(present, present.flatten().cumsum(0).view(N, M) - 1, -1)  # column: N×M
    column = F.pad(column, (1, 0), value=-1)                                     # id 0, background: N×(M+1)
    s_r = column.gather(1, s_q.flatten(1)).reshape(N * H * W)                    # s_r: NHW
    if weighting == "none":  # Algorithm 1: the plain mean over the salient pixels
        return F.cross_entropy(logits, s_r, ignore_index=-1), p_k
    # the release's E-Net weights: a target weighs 1 / ln(1.02 + its object's share of the batch's query pixels that
    # have a target), so small objects count as much as large ones; the queue's columns are never targets
    count = torch.bincount(s_r[s_r >= 0], minlength=len(p_k))                    # count: P
    share = count / count.sum()
    w = 1 / torch.log(1.02 + F.pad(share.to(logits.dtype), (0, queue.shape[1])))  # w: P+K
    return F.cross_entropy(logits, s_r, weight=w, ignore_index=-1), p_k  # = Σ w·ℓ / Σ w over the targeted pixels


def saliency_loss(aux, s_q, balanced=True):
    """The BCE of the saliency head's logits `aux` N×H×W against the query view's objects s_q (ids or bool: their
    union is the foreground). Balanced (the release, HED-style): positive pixels weigh the batch's share of negatives
    and negatives the share of positives."""
    t = (s_q > 0).to(aux.dtype)
    bce = F.binary_cross_entropy_with_logits(aux, t, reduction="none")
    if not balanced:
        return bce.mean()
    w = 1 - t.mean()  # #neg / #all
    return (w * (bce * t).sum() + (1 - w) * (bce * (1 - t)).sum()) / t.numel()


# ======================================================================================================================
# Algorithm 1: the query network, the momentum key network and the queue (the shape of MoCo's builder)

def all_gather_nograd(t):
    """Concatenate a tensor from every process along dim 0 (no gradient flows back, as in MoCo)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def denormalize(x):
    """Normalised (…, 3, H, W) float → uint8, for pictures."""
    mean = torch.tensor(common.IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD, device=x.device).view(3, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def majority_pool(s, size):
    """Object ids N×H×W brought to `size`: each cell takes the id most of its pixels carry, background on a tie
    (with one object: a cell is salient when more than half of its pixels are)."""
    one_hot = F.one_hot(s.long(), int(s.max()) + 1).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, size).argmax(1)


def gather_prototypes(p_k):
    """Every process's prototypes in rank order. The processes hold different numbers of objects, so each pads its
    rows to the largest count for all_gather."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return p_k
    counts = all_gather_nograd(torch.tensor([len(p_k)], device=p_k.device)).tolist()
    rows = all_gather_nograd(F.pad(p_k, (0, 0, 0, max(counts) - len(p_k))))
    return torch.cat([rows[r * max(counts):r * max(counts) + c] for r, c in enumerate(counts)])


@dataclass
class Contrast:
    """Algorithm 1's settings (K, m, τ) and the choices around it (the README's table of differences): E-Net weights,
    the balanced BCE and its weight, the momentum encoder (Table 2b), the loss on every input pixel or at stride 8,
    backbone layers kept frozen, and `parts` > 1 to train on one process as the release's `parts` GPUs did (each part
    of the batch with its own BatchNorm statistics and prototypes, the loss the mean of the parts')."""
    queue_size: int = 128
    momentum: float = 0.999
    temperature: float = 0.5
    weighting: str = "enet"
    balanced_bce: bool = True
    sal_weight: float = 1.0
    momentum_encoder: bool = True
    loss_res: str = "input"
    freeze: tuple = ()
    parts: int = 1


class MaskContrast(nn.Module):
    """f_q, f_k and the queue of Algorithm 1, with the settings `cfg`."""

    def __init__(self, f_q, cfg=Contrast()):
        super().__init__()
        self.cfg, self.m, self.T = cfg, cfg.momentum, cfg.temperature
        self.f_q = f_q
        # f_k.params = f_q.params; without a momentum encoder (Table 2b) the keys come from f_q, without gradient
        self.f_k = copy.deepcopy(f_q).requires_grad_(False) if cfg.momentum_encoder else None
        for name in cfg.freeze:  # the release's supervised-saliency configuration keeps ImageNet's early layers
            getattr(f_q.backbone, name).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(f_q.head.out_channels, cfg.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def train(self, mode=True):
        """Frozen layers stay in eval mode, in both networks: their BatchNorm statistics stay ImageNet's."""
        super().train(mode)
        for net in (self.f_q, self.f_k):
            for name in self.cfg.freeze if net is not None else ():
                getattr(net.backbone, name).eval()
        return self

    @torch.no_grad()
    def momentum_update(self):
        """f_k.params = m·f_k.params + (1 − m)·f_q.params (BatchNorm statistics are the key network's own)."""
        for p_q, p_k in zip(self.f_q.parameters(), self.f_k.parameters()):
            p_k.mul_(self.m).add_(p_q.detach(), alpha=1 - self.m)

    @torch.no_grad()
    def encode_keys(self, x_k):
        """k = f_k(x_k) at stride 8. Across GPUs, MoCo's batch shuffle: each GPU encodes a random share of the global
        batch, so that BatchNorm's batch statistics cannot tell a key from its own query."""
        f_k = self.f_k if self.f_k is not None else self.f_q
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return f_k(x_k, upsample=False).out
        world, rank = dist.get_world_size(), dist.get_rank()
        x = all_gather_nograd(x_k)
        perm = torch.randperm(x.shape[0], device=x.device)
        dist.broadcast(perm, src=0)
        k = f_k(x[perm.view(world, -1)[rank]], upsample=False).out
        return all_gather_nograd(k)[torch.argsort(perm).view(world, -1)[rank]]

    @torch.no_grad()
    def enqueue(self, p_k):
        """enqueue(queue, p_k); dequeue(queue): every GPU's prototypes overwrite the oldest columns (the pointer stays
        on the device); more prototypes than the queue holds: the newest K."""
        K = self.queue.shape[1]
        if K == 0:
            return
        p_k = gather_prototypes(p_k)[-K:]
        idx = (self.queue_ptr + torch.arange(len(p_k), device=p_k.device)) % K
        self.queue[:, idx] = p_k.T.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(p_k)) % K)

    def encode_queries(self, x_q, upsample):
        """q, aux = f_q(x_q): embeddings N×D×H×W and saliency logits N×H×W."""
        return self.f_q(x_q, upsample=upsample)

    def losses(self, q, k, s_q, s_k, aux):
        """(the contrastive loss, the saliency loss, p_k) of Algorithm 1 against the queue as it was."""
        loss_c, p_k = maskcontrast_loss(q, k, s_q, s_k, self.queue.clone(), self.T, self.cfg.weighting)
        return loss_c, saliency_loss(aux, s_q, self.cfg.balanced_bce), p_k

    def forward(self, x_q, s_q, x_k, s_k):
        """One step of Algorithm 1 up to the loss: returns (loss, its two parts)."""
        full = self.cfg.loss_res == "input"
        q, aux = self.encode_queries(x_q, upsample=full)  # queries: N×D×H×W; aux: the saliency estimate, N×H×W
        if self.f_k is not None:
            # Algorithm 1 updates f_k after the SGD step; MoCo and the release do it here, before the keys. f_k is the
            # same at every key forward either way (the first update here changes nothing: f_k = f_q).
            self.momentum_update()
        k = self.encode_keys(x_k)  # keys: N×D×H/8×W/8, no gradient
        if full:  # the release: the loss on every input pixel (64× the pixels of the stride-8 map)
            k = F.interpolate(k, size=x_k.shape[-2:], mode="bilinear", align_corners=False)
        else:  # masks brought to stride 8: a cell takes the object most of its pixels belong to
            s_q, s_k = majority_pool(s_q, q.shape[-2:]), majority_pool(s_k, k.shape[-2:])
        with torch.autocast(x_q.device.type, enabled=False):  # the loss in fp32
            q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
            loss_c, loss_s, p_k = self.losses(q, k, s_q, s_k, aux.float())
        self.enqueue(p_k)
        return loss_c + self.cfg.sal_weight * loss_s, {"contrast": loss_c.detach(), "saliency": loss_s.detach()}


class InParts(MaskContrast):
    """--batch-parts P: one process trains as the release's P GPUs did. Each part of the batch is encoded with its
    own BatchNorm statistics (the keys shuffled across the parts, as MoCo's across GPUs) and contrasted with its own
    prototypes plus the queue, which takes every part's; the loss is the mean of the parts' (DDP's mean of the GPUs'
    gradients)."""

    def encode_queries(self, x_q, upsample):
        q, aux = zip(*(self.f_q(x, upsample=upsample) for x in x_q.chunk(self.cfg.parts)))
        return torch.cat(q), torch.cat(aux)

    @torch.no_grad()
    def encode_keys(self, x_k):
        f_k = self.f_k if self.f_k is not None else self.f_q
        perm = torch.randperm(len(x_k), device=x_k.device)
        k = torch.cat([f_k(x, upsample=False).out for x in x_k[perm].chunk(self.cfg.parts)])
        return k[torch.argsort(perm)]

    def losses(self, q, k, s_q, s_k, aux):
        chunks = (t.chunk(self.cfg.parts) for t in (q, k, s_q, s_k, aux))
        loss_c, loss_s, p_k = zip(*(super(InParts, self).losses(*part) for part in zip(*chunks)))
        return torch.stack(loss_c).mean(), torch.stack(loss_s).mean(), torch.cat(p_k)


def mask_contrast(f_q, cfg=Contrast()):
    """MaskContrast with the settings `cfg` (InParts when cfg.parts > 1)."""
    return (InParts if cfg.parts > 1 else MaskContrast)(f_q, cfg)


# ======================================================================================================================
# Data: two augmented views that both hold part of the object

def pretrain_samples(roots, split, saliency, mask_root=None, missing="error"):
    """The images that have a mask, found without opening one (start-up stays quick at COCO scale): a mask missing
    is an error unless mine_masks.py listed the image as dropped (or missing='skip'). What a mask holds is checked
    when the loader reads it: an empty one is skipped there, one of another size than its image is an error."""
    out, n_missing = [], 0
    for root in roots:
        this_split = common.train_split(root, split) if common.is_voc_root(root) else None
        samples = common.list_samples(root, this_split, saliency=saliency, mask_root=mask_root)
        d = common.saliency_dir(root, saliency, mask_root)
        if not d.is_dir():
            raise common.UserError(f"{d}: no saliency masks; run `python mine_masks.py --data-root {root}` first "
                                   "(or pass --saliency / --mask-root where they are)")
        dropped, have = common.dropped_ids(d), {f.name for f in os.scandir(d)}
        for s in samples:
            if not s.image.is_file():
                raise common.UserError(f"{s.image}: image not found (listed in split '{this_split}' of {root})")
            if s.saliency.name in have:
                out.append(s)
            elif s.id in dropped or missing == "skip":
                n_missing += 1
            else:
                raise common.UserError(f"{s.image}: no saliency mask at {s.saliency}; mine masks for it with "
                                       "mine_masks.py, or pass --missing-masks skip to train on the images that have "
                                       "one")
    common.print0(f"pretraining set: {len(out)} images ({n_missing} without a mask skipped)")
    if not out:
        raise common.UserError(f"no image with a saliency mask under {', '.join(map(str, roots))}")
    return out


class ViewPairs(Dataset):
    """Algorithm 1's x_q, s_q = aug(x, s); x_k, s_k = aug(x, s), the part a DataLoader worker does: two random views
    (crop, flip) of an image and its object mask (ids, uint8), each with a salient share — all objects together —
    strictly between min_area and max_area and at least one object in both, each with its colour-jitter parameters
    (applied batched on the device: common.apply_color_params). An image with an empty mask, or
    that yields no such pair in `tries` draws, is swapped for a random other one, and after `max_images` images it is
    an error (the release retries forever). Items are (index, seed) pairs from common.SeededSampler."""

    def __init__(self, samples, size, min_area=0.01, max_area=0.99, jitter=(0.4, 0.4, 0.4, 0.1), same_view=False,
                 tries=3, max_images=20):
        self.samples, self.size, self.min_area, self.max_area = samples, size, min_area, max_area
        self.jitter, self.same_view, self.tries, self.max_images = jitter, same_view, tries, max_images

    def __len__(self):
        return len(self.samples)

    def ok(self, s_q, s_k):
        shared = np.intersect1d(s_q[s_q > 0].unique().numpy(), s_k[s_k > 0].unique().numpy())
        return all(self.min_area < (s > 0).float().mean().item() < self.max_area for s in (s_q, s_k)) and len(shared)

    def __getitem__(self, item):
        i, seed = item
        rng = np.random.default_rng(seed)
        with common.seeded(seed):
            for _ in range(self.max_images):
                s = self.samples[i]
                x = common.read_image(s.image)                       # x: 3×H×W uint8
                s_mask = common.read_objects(s.saliency)              # s: H×W object ids
                common.check_same_size(s_mask, x.shape[1:], s.saliency, s.image, "mask")
                if not s_mask.any():  # an empty mask: no object to contrast
                    i = int(rng.integers(len(self.samples)))
                    continue
                for _ in range(self.tries):
                    view_q = common.draw_view(x.shape[1:])
                    view_k = view_q if self.same_view else common.draw_view(x.shape[1:])
                    s_q = common.crop_view(s_mask, view_q, self.size)
                    s_k = common.crop_view(s_mask, view_k, self.size)
                    if self.ok(s_q, s_k):
                        c_q = common.draw_color_params(rng, self.jitter)
                        c_k = c_q if self.same_view else common.draw_color_params(rng, self.jitter)
                        return (common.crop_view(x, view_q, self.size), s_q, c_q,
                                common.crop_view(x, view_k, self.size), s_k, c_k)
                i = int(rng.integers(len(self.samples)))
        raise common.UserError(f"no view pair with a salient share in ({self.min_area}, {self.max_area}) after "
                               f"{self.max_images} images; are the masks nearly empty or full? (--min-area/--max-area)")


def to_device_views(batch, device, channels_last):
    """The loader's batch → normalised views on the device, colour-augmented there (the other half of aug)."""
    x_q, s_q, c_q, x_k, s_k, c_k = (t.to(device, non_blocking=True) for t in batch)
    x_q = common.normalize(common.apply_color_params(x_q.float() / 255, c_q))  # x_q: N×3×H×W
    x_k = common.normalize(common.apply_color_params(x_k.float() / 255, c_k))
    if channels_last:
        x_q, x_k = (x.contiguous(memory_format=torch.channels_last) for x in (x_q, x_k))
    return x_q, s_q, x_k, s_k


def save_views_grid(x_q, s_q, x_k, s_k, path, n=8):
    """Query and key views with their masks drawn on: what the network is asked to match."""
    tiles = []
    for a, b, c, d in zip(x_q[:n].cpu(), s_q[:n].cpu(), x_k[:n].cpu(), s_k[:n].cpu()):
        tiles += [draw_segmentation_masks(denormalize(a), b > 0, alpha=0.45, colors="red"),
                  draw_segmentation_masks(denormalize(c), d > 0, alpha=0.45, colors="red")]
    common.save_grid(tiles, path, ncol=8)


# ======================================================================================================================

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    pos, nonneg, frac, prob = common.positive_int, common.nonnegative_int, common.nonnegative_float, common.probability
    g = p.add_argument_group("data")
    g.add_argument("--data-root", nargs="+", required=True,
                   help="VOC-layout roots and/or plain image folders, combined")
    common.add_download_arg(g)
    g.add_argument("--train-split", default=None, help="split list of the VOC-layout roots (default trainaug, or "
                   "train where a root has no trainaug)")
    g.add_argument("--saliency", default="unsup", help="masks are read from ROOT/saliency_<name>/<id>.png "
                   "(mine_masks.py writes saliency_unsup by default)")
    g.add_argument("--mask-root", default=None, help="read masks from MASK_ROOT/saliency_<name>/ instead of ROOT")
    g.add_argument("--missing-masks", default="error", choices=["error", "skip"],
                   help="an image without a mask (not listed as dropped by mine_masks.py)")
    g.add_argument("--size", type=pos, default=224, help="crop size of each view")
    g.add_argument("--min-area", type=prob, default=0.01, help="salient share of a view must exceed this "
                   "(released code 0.01; the paper's text says 0.1)")
    g.add_argument("--max-area", type=prob, default=0.99, help="... and stay below this")
    g.add_argument("--color-jitter", type=frac, nargs=4, default=[0.4, 0.4, 0.4, 0.1], metavar=("B", "C", "S", "H"),
                   help="ColorJitter brightness, contrast, saturation, hue (applied with p=0.8)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=list(common.ARCH_CHANNELS))
    g.add_argument("--backbone-init", default="random", help="random | imagenet (torchvision's V1, as released; "
                   "needs a network) | imagenet-v2 | PATH (torchvision or MoCo v2 state dict)")
    g.add_argument("--freeze", default="", help="backbone modules kept frozen (no gradient, eval mode), e.g. "
                   "conv1,bn1,layer1,layer2 as the release's supervised-saliency configuration")
    g.add_argument("--dim", type=pos, default=32, help="embedding dimension D")
    g = p.add_argument_group("MaskContrast")
    g.add_argument("--queue-size", type=nonneg, default=128, help="K prototypes in the queue (0 = none, Table 2b)")
    g.add_argument("--key-momentum", type=prob, default=0.999, help="m: the key network's EMA of the query network")
    g.add_argument("--temperature", type=common.positive_float, default=0.5, help="τ")
    g.add_argument("--weighting", default="enet", choices=["enet", "none"],
                   help="enet: the release's per-object weights 1/ln(1.02+p); none: Algorithm 1's plain mean")
    g.add_argument("--sal-weight", type=frac, default=1.0, help="weight of the saliency loss")
    g.add_argument("--plain-bce", action="store_true", help="plain BCE instead of the released class-balanced BCE")
    g.add_argument("--loss-res", default="input", choices=["input", "feature"],
                   help="loss on every input pixel (released code) or at the stride-8 feature map (64× cheaper)")
    g.add_argument("--no-views", action="store_true", help="Table 2b: key view = query view")
    g.add_argument("--no-momentum-encoder", action="store_true", help="Table 2b: keys from the query network (no grad)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=pos, default=60, help="paper 60; released configs 40")
    g.add_argument("--batch-size", type=pos, default=64, help="global batch (divided among GPUs)")
    g.add_argument("--batch-parts", type=pos, default=1, help="on one GPU, train as this many GPUs would: each part "
                   "of the batch with its own BatchNorm statistics and in-batch prototypes (the release: 2 GPUs)")
    g.add_argument("--lr", type=common.positive_float, default=0.004)
    g.add_argument("--momentum", type=prob, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=frac, default=1e-4)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/pretrain", help="checkpoint.pth, log.json, results.json, views.png")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (exactly: same weights as an "
                   "uninterrupted run)")
    g.add_argument("--compile", action="store_true", help="torch.compile both networks")
    common.add_runtime_args(p)
    args = p.parse_args(argv)
    if args.color_jitter[3] > 0.5:
        p.error("--color-jitter: the hue jitter H must lie in [0, 0.5], as torchvision's")
    args.freeze = [s.strip() for s in args.freeze.split(",") if s.strip()]
    bad = [s for s in args.freeze if s not in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")]
    if bad:
        p.error(f"--freeze: unknown module {bad[0]} (choose from conv1, bn1, layer1, layer2, layer3, layer4)")
    return args


def main(argv=None, hook=None):
    """Train; or, with a `hook` (tools/bench_pretrain.py), hand it the ready set-up instead and return its result."""
    # ================================================================================================== args, runtime
    args = get_args(argv)
    common.resolve_download(args)
    world = common.setup_world(args.device)
    device, out = world.device, Path(args.out)
    local_batch = args.batch_size // world.size
    if args.batch_size % (world.size * args.batch_parts) or local_batch // args.batch_parts < 2:
        raise common.UserError(f"--batch-size {args.batch_size}: must divide among the {world.size} processes and "
                               f"{args.batch_parts} --batch-parts with at least 2 images each (BatchNorm needs two)")
    if args.batch_parts > 1 and world.size > 1:
        raise common.UserError("--batch-parts stands in for GPUs on one process; under torchrun each GPU is a part")
    if args.queue_size % args.batch_size:
        raise common.UserError(f"--queue-size {args.queue_size} must be a multiple of the global batch "
                               f"{args.batch_size}")
    resuming = common.prepare_out(out, args.resume, ["checkpoint.pth"], is_main=world.is_main)

    # ========================================================================================================== data
    samples = pretrain_samples(args.data_root, args.train_split, args.saliency, args.mask_root, args.missing_masks)
    if len(samples) < args.batch_size:
        raise common.UserError(f"{len(samples)} images is fewer than one batch (--batch-size {args.batch_size})")
    dataset = ViewPairs(samples, args.size, args.min_area, args.max_area, args.color_jitter, same_view=args.no_views)
    sampler = common.SeededSampler(len(dataset), args.seed, world.rank, world.size)
    # the loader's own generator: creating its workers must not draw from the global RNG (dropout's), or a run with
    # persistent workers would differ from one without
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                        generator=torch.Generator())

    # ====================================================================================================== networks
    common.seed_all(args.seed)  # the same initial weights on every process
    f_q = common.SegModel(args.arch, args.dim, saliency_head=True)
    common.print0(common.load_backbone_weights(f_q.backbone, args.backbone_init, args.arch))
    cfg = Contrast(args.queue_size, args.key_momentum, args.temperature, args.weighting, not args.plain_bce,
                   args.sal_weight, not args.no_momentum_encoder, args.loss_res, tuple(args.freeze), args.batch_parts)
    model = mask_contrast(f_q, cfg).to(device)
    channels_last = device.type == "cuda"  # faster convolutions with cuDNN
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        for net in (model.f_q, model.f_k):
            if net is not None:
                net.compile()
    ddp_model = model if world.size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)

    # ===================================================================================================== optimizer
    trainable = [p for p in model.f_q.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    step = common.TrainStep(optimizer, [model], device, args.amp,
                            advice=f"a learning rate too high for this batch (--lr {args.lr:g})")
    if hook:
        return hook(dict(model=ddp_model, loader=loader, sampler=sampler, step=step, world=world, dataset=dataset,
                         channels_last=channels_last, args=args))

    # ======================================================================================================== resume
    start_epoch, history = 0, []
    ck_path = out / "checkpoint.pth"
    made_with = {k: vars(args)[k] for k in ("arch", "dim", "queue_size", "no_momentum_encoder", "batch_size",
                                            "batch_parts", "seed", "freeze")}
    if resuming:
        ck = common.restart_from_checkpoint(ck_path, "pretrain", made_with, model=model.f_q, key_model=model.f_k,
                                            queue=model.queue, queue_ptr=model.queue_ptr, optimizer=optimizer,
                                            train_step=step)
        start_epoch, history, step.checkpoint = ck["epoch"], ck["history"], ck_path

    # ====================================================================================================== training
    for epoch in range(start_epoch, args.epochs):
        lr = common.poly_lr(args.lr, epoch, args.epochs)  # poly, set once per epoch as the release does
        for g in optimizer.param_groups:
            g["lr"] = lr
        sampler.set_epoch(epoch)
        common.seed_all(args.seed, epoch, world.rank)  # dropout and the key shuffle: a function of (seed, epoch)
        model.train()
        sums, t0 = torch.zeros(3, device=device), time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not world.is_main, leave=False)
        for it, batch in enumerate(bar):
            x_q, s_q, x_k, s_k = to_device_views(batch, device, channels_last)
            if it == 0 and epoch == start_epoch and world.is_main:
                save_views_grid(x_q, s_q, x_k, s_k, out / "views.png")
            with common.autocast(device, args.amp):
                loss, parts = ddp_model(x_q, s_q, x_k, s_k)
            loss = step(loss)  # loss.backward(); SGD update of f_q
            sums += torch.stack([loss, parts["contrast"], parts["saliency"]])
            if it % 50 == 0:  # a host sync, so only now and then
                bar.set_postfix(loss=f"{float(loss):.3f}")
        step.check(f"epoch {epoch + 1}")  # before the checkpoint: a saved state is always a good one
        if world.size > 1:
            dist.all_reduce(sums)
            sums /= world.size
        loss, contrast, sal = (sums / len(loader)).tolist()
        history.append({"epoch": epoch + 1, "step": (epoch + 1) * len(loader), "lr": lr, "loss": loss,
                        "contrast": contrast, "saliency": sal,
                        "images_per_s": len(loader) * args.batch_size / (time.time() - t0)})
        if world.is_main:
            print(json.dumps(history[-1]), flush=True)
            common.save_checkpoint(ck_path, "pretrain", model=model.f_q.state_dict(),
                                   key_model=model.f_k.state_dict() if model.f_k is not None else None,
                                   queue=model.queue, queue_ptr=model.queue_ptr, optimizer=optimizer.state_dict(),
                                   train_step=step.state_dict(), epoch=epoch + 1, history=history, args=vars(args),
                                   made_with=made_with)
            common.write_json(out / "log.json", history)
        step.checkpoint = ck_path

    # ========================================================================================================== save
    if world.is_main:
        common.write_json(out / "results.json", {"args": vars(args), "images": len(samples), "history": history,
                                                 "final_loss": history[-1]["loss"]})
        common.print_table([[h["epoch"], h["loss"], h["contrast"], h["saliency"], h["lr"] * 1000] for h in history],
                           ["epoch", "loss", "contrastive", "saliency", "lr×1e3"])
        common.print0(f"wrote {ck_path}, {out / 'results.json'}, {out / 'views.png'}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main)
