r"""Clustering evaluation: paper Sec. 4.1-II ("K-Means") and supp. E; Tables 3b and 4; Fig. 4 (retrieval).

No label touches the model. Each val image gets one object prototype, its embeddings pooled over the pixels its
saliency head calls foreground; K-Means groups the prototypes and paints each foreground with its cluster, the rest
background. The clusters are matched to classes over the whole split (Hungarian on IoU with as many clusters as
classes, majority vote when overclustering: Table 4) and scored by mIoU at each image's original size (5 seeds).
As released (the README's table lists every difference, each flag's help its released value): the prototype is the
32-d head output weighted by the raw saliency logit where it is above 0.5, summed, L2-normalised, PCA-whitened to 32
dims; --clusters 21 on VOC = 20 K-Means clusters + background; 512² bicubic inputs; fp32. --cluster pixels clusters
every pixel's features instead: the paper's protocol for the ImageNet and MoCo baselines.

Retrieval (--retrieval-split): each val image takes, on its foreground, the class of its nearest (cosine) prototype
of a labelled split, labelled with its foreground's majority class; on VOC also the released 7-class variant
(aeroplane, bottle, bus, car, cat, cow, person).

Commands
  python kmeans_eval.py --data-root VOC --checkpoint runs/pretrain/checkpoint.pth                  # Table 3b, Fig. 4
  python kmeans_eval.py --data-root VOC --checkpoint runs/pretrain/checkpoint.pth --clusters 21 50 100 200 500  # T. 4
  python kmeans_eval.py --data-root VOC --checkpoint random --features backbone  # random weights + the mined masks
  # Table 3b's baselines as the paper ran them (supp. E): every pixel's backbone features, output stride 16
  python kmeans_eval.py --data-root VOC --checkpoint imagenet --features backbone --output-stride 16 --cluster pixels
Outputs in --out (default: next to the checkpoint): kmeans_eval.json (mIoU per seed, mean ± std, per-class IoU per
cluster count; retrieval), kmeans_val.png (image | ground truth | clusters matched to classes), retrieval.png (each
query and its top-5 train neighbours), prototypes.pt (reused by --resume).
"""
import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader
from tqdm import tqdm

import common

# the released 7-class retrieval variant (the classes other works evaluate on)
RETRIEVAL_7 = ("aeroplane", "bottle", "bus", "car", "cat", "cow", "person")


# ======================================================================================================================
# PCA and K-Means in torch (on the GPU when there is one)

def pca_fit(x, dim):
    """(mean, W) such that (rows − mean) @ W are the rows' coordinates on their top `dim` principal axes, each scaled
    to unit variance (sklearn's whiten)."""
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    keep = min(dim, int((s > s[0] * 1e-6).sum())) if s.numel() and s[0] > 0 else 0
    return mean, vh[:keep].T / (s[:keep] / math.sqrt(max(len(x) - 1, 1)))


def pca_whiten(x, dim):
    mean, w = pca_fit(x, dim)
    return (x - mean) @ w


def kmeans_pp(x, k, gen):
    """k-means++ seeding: each new centre drawn with probability proportional to the squared distance to the nearest
    centre so far (uniformly when every point sits on one); no host sync."""
    centres = x.new_empty(k, x.shape[1])
    centres[0] = x[torch.randint(len(x), (1,), generator=gen, device=x.device)[0]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for j in range(1, k):
        w = torch.where(d2.sum() > 0, d2, torch.ones_like(d2))
        centres[j] = x[torch.multinomial(w, 1, generator=gen)[0]]
        d2 = torch.minimum(d2, ((x - centres[j]) ** 2).sum(1))
    return centres


def kmeans(x, k, seed, restarts=10, iters=300):
    """Lloyd's K-Means on the rows of x (any device), k-means++ init, `restarts` tries; returns (assignments, centres,
    inertia) of the try with the lowest inertia. The same seed on the same device gives the same result."""
    if k > len(x):
        raise ValueError(f"{k} clusters need at least {k} points, got {len(x)}")
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    best = None
    for _ in range(restarts):
        c = kmeans_pp(x, k, gen)
        assign = None
        for _ in range(iters):
            d = torch.cdist(x, c)
            new = d.argmin(1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            count = torch.bincount(assign, minlength=k)
            c = torch.zeros_like(c).index_add_(0, assign, x) / count.clamp(min=1)[:, None].to(x.dtype)
            empty = (count == 0).nonzero()[:, 0]
            if len(empty):  # an emptied cluster restarts at the points worst served by their centre
                far = d.gather(1, assign[:, None])[:, 0].topk(len(empty)).indices
                c[empty] = x[far]
        d = torch.cdist(x, c)
        assign = d.argmin(1)
        inertia = float((d.min(1).values ** 2).sum())
        if best is None or inertia < best[2]:
            best = (assign, c, inertia)
    return best


# ======================================================================================================================
# Prototypes

class ProtoDataset(common.SegDataset):
    """An eval sample plus its foreground mask from a saliency folder (at the label's size), when one is used."""

    def __getitem__(self, i):
        x, y, i = super().__getitem__(i)
        s = self.samples[i]
        if s.saliency is None:
            return x, y, None, i
        if not s.saliency.is_file():  # an image mine_masks.py dropped (under 1 % salient): no foreground
            return x, y, torch.zeros_like(y, dtype=torch.bool), i
        m = common.read_objects(s.saliency)
        common.check_same_size(m, y.shape, s.saliency, s.image, "mask")
        return x, y, m > 0, i


def collate(batch):
    xs, ys, ms, idx = zip(*batch)
    return torch.stack(xs), list(ys), list(ms), torch.tensor(idx)


@dataclass
class Clustering:
    """K-Means as every setting runs it: one run per seed, each the best of `restarts`, after PCA whitening."""
    seeds: list
    restarts: int = 10
    iters: int = 300
    pca_dim: int = 32
    absent: str = "zero"
    fit_pixels: int = 100  # --cluster pixels: random pixels per image K-Means is fitted on


@dataclass
class Objects:
    """What an object is: the head's foreground (logit > `threshold`) or a mask's, one per image ('image', the paper's)
    or per connected component ('components', area rule `min_area`); `resize` to the label: as --fg-resize."""
    threshold: float = 0.5
    mode: str = "image"
    min_area: float = 0.01
    resize: str = "nearest"


@torch.no_grad()
def extract_prototypes(model, samples, reader, features, objects, n_classes, keep=0):
    """Object prototypes (weighted by the head's logit, as released, or with mask paths a plain mean) and, to score
    without re-reading anything, histograms of the true classes in each object and outside its image's objects.
    Returns {protos P×D, has_fg (P,), image (P,), fg_hist P×C, bg_hist N×C, img_per_s, shown: the first `keep`
    (index, label, object map: 0 background, p + 1 for prototype p)}."""
    device = reader.device
    loader = DataLoader(ProtoDataset(samples, common.eval_transform(reader.size, reader.resize)),
                        batch_size=reader.batch_size, num_workers=reader.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    protos, has_fg, image, fg_hist, bg_hist, shown = [], [], [], [], [], []
    n_protos, t0 = 0, time.time()
    for x, ys, ms, idx in tqdm(loader, desc=f"prototypes {samples[0].image.parent.parent.name}", leave=False):
        x = x.to(device, non_blocking=True)
        with common.autocast(device, reader.amp):
            if features == "head" and ms[0] is None:
                emb, logit = model(x)  # both upsampled to the input size, as the release does
            else:
                emb, logit = model.layer_features(x, features), None  # emb: N×D×h×w at stride 8
        emb = emb.float()
        for j, y in enumerate(ys):
            fg = ms[j] if ms[j] is not None else logit[j].float() > objects.threshold  # at the label's / input size
            obj = fg.long() if objects.mode == "image" else \
                torch.from_numpy(common.components(fg.cpu(), objects.min_area)).long()
            obj = obj.to(device)                                               # obj: 0 background, 1…M objects
            M = 1 if objects.mode == "image" else int(obj.max())
            masks = [obj == m for m in range(1, M + 1)]
            if ms[j] is not None:  # a plain mean over each object, at the embedding's size
                w = [F.adaptive_avg_pool2d(F.interpolate(mk[None, None].float(), size=x.shape[-2:])[0], emb.shape[-2:])
                     [0] for mk in masks]
                at_label = obj.cpu()
            else:  # the released weighting: the logit where foreground
                w = [logit[j].float().clamp(min=0) * mk for mk in masks]
                if objects.mode == "image" and objects.resize == "bilinear":
                    at_label = (F.interpolate(logit[j][None, None].float(), size=y.shape, mode="bilinear",
                                              align_corners=False)[0, 0] > objects.threshold).long().cpu()
                else:  # thresholded at the input size, then resized (OpenCV's INTER_NEAREST)
                    at_label = F.interpolate(obj[None, None].float(), size=y.shape, mode="nearest")[0, 0].long().cpu()
            w = torch.stack(w) if w else emb.new_zeros(0, *emb.shape[-2:])  # w: M×h×w
            has = (w.flatten(1).sum(1) > 0).cpu()                              # has: M
            if objects.mode == "image" and not has[0]:
                at_label = torch.zeros_like(at_label)
            protos.append(F.normalize(torch.einsum("dhw,mhw->md", emb[j], w), dim=1).cpu())  # zero stays zero
            has_fg.append(has)
            image.append(torch.full((M,), int(idx[j])))
            valid = y != common.IGNORE
            fg_hist += [torch.bincount(y[(at_label == m) & valid], minlength=n_classes) for m in range(1, M + 1)]
            bg_hist.append(torch.bincount(y[(at_label == 0) & valid], minlength=n_classes))
            if len(shown) < keep:
                shown.append((int(idx[j]), y, torch.where(at_label > 0, at_label + n_protos, 0)))
            n_protos += M
    protos = torch.cat(protos)
    if not protos.isfinite().all():
        raise common.UserError(f"the network's {features} features are not finite on "
                               f"{int((~protos.isfinite().all(1)).sum())} images (diverged weights?)")
    return {"protos": protos, "has_fg": torch.cat(has_fg), "image": torch.cat(image),
            "fg_hist": torch.stack(fg_hist) if fg_hist else torch.zeros(0, n_classes, dtype=torch.long),
            "bg_hist": torch.stack(bg_hist), "shown": shown, "img_per_s": len(samples) / (time.time() - t0)}


# ======================================================================================================================
# Matching clusters to classes, scoring

def match_from_confusion(conf):
    """conf: (n_clusters, n_classes) pixel counts. Returns a LongTensor cluster → class: Hungarian on IoU (one-to-one)
    when n_clusters <= n_classes, else each cluster's majority class (many-to-one)."""
    conf = conf.double()
    n_clusters, n_classes = conf.shape
    if n_clusters <= n_classes:
        iou = conf / (conf.sum(1, keepdim=True) + conf.sum(0, keepdim=True) - conf).clamp(min=1)
        rows, cols = linear_sum_assignment(iou.numpy(), maximize=True)
        mapping = torch.zeros(n_clusters, dtype=torch.long)
        mapping[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        return mapping
    return conf.argmax(1)


def cluster_confusion(ids, fg_hist, bg_hist, n_ids):
    """(n_ids, C) pixel counts, prediction id × true class: background pixels to id 0, an object's to its id."""
    conf = torch.zeros(n_ids, fg_hist.shape[1], dtype=torch.long)
    conf[0] += bg_hist.sum(0)
    return conf.index_add_(0, ids, fg_hist)


def score(conf_ids, mapping, n_classes, absent="skip"):
    """(mIoU, per-class IoU) of the class confusion (rows = ground truth) after mapping prediction ids to classes;
    `absent` as common.miou_from_confusion."""
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    conf.index_add_(1, mapping, conf_ids.T.contiguous())
    return common.miou_from_confusion(conf, absent)


def run_clustering(x, clustered, q, n_total, kc, n_classes):
    """K-Means with n_total − 1 clusters on x (q's prototypes `clustered`), once per seed; an object is painted with
    its cluster + 1, the rest (and an object without foreground) with 0."""
    out = []
    for s in kc.seeds:
        assign = kmeans(x, n_total - 1, s, kc.restarts, kc.iters)[0].cpu()
        ids = torch.zeros(len(q["has_fg"]), dtype=torch.long)
        ids[clustered] = assign + 1
        ids[~q["has_fg"]] = 0
        conf_ids = cluster_confusion(ids, q["fg_hist"], q["bg_hist"], n_total)
        mapping = match_from_confusion(conf_ids)
        miou, iou = score(conf_ids, mapping, n_classes, kc.absent)
        out.append({"seed": s, "miou": miou, "iou": iou, "ids": ids, "mapping": mapping})
    return out


@torch.no_grad()
def pixel_features(model, samples, reader, features):
    """(per-pixel features N×D×h×w, L2-normalised, at the layer's stride; labels; indices), batch by batch."""
    loader = DataLoader(common.SegDataset(samples, common.eval_transform(reader.size, reader.resize)),
                        batch_size=reader.batch_size, num_workers=reader.workers,
                        collate_fn=common.collate_keep_labels, pin_memory=reader.device.type == "cuda")
    for x, ys, idx in tqdm(loader, desc="pixel features", leave=False):
        with common.autocast(reader.device, reader.amp):
            f = model.layer_features(x.to(reader.device, non_blocking=True), features)
        yield F.normalize(f.float(), dim=1), ys, idx


def pixel_kmeans(model, samples, reader, features, clusters, kc, n_classes, keep=0):
    """The paper's K-Means of the backbone baselines (supp. E): fitted on kc.fit_pixels random pixels of each image,
    every pixel assigned (upsampled nearest), the clusters matched to all classes, background included. Two passes,
    so that no feature map is kept. Returns {n_total: [per seed {seed, miou, iou, mapping}]}, the first `keep`
    (index, label, prediction) of the first setting's first seed, and the number of pixels fitted."""
    gen = torch.Generator().manual_seed(kc.seeds[0])
    fit = []
    for f, _, _ in pixel_features(model, samples, reader, features):  # pass 1: the pixels K-Means is fitted on
        f = f.flatten(2).transpose(1, 2)  # N×hw×D
        pick = torch.rand(f.shape[:2], generator=gen).argsort(1)[:, :kc.fit_pixels].to(f.device)
        fit.append(f.gather(1, pick[..., None].expand(-1, -1, f.shape[2])).flatten(0, 1))
    fit = torch.cat(fit)
    if kc.pca_dim:
        mean, w = pca_fit(fit, kc.pca_dim)
    else:
        mean, w = torch.zeros_like(fit[0]), torch.eye(fit.shape[1], device=fit.device)
    fit = (fit - mean) @ w
    settings = [(k, s) for k in clusters if k <= len(fit) for s in kc.seeds]
    centres = {(k, s): kmeans(fit, k, s, kc.restarts, kc.iters)[1] for k, s in settings}
    conf = {ks: torch.zeros(ks[0], n_classes, dtype=torch.long) for ks in settings}
    shown = []
    for f, ys, idx in pixel_features(model, samples, reader, features):  # pass 2: every pixel assigned
        z = (f.permute(0, 2, 3, 1) - mean) @ w  # N×h×w×d
        for ks in settings:
            assign = torch.cdist(z.flatten(1, 2), centres[ks][None]).argmin(-1).view(z.shape[:3])
            for j, y in enumerate(ys):
                a = F.interpolate(assign[j][None, None].float(), size=y.shape, mode="nearest")[0, 0].long().cpu()
                valid = y != common.IGNORE
                conf[ks] += torch.bincount(a[valid] * n_classes + y[valid].long(),
                                           minlength=ks[0] * n_classes).view(ks[0], n_classes)
                if ks == settings[0] and len(shown) < keep:
                    shown.append((int(idx[j]), y, a))
    runs = {}
    for k, s in settings:
        mapping = match_from_confusion(conf[(k, s)])
        miou, iou = score(conf[(k, s)], mapping, n_classes, kc.absent)
        runs.setdefault(k, []).append({"seed": s, "miou": miou, "iou": iou, "mapping": mapping})
    if shown:
        first = runs[settings[0][0]][0]["mapping"]
        shown = [(i, y, first[a]) for i, y, a in shown]
    return runs, shown, len(fit)


def retrieval(bank, query, n_classes, classes=None, absent="skip"):
    """Each query image takes the class of its nearest bank prototype (cosine) on its foreground; a bank image's class
    is the majority class in its foreground (a tie goes to the larger class id, as released). `classes`: only these
    (plus background) are kept — the others become ignore, in the bank's labels and in the scoring — and the mean is
    over these alone."""
    fg_b, fg_q, bg_q = bank["fg_hist"].clone(), query["fg_hist"].clone(), query["bg_hist"].clone()
    if classes is not None:
        drop = [c for c in range(1, n_classes) if c not in classes]
        fg_b[:, drop], fg_q[:, drop], bg_q[:, drop] = 0, 0, 0
    objects = fg_b[:, 1:]
    usable = bank["has_fg"] & (objects.sum(1) > 0)
    if not usable.any():
        raise common.UserError("retrieval: no train image has a labelled object inside its foreground")
    labels = (n_classes - 1) - objects[usable].flip(1).argmax(1)
    sim = query["protos"] @ bank["protos"][usable].T
    nn_idx = sim.topk(min(5, int(usable.sum())), dim=1).indices
    pred = torch.where(query["has_fg"], labels[nn_idx[:, 0]], torch.zeros_like(nn_idx[:, 0]))
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    conf[:, 0] += bg_q.sum(0)
    conf.index_add_(1, pred, fg_q.T.contiguous())
    miou, iou = common.miou_from_confusion(conf, absent)
    if classes is not None:
        sub = iou[list(classes)]
        miou = float(sub.nanmean() if absent == "skip" else sub.nan_to_num(0).mean())
    return {"miou": miou, "iou": iou, "bank": int(usable.sum()), "labels": labels,
            "neighbours": usable.nonzero()[:, 0][nn_idx], "pred": pred}


# ======================================================================================================================
# Pictures

def save_retrieval_figure(query_samples, bank_samples, query, bank, neighbours, path, n, tile=128):
    """One row per val query object: its image, then the images of its top-5 train neighbours."""
    tiles = []
    for p in query["has_fg"].nonzero()[:, 0][:n].tolist():
        row = [common.read_image(query_samples[int(query["image"][p])].image)] + [
            common.read_image(bank_samples[int(bank["image"][j])].image) for j in neighbours[p]]
        tiles += row + [torch.full_like(row[0], 255)] * (6 - len(row))
    if tiles:
        common.save_grid(tiles, path, ncol=6, size=tile)


def summarise_runs(results, runs, clusters, n_classes, names, n_points):
    """Fill results["clusters"] with each setting's mIoU per seed, mean ± std, per-class IoU, and a warning where
    there are few prototypes (`n_points`) a cluster. Returns the table's rows."""
    rows = []
    for n_total in clusters:
        key = str(n_total)
        if n_total not in runs:
            print(f"--clusters {n_total}: skipped (too few points to cluster, or fewer than 2 clusters)")
            results["clusters"][key] = {"skipped": "too few points"}
            continue
        m = torch.tensor([r["miou"] for r in runs[n_total]])
        std = float(m.std()) if len(m) > 1 else 0.0
        results["clusters"][key] = {
            "matching": "hungarian" if n_total <= n_classes else "majority",
            "seeds": [r["seed"] for r in runs[n_total]],
            "miou_per_seed": m.tolist(), "miou_mean": float(m.mean()), "miou_std": std,
            "per_class_iou_mean": dict(zip(names, torch.stack([r["iou"] for r in runs[n_total]]).nanmean(0).tolist()))}
        label = f"K-Means {n_total}"
        if n_points and n_total > n_classes and n_total - 1 > n_points / 10:
            # a cluster of a few images takes their majority class: the labels, not the features, do the work
            warning = (f"{n_total - 1} clusters for {n_points} prototypes ({n_points / (n_total - 1):.1f} images a "
                       "cluster): majority voting over so few images is close to a supervised labelling, which "
                       "even random weights score well on; read this row as an upper bound, not as clustering")
            print(f"warning: {warning}")
            results["clusters"][key]["warning"] = warning
            label += " (!)"
        rows.append((label, results["clusters"][key]["matching"], float(m.mean()), std))
    return rows


def finish(results, rows, val, shown, out, line):
    """The outputs: kmeans_val.png (image | ground truth | matched clusters per `shown` (index, label, prediction)),
    kmeans_eval.json, the table and a last line."""
    if shown:
        tiles = []
        for i, y, pred in shown:
            tiles += [common.read_image(val[i].image), common.colorize(y), common.colorize(pred)]
        common.save_grid(tiles, out / "kmeans_val.png", ncol=3, size=160)
    common.write_json(out / "kmeans_eval.json", results)
    common.print_table(rows, ["protocol", "matching", "mIoU %", "std"])
    print(f"{line} → {out / 'kmeans_eval.json'}")
    return results


def use_masks(samples, root, name, mask_root=None):
    """Point the samples at their masks (mine_masks.py's saliency_<name>, in `mask_root`): a mask missing is an error
    unless mine_masks.py dropped the image (no foreground). Returns what the foreground comes from."""
    d = common.saliency_dir(root, name, mask_root)
    if not d.is_dir():
        raise common.UserError(f"{d}: no masks (this model takes its foreground from masks); run `python "
                               f"mine_masks.py --data-root {root}` first, or pass --saliency/--mask-root")
    dropped = common.dropped_ids(d)
    for s in samples:
        s.saliency = d / f"{s.id}.png"
    missing = [s.saliency for s in samples if not s.saliency.is_file() and s.id not in dropped]
    if missing:
        raise common.UserError(f"{d}: no mask for {len(missing)} images (e.g. {missing[0].name}); run "
                               f"mine_masks.py on {root} first")
    if dropped:
        print(f"{len(dropped)} images listed in {d / 'dropped.txt'} count as having no foreground")
    return f"masks {d}"


# ======================================================================================================================

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    pos = common.positive_int
    g = p.add_argument_group("data")
    common.add_labelled_data_args(g, train_split=False)
    g.add_argument("--retrieval-split", default="train", help="labelled split whose prototypes form the retrieval "
                   "memory bank (released: train); 'none' = no retrieval")
    g.add_argument("--size", type=pos, default=512, help="images are resized to size×size for the model")
    g.add_argument("--foreground", default="auto", choices=["auto", "head", "masks"], help="where an image's object "
                   "is: the model's saliency head, or the masks of --saliency; auto = the head when the model has one")
    g.add_argument("--saliency", default="unsup", help="masks ROOT/saliency_<name>/<id>.png (0/255, written by "
                   "mine_masks.py; saliency_unsup by default) for --foreground masks")
    g.add_argument("--mask-root", default=None, help="read those masks from MASK_ROOT/saliency_<name>/")
    g = p.add_argument_group("model")
    common.add_checkpoint_arg(g)
    g.add_argument("--features", default="head", choices=["head", "decoder", "backbone"],
                   help="the layer read: head = the D-dim embedding (the paper's), decoder = the 256-d DeepLab-v3 "
                   "output, backbone = the dilated ResNet's last layer")
    g.add_argument("--logit-threshold", type=common.real_number, default=0.5, help="foreground = the saliency head's "
                   "logit (not a probability) above this (released: 0.5, i.e. probability 0.62)")
    g.add_argument("--objects", default="image", choices=["image", "components"], help="image: one prototype per "
                   "image over its foreground (the paper's); components: one per connected component (several classes)")
    g.add_argument("--min-area", type=common.probability, default=0.01, help="--objects components: a component "
                   "whose filled area is under this share of the image is background (the release's area rule)")
    g.add_argument("--fg-resize", default="nearest", choices=["nearest", "bilinear"], help="the head's foreground "
                   "at the label's size: thresholded at --size² then nearest (released), or the logits bilinear first")
    g.add_argument("--batch-size", type=pos, default=16)
    g = p.add_argument_group("clustering")
    g.add_argument("--cluster", default="objects", choices=["objects", "pixels"], help="objects: one prototype per "
                   "image (MaskContrast's); pixels: every pixel's features, background too (the baselines', supp. E)")
    g.add_argument("--fit-pixels", type=pos, default=100, help="--cluster pixels: random pixels per image that K-Means "
                   "is fitted on (every pixel is then assigned)")
    g.add_argument("--clusters", type=pos, nargs="+", default=None, help="clusters incl. the background one; "
                   "default = number of classes (Hungarian); more = overclustering (majority vote), e.g. 21 50 500")
    g.add_argument("--n-seeds", type=pos, default=5, help="K-Means runs with seeds --seed, --seed+1, ...")
    g.add_argument("--restarts", type=pos, default=10, help="k-means++ restarts per run; the lowest inertia wins")
    g.add_argument("--iters", type=pos, default=300, help="Lloyd iterations at most")
    g.add_argument("--pca-dim", type=common.nonnegative_int, default=32,
                   help="PCA with whitening to this many dims, as released (0 = off; a small split prefers off)")
    g.add_argument("--empty-prototypes", default="keep", choices=["keep", "drop"], help="an image without foreground: "
                   "its zero prototype takes part in PCA and K-Means (keep, released) or not (drop)")
    g.add_argument("--absent-classes", default="zero", choices=["zero", "skip"], help="a class absent from prediction "
                   "and ground truth counts 0 in the mean (released) or is left out (VOC convention; VOC val has all)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (default: CHECKPOINT_DIR/kmeans_<features>, or "
                   "runs/kmeans_<features>_<arch>_<baseline>)")
    g.add_argument("--resume", action="store_true", help="reuse the prototypes in --out (and redo the clustering)")
    g.add_argument("--n-figures", type=common.nonnegative_int, default=8,
                   help="val images shown in kmeans_val.png and retrieval.png")
    common.add_runtime_args(p)
    p.set_defaults(seed=1234, amp="none")  # the released seeds are 1234..1238; it scores in fp32
    return p.parse_args(argv)


def main(argv=None):
    # =========================================================================================================== args
    args = get_args(argv)
    common.resolve_download(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise common.UserError("kmeans_eval.py runs as one process (it batches its work instead); start it with "
                               "python, not torchrun")
    device = common.setup_world(args.device).device
    torch.backends.cudnn.benchmark = device.type == "cuda"
    what = f"kmeans_{args.features}" + ("_pixels" if args.cluster == "pixels" else "")
    out = Path(args.out or common.default_eval_out(args.checkpoint, args.arch, what))

    # =========================================================================================================== data
    if args.retrieval_split != "none":  # (a val image in the bank would retrieve itself: refused)
        _, bank_samples, val, n_classes = common.labelled_splits(args.data_root, args.retrieval_split, args.val_split,
                                                                 args.classes, args.workers, "--retrieval-split")
    else:
        val, bank_samples = common.list_samples(args.data_root, args.val_split, labels=True), []
        n_classes = common.scan_labels({args.val_split: val}, args.classes, args.workers)
    names = common.class_names(n_classes, args.data_root)
    clusters = args.clusters or [n_classes]
    resuming = common.prepare_out(out, args.resume, ["kmeans_eval.json", "prototypes.pt"])  # before any work

    # ========================================================================================================== model
    common.seed_all(args.seed)  # a random-weights baseline is the same network at every run
    model, kind, desc = common.load_model(args.checkpoint, args.arch, args.output_stride)
    common.check_trained(kind, args.features, args.checkpoint)
    weights = common.fingerprint(model.state_dict())
    model = model.to(device).eval().requires_grad_(False)
    reader = common.Reader(args.size, args.resize, args.batch_size, args.workers, device, args.amp)
    kc = Clustering([args.seed + i for i in range(args.n_seeds)], args.restarts, args.iters, args.pca_dim,
                    args.absent_classes, args.fit_pixels)
    objects = Objects(args.logit_threshold, args.objects, args.min_area, args.fg_resize)
    results = {"model": desc, "checkpoint": str(args.checkpoint), "weights": weights, "features": args.features,
               "cluster": args.cluster, "output_stride": args.output_stride, "resize": args.resize, "amp": args.amp,
               "images": len(val), "classes": names, "clusters": {}, "args": vars(args)}
    fg_from = "none: every pixel is clustered (the paper's protocol for the backbone baselines)"
    if args.cluster == "objects":
        head = model.saliency_head is not None and args.features == "head"
        if args.foreground == "head" and not head:
            raise common.UserError(f"--foreground head: {args.checkpoint} has no saliency head to read with "
                                   f"--features {args.features}; use --foreground masks (written by mine_masks.py)")
        fg_from = f"saliency head (logit > {args.logit_threshold}, {args.fg_resize} to the label)"
        if args.foreground == "masks" or not head:  # the foreground from the masks mine_masks.py wrote
            fg_from = use_masks(val + bank_samples, args.data_root, args.saliency, args.mask_root)
    print(f"{desc} (network {weights}); {args.features} features; foreground: {fg_from}; {len(val)} "
          f"{args.val_split} images, {n_classes} classes; device {device}")
    if args.cluster == "pixels":
        t = time.time()
        runs, shown, n_fit = pixel_kmeans(model, val, reader, args.features, clusters, kc, n_classes, args.n_figures)
        results.update({"fit_pixels": n_fit, "kmeans_s": time.time() - t})
        rows = summarise_runs(results, runs, clusters, n_classes, names, n_points=None)
        return finish(results, rows, val, shown, out, f"pixel K-Means fitted on {n_fit} pixels × {len(kc.seeds)} seeds")

    # ===================================================================================================== prototypes
    t = time.time()
    config = {"checkpoint": str(args.checkpoint), "weights": weights, "features": args.features,
              "output_stride": args.output_stride, "foreground": fg_from, "size": args.size, "resize": args.resize,
              "amp": args.amp, "objects": args.objects, "min_area": args.min_area, "ids": [s.id for s in val],
              "bank": [s.id for s in bank_samples], "n_classes": n_classes}
    cached = common.torch_load(out / "prototypes.pt") if resuming and (out / "prototypes.pt").is_file() else None
    if cached is not None and cached["config"] == config:
        q, b = cached["val"], cached["bank"]
        print(f"prototypes reused from {out / 'prototypes.pt'} (network {weights})")
    else:
        if cached is not None:  # another network, or other settings: the stored prototypes say nothing about these
            old = cached["config"]
            why = (f"network {old.get('weights')}, but {args.checkpoint} now holds network {weights}"
                   if old.get("weights") != weights else "other settings")
            print(f"note: {out / 'prototypes.pt'} holds the prototypes of {why}: computing them again")
        q = extract_prototypes(model, val, reader, args.features, objects, n_classes, args.n_figures)
        b = extract_prototypes(model, bank_samples, reader, args.features, objects, n_classes) if bank_samples else None
        common.save_object(out / "prototypes.pt", {"config": config, "val": q, "bank": b})
    t_extract = time.time() - t
    n_fg = int(q["image"][q["has_fg"]].unique().numel())
    print(f"{n_fg}/{len(val)} images have a foreground, {int(q['has_fg'].sum())} objects; embeddings "
          f"{q['img_per_s']:.1f} img/s at {args.size}²")
    if n_fg == 0:
        raise common.UserError("no image has a foreground: check --logit-threshold / the masks")

    # ===================================================================================================== clustering
    clustered = torch.ones_like(q["has_fg"]) if args.empty_prototypes == "keep" else q["has_fg"]
    x = q["protos"][clustered].to(device)
    if args.pca_dim:
        if len(x) < 10 * args.pca_dim:  # each whitened direction weighs the same, the noisy ones included
            print(f"note: whitening {len(x)} prototypes to {args.pca_dim} dims amplifies their noise directions; "
                  "on small splits --pca-dim 0 (or a smaller one) can cluster better")
        x = pca_whiten(x, args.pca_dim)
    t = time.time()
    runs = {n_total: run_clustering(x, clustered, q, n_total, kc, n_classes) for n_total in clusters
            if 2 <= n_total <= len(x) + 1}
    rows = summarise_runs(results, runs, clusters, n_classes, names, n_points=len(x))
    t_kmeans = time.time() - t

    # ====================================================================================================== retrieval
    if b is not None:
        variants = [None]
        if n_classes == len(common.VOC_CLASSES):
            variants.append([common.VOC_CLASSES.index(c) for c in RETRIEVAL_7])
        results["retrieval"] = {"split": args.retrieval_split}
        for classes in variants:
            r = retrieval(b, q, n_classes, classes, args.absent_classes)
            label = f"{n_classes if classes is None else len(classes)} classes"
            results["retrieval"][label] = {"miou": r["miou"], "bank_size": r["bank"],
                                           "per_class_iou": dict(zip(names, r["iou"].tolist()))}
            rows.append((f"retrieval {label}", f"top-1 of {r['bank']}", r["miou"], "-"))
            if classes is None:
                save_retrieval_figure(val, bank_samples, q, b, r["neighbours"], out / "retrieval.png", args.n_figures)

    # =========================================================================================================== save
    shown = []
    if runs and q["shown"]:
        first = next(iter(runs.values()))[0]
        ids = F.pad(first["ids"], (1, 0))  # object map value v → prototype v − 1's cluster; 0 → background
        shown = [(i, y, first["mapping"][ids[objmap]]) for i, y, objmap in q["shown"]]
    results.update({"foreground": fg_from, "objects": args.objects, "with_foreground": n_fg,
                    "object_prototypes": int(q["has_fg"].sum()), "extract_s": t_extract,
                    "embed_img_per_s": q["img_per_s"], "kmeans_s": t_kmeans})
    return finish(results, rows, val, shown, out, f"K-Means of {len(x)} prototypes × {len(kc.seeds)} seeds × "
                  f"{len(clusters)} settings in {t_kmeans:.1f} s")


if __name__ == "__main__":
    common.run_main(main)
