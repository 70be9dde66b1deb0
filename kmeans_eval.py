r"""Clustering evaluation: paper Sec. 4.1-II ("K-Means"), Sec. 4.4 and supp. E; Tables 3b and 4; Fig. 4 (retrieval).

No labels touch the model. Every val image gets one object prototype: the mean of its embeddings over the pixels its
saliency head calls foreground, L2-normalised. K-Means groups the prototypes; each image's foreground is painted with
its cluster and everything else is background. Clusters are then matched to classes on the whole split — one-to-one
(Hungarian on IoU, scipy's linear_sum_assignment) when there are as many clusters as classes, many-to-one by majority
vote when overclustering (Table 4) — and scored with mIoU at each image's original size. Five K-Means seeds,
mean ± std.

Where the paper is silent we follow the released code (README lists these):
  * prototype = the 32-d head output (not normalised per pixel) weighted by the raw saliency logit where the logit is
    above --threshold 0.5, summed, then L2-normalised;
  * PCA to 32 dims with whitening before K-Means (--pca-dim); the background counts as one more "cluster" that takes
    part in the matching, so --clusters 21 on VOC = 20 K-Means clusters + background. An image with no foreground
    pixel is all background and takes no part in K-Means.
Ours differs in: full-batch Lloyd K-Means with k-means++ and --restarts (the release: sklearn's MiniBatchKMeans);
majority vote by pixel count (the release: the class of highest IoU); labels kept at their original size (the
release: 512² predictions resized nearest to the label); classes absent from both prediction and ground truth left out
of the mean (VOC convention; the release counted them as 0).

Retrieval (--retrieval-split train): prototypes of a labeled train split, each labeled with the majority class inside
its foreground (background and 255 excluded; images without one are dropped); every val image takes its nearest
(cosine) train prototype's class on its foreground. On VOC it also reports the released 7-class variant (aeroplane,
bottle, bus, car, cat, cow, person; all other classes become "ignore", mean over the 7 without background).

Baselines: a model without a saliency head (--checkpoint random, or --features backbone for the dilated backbone's last
layer of any --backbone-init) takes its foreground from a folder of masks written by mine_masks.py (--saliency NAME,
read from ROOT/saliency_NAME or MASK_ROOT/saliency_NAME); with a folder, each prototype is the plain mean over the mask.

Commands
  1 GPU (paper):  python kmeans_eval.py --data-root VOC --checkpoint runs/pretrain/checkpoint.pth \
                      --retrieval-split train
  overclustering: ... --clusters 21 50 100 200 500
  baselines:      python kmeans_eval.py --data-root ... --checkpoint random --arch resnet50 --saliency unsup
                  python kmeans_eval.py --data-root ... --features backbone --backbone-init moco_v2_800ep.pth \
                      --arch resnet50 --saliency unsup
  CPU demo:       python kmeans_eval.py --data-root demo_out/data --checkpoint demo_out/pretrain/checkpoint.pth \
                      --size 96 --retrieval-split train

Paper numbers (PASCAL VOC 2012 val, ResNet-50, mIoU %): K-Means 35.0 (unsupervised saliency) / 44.2 (supervised
saliency); retrieval 7 / 21 classes: 53.4 / 43.3 (unsupervised saliency), 62.3 / 49.6 (supervised), MoCo v2 48.0 / 39.0.

Outputs in --out (default: next to the checkpoint): kmeans_eval.json (mIoU per seed, mean, std, per-class IoU per
cluster count; retrieval; timings), kmeans_val.png (image | ground truth | clusters matched to classes),
retrieval.png (each val query followed by its top-5 train neighbours).
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader
from tqdm import tqdm

import common

# the released 7-class retrieval variant (the classes other works evaluate on)
RETRIEVAL_7 = ("aeroplane", "bottle", "bus", "car", "cat", "cow", "person")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-root", required=True, help="VOC-layout root with labels (SegmentationClass[Aug])")
    common.add_download_arg(g)
    g.add_argument("--split", default="val", help="split that is clustered and scored")
    g.add_argument("--classes", type=int, default=0, help="number of classes incl. background; 0 = largest label in "
                   "the split(s) + 1 (21 on VOC)")
    g.add_argument("--size", type=int, default=512, help="images are resized to size×size for the model")
    g.add_argument("--saliency", default=None, help="take the foreground from ROOT/saliency_<NAME>/<id>.png (0/255, "
                   "written by mine_masks.py) instead of the model's saliency head")
    g.add_argument("--mask-root", default=None, help="read the --saliency masks from MASK_ROOT/saliency_<NAME>/")
    g = p.add_argument_group("model")
    common.add_load_model_args(g)
    g.add_argument("--features", default="head", choices=["head", "backbone"],
                   help="head: the D-dim embedding head (the paper's); backbone: the dilated ResNet's last layer")
    g.add_argument("--threshold", type=float, default=0.5, help="foreground = saliency logit above this (released)")
    g.add_argument("--batch-size", type=int, default=16)
    g = p.add_argument_group("clustering")
    g.add_argument("--clusters", type=int, nargs="+", default=None, help="clusters incl. the background one; "
                   "default = number of classes (Hungarian); more = overclustering (majority vote), e.g. 21 50 100 "
                   "200 500")
    g.add_argument("--n-seeds", type=int, default=5, help="K-Means runs with seeds --seed, --seed+1, ...")
    g.add_argument("--restarts", type=int, default=10, help="k-means++ restarts per run; the lowest inertia wins")
    g.add_argument("--iters", type=int, default=300, help="Lloyd iterations at most")
    g.add_argument("--pca-dim", type=int, default=32, help="PCA with whitening to this many dims (0 = off)")
    g.add_argument("--retrieval-split", default=None, help="labeled split whose prototypes form the retrieval "
                   "memory bank (released: train)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (default: CHECKPOINT_DIR/kmeans_<features>[_saliency_"
                   "<NAME>], or runs/kmeans_<features>..._<arch>_<init> for --checkpoint random)")
    g.add_argument("--n-figures", type=int, default=8, help="val images shown in kmeans_val.png and retrieval.png")
    common.add_runtime_args(p)
    p.set_defaults(seed=1234)  # the released seeds are 1234..1238
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Matching clusters to classes

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


def match_clusters(pred, gt, n_clusters, n_classes, ignore_index=common.IGNORE):
    """Cluster → class map (LongTensor (n_clusters,)) from cluster ids `pred` and labels `gt` of the same shape:
    one-to-one Hungarian on IoU when n_clusters == n_classes (also when fewer), majority vote when overclustering."""
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long().to(pred.device)
    keep = gt != ignore_index
    conf = torch.bincount(pred[keep] * n_classes + gt[keep], minlength=n_clusters * n_classes)
    return match_from_confusion(conf.reshape(n_clusters, n_classes).cpu())


# ----------------------------------------------------------------------------------------------------------------------
# PCA and K-Means in torch

def pca_whiten(x, dim):
    """Project centred rows of x on their top `dim` principal axes, each scaled to unit variance (sklearn's whiten)."""
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = min(dim, int((s > s[0] * 1e-6).sum())) if s.numel() and s[0] > 0 else 0
    if keep == 0:
        return x[:, :0]
    return x @ vh[:keep].T / (s[:keep] / math.sqrt(max(len(x) - 1, 1)))


def kmeans_pp(x, k, gen):
    """k-means++ seeding: each new centre drawn with probability proportional to its squared distance to the nearest."""
    n = len(x)
    idx = [int(torch.randint(n, (1,), generator=gen, device=x.device))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)
    for _ in range(1, k):
        if d2.sum() > 0:
            i = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))
        else:  # every point sits on a centre already: any other point will do
            i = int(torch.randint(n, (1,), generator=gen, device=x.device))
        idx.append(i)
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return x[idx].clone()


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


# ----------------------------------------------------------------------------------------------------------------------
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
        m = common.read_mask(s.saliency)
        if m.shape != y.shape:
            raise common.UserError(f"{s.saliency}: mask is {tuple(m.shape)}, image {s.image} is {tuple(y.shape)}; "
                                   "re-run mine_masks.py on this data")
        return x, y, m > 127, i


def collate(batch):
    xs, ys, ms, idx = zip(*batch)
    return torch.stack(xs), list(ys), list(ms), torch.tensor(idx)


@torch.no_grad()
def extract(model, samples, args, device, n_classes, keep=0):
    """One prototype per image and, for scoring without re-reading anything, per-image histograms of the ground-truth
    classes inside and outside its foreground. Returns dict(protos (N, D), has_fg (N,), fg_hist / bg_hist (N, C),
    masks: the first `keep` (sample, label, foreground) at label size, img_per_s)."""
    ds = ProtoDataset(samples, common.eval_transform(args.size), keep_label_size=True)
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    protos, has_fg, fg_hist, bg_hist, masks = [], [], [], [], []
    n_done, t_model = 0, 0.0
    for x, ys, ms, idx in tqdm(loader, desc=f"prototypes {samples[0].image.parent.parent.name}", leave=False):
        t = time.time()
        x = x.to(device, non_blocking=True)
        with common.autocast(device, args.amp):
            if args.features == "head":
                emb, logit = model(x)  # both upsampled to the input size, as the release does
            else:
                emb, logit = model.backbone_features(x), None
        emb = emb.float()
        if ms[0] is not None:  # foreground from the folder: a plain mean over the mask, at the embedding's resolution
            m = torch.stack([F.interpolate(mk[None, None].float(), size=x.shape[-2:], mode="nearest")[0, 0]
                             for mk in ms]).to(device)
            w = F.adaptive_avg_pool2d(m[:, None], emb.shape[-2:])[:, 0]
        else:
            logit = logit.float()
            w = logit.clamp(min=0) * (logit > args.threshold)  # the released weighting: the logit where foreground
        p = torch.einsum("ndhw,nhw->nd", emb, w)
        has = (w.flatten(1).sum(1) > 0).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_model += time.time() - t
        protos.append(F.normalize(p, dim=1).cpu())
        has_fg.append(has)
        for j, y in enumerate(ys):
            if ((y >= n_classes) & (y != common.IGNORE)).any():
                raise common.UserError(f"{samples[int(idx[j])].label}: has labels >= {n_classes}; pass --classes")
            if not has[j]:
                fg = torch.zeros_like(y, dtype=torch.bool)
            elif ms[j] is not None:
                fg = ms[j]
            else:
                fg = F.interpolate(logit[j][None, None], size=y.shape, mode="bilinear",
                                   align_corners=False)[0, 0].cpu() > args.threshold
            valid = y != common.IGNORE
            fg_hist.append(torch.bincount(y[fg & valid], minlength=n_classes))
            bg_hist.append(torch.bincount(y[~fg & valid], minlength=n_classes))
            if len(masks) < keep:
                masks.append((samples[int(idx[j])], y, fg))
        n_done += len(x)
    return {"protos": torch.cat(protos), "has_fg": torch.cat(has_fg),
            "fg_hist": torch.stack(fg_hist), "bg_hist": torch.stack(bg_hist), "masks": masks,
            "img_per_s": n_done / max(t_model, 1e-9)}


# ----------------------------------------------------------------------------------------------------------------------
# Scoring

def cluster_confusion(ids, fg_hist, bg_hist, n_ids):
    """(n_ids, C) pixel counts of prediction id vs ground-truth class: every image's background pixels go to id 0, its
    foreground pixels to its own id."""
    conf = torch.zeros(n_ids, fg_hist.shape[1], dtype=torch.long)
    conf[0] += bg_hist.sum(0)
    return conf.index_add_(0, ids, fg_hist)


def score(conf_ids, mapping, n_classes):
    """(mIoU, per-class IoU) of the class confusion (rows = ground truth) after mapping prediction ids to classes."""
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    conf.index_add_(1, mapping, conf_ids.T.contiguous())
    return common.miou_from_confusion(conf)


def run_clustering(x, has_fg, fg_hist, bg_hist, n_total, seeds, args, n_classes):
    """K-Means with n_total − 1 clusters on the prototypes of images with a foreground, once per seed."""
    out = []
    for s in seeds:
        assign = kmeans(x, n_total - 1, s, args.restarts, args.iters)[0].cpu()
        ids = torch.zeros(len(has_fg), dtype=torch.long)
        ids[has_fg] = assign + 1
        conf_ids = cluster_confusion(ids, fg_hist, bg_hist, n_total)
        mapping = match_from_confusion(conf_ids)
        miou, iou = score(conf_ids, mapping, n_classes)
        out.append({"seed": s, "miou": miou, "iou": iou, "ids": ids, "mapping": mapping})
    return out


def retrieval(bank, query, n_classes, classes=None):
    """Each query image takes the class of its nearest bank prototype (cosine) on its foreground. `classes`: only these
    (plus background) are kept — the others become ignore, in the bank's labels and in the scoring."""
    fg_b, fg_q, bg_q = bank["fg_hist"].clone(), query["fg_hist"].clone(), query["bg_hist"].clone()
    if classes is not None:
        drop = [c for c in range(1, n_classes) if c not in classes]
        fg_b[:, drop], fg_q[:, drop], bg_q[:, drop] = 0, 0, 0
    objects = fg_b[:, 1:]
    usable = bank["has_fg"] & (objects.sum(1) > 0)
    if not usable.any():
        raise common.UserError("retrieval: no train image has a labeled object inside its foreground")
    labels = objects[usable].argmax(1) + 1
    sim = query["protos"] @ bank["protos"][usable].T
    nn_idx = sim.topk(min(5, int(usable.sum())), dim=1).indices
    pred = torch.where(query["has_fg"], labels[nn_idx[:, 0]], torch.zeros_like(nn_idx[:, 0]))
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    conf[:, 0] += bg_q.sum(0)
    conf.index_add_(1, pred, fg_q.T.contiguous())
    miou, iou = common.miou_from_confusion(conf)
    if classes is not None:
        miou = float(iou[list(classes)].nanmean())
    return {"miou": miou, "iou": iou, "bank": int(usable.sum()), "neighbours": usable.nonzero()[:, 0][nn_idx],
            "pred": pred}


def save_cluster_figure(masks, ids, mapping, path, tile=160):
    """One row per image: image | ground truth | its foreground painted with its cluster's matched class."""
    tiles = []
    for (s, y, fg), i in zip(masks, ids):
        pred = torch.where(fg, mapping[i], mapping[0])
        tiles += [common.read_image(s.image), common.colorize(y), common.colorize(pred)]
    if tiles:
        common.save_grid(tiles, path, ncol=3, size=tile)


def save_retrieval_figure(query_samples, bank_samples, neighbours, has_fg, path, n, tile=128):
    """One row per val query that has a foreground: the query, then its top-5 train neighbours."""
    tiles, rows = [], 0
    for q in range(len(query_samples)):
        if rows == n:
            break
        if not has_fg[q]:
            continue
        row = [common.read_image(query_samples[q].image)] + [common.read_image(bank_samples[int(j)].image)
                                                             for j in neighbours[q]]
        tiles += row + [torch.full_like(row[0], 255)] * (6 - len(row))
        rows += 1
    if tiles:
        common.save_grid(tiles, path, ncol=6, size=tile)


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------ args
    args = get_args(argv)
    common.resolve_download(args)
    rt = common.setup_runtime(args.device)
    if rt.world > 1:
        raise common.UserError("kmeans_eval.py runs as one process (it takes seconds on one GPU); drop torchrun")
    device = rt.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out) if args.out else common.default_out(
        args, f"kmeans_{args.features}" + (f"_saliency_{args.saliency}" if args.saliency else ""))

    # ------------------------------------------------------------------------------------------------------ data
    val = common.list_samples(args.data_root, args.split, saliency=args.saliency, mask_root=args.mask_root,
                              labels=True)
    bank_samples = (common.list_samples(args.data_root, args.retrieval_split, saliency=args.saliency,
                                        mask_root=args.mask_root, labels=True) if args.retrieval_split else [])
    if args.saliency:
        d = common.saliency_dir(args.data_root, args.saliency, args.mask_root)
        dropped = set((d / "dropped.txt").read_text().split()) if (d / "dropped.txt").is_file() else set()
        missing = [s.saliency for s in val + bank_samples if not s.saliency.is_file() and s.id not in dropped]
        if missing:
            raise common.UserError(f"{d}: no mask for {len(missing)} images (e.g. {missing[0].name}); run "
                                   f"mine_masks.py on {args.data_root} first")
        if dropped:
            print(f"{len(dropped)} images listed in {d / 'dropped.txt'} count as having no foreground")
    n_classes = common.scan_classes(val + bank_samples, args.classes)
    names = common.class_names(n_classes)
    clusters = args.clusters or [n_classes]

    # ----------------------------------------------------------------------------------------------------- model
    common.seed_all(args.seed)
    model, desc = common.load_model(args.checkpoint, args.arch, args.backbone_init)
    if args.features == "head" and model.saliency_head is None and not args.saliency:
        raise common.UserError(f"{args.checkpoint}: this model has no saliency head; pass --saliency NAME (masks "
                               "written by mine_masks.py) to take the foreground from a folder")
    if args.features == "backbone" and not args.saliency:
        raise common.UserError("--features backbone has no saliency head; pass --saliency NAME (masks written by "
                               "mine_masks.py)")
    model = common.freeze(model.to(device))
    fg_from = f"masks {common.saliency_dir(args.data_root, args.saliency, args.mask_root)}" if args.saliency else \
        f"saliency head (logit > {args.threshold})"
    print(f"{desc}; {args.features} embeddings; foreground from {fg_from}; {len(val)} {args.split} images, "
          f"{n_classes} classes; device {device}")

    # ------------------------------------------------------------------------------------------------------ loop
    t = time.time()
    q = extract(model, val, args, device, n_classes, keep=args.n_figures)
    t_extract = time.time() - t
    n_fg = int(q["has_fg"].sum())
    print(f"{n_fg}/{len(val)} images have a foreground; embeddings {q['img_per_s']:.1f} img/s at {args.size}²")
    if n_fg == 0:
        raise common.UserError("no image has a foreground: check --threshold / the masks")
    x = q["protos"][q["has_fg"]].to(device)
    if args.pca_dim:
        if n_fg < 10 * args.pca_dim:  # each whitened direction weighs the same, the noisy ones included
            print(f"note: whitening {n_fg} prototypes to {args.pca_dim} dims amplifies their noise directions; "
                  "on small splits --pca-dim 0 (or a smaller one) can cluster better")
        x = pca_whiten(x, args.pca_dim)
    seeds = [args.seed + i for i in range(args.n_seeds)]
    results, rows, first = {"clusters": {}}, [], None
    t = time.time()
    for n_total in clusters:
        if n_total - 1 > n_fg or n_total < 2:
            print(f"--clusters {n_total}: skipped ({n_fg} prototypes, need between 1 and {n_fg} K-Means clusters)")
            results["clusters"][str(n_total)] = {"skipped": f"{n_fg} prototypes"}
            continue
        runs = run_clustering(x, q["has_fg"], q["fg_hist"], q["bg_hist"], n_total, seeds, args, n_classes)
        first = first or runs[0]
        m = torch.tensor([r["miou"] for r in runs])
        std = float(m.std()) if len(m) > 1 else 0.0
        results["clusters"][str(n_total)] = {
            "matching": "hungarian" if n_total <= n_classes else "majority", "seeds": seeds,
            "miou_per_seed": m.tolist(), "miou_mean": float(m.mean()), "miou_std": std,
            "per_class_iou_mean": {n: float(v) for n, v in zip(names, torch.stack([r["iou"] for r in runs])
                                                                  .nanmean(0))}}
        rows.append((f"K-Means {n_total}", results["clusters"][str(n_total)]["matching"], float(m.mean()), std))
    t_kmeans = time.time() - t

    if bank_samples:
        b = extract(model, bank_samples, args, device, n_classes)
        variants = {"all": None}
        if n_classes == len(common.VOC_CLASSES):
            variants["7"] = [common.VOC_CLASSES.index(c) for c in RETRIEVAL_7]
        results["retrieval"] = {"split": args.retrieval_split}
        for key, classes in variants.items():
            r = retrieval(b, q, n_classes, classes)
            label = f"{n_classes} classes" if classes is None else f"{len(classes)} classes"
            results["retrieval"][label] = {"miou": r["miou"], "bank_size": r["bank"],
                                           "per_class_iou": {n: float(v) for n, v in zip(names, r["iou"])}}
            rows.append((f"retrieval {label}", f"top-1 of {r['bank']}", r["miou"], "-"))
            if classes is None:
                save_retrieval_figure(val, bank_samples, r["neighbours"], q["has_fg"], out / "retrieval.png",
                                      args.n_figures)

    # ------------------------------------------------------------------------------------------------------ save
    if first is not None:
        save_cluster_figure(q["masks"], first["ids"], first["mapping"], out / "kmeans_val.png")
    results.update({"model": desc, "checkpoint": str(args.checkpoint), "features": args.features,
                    "foreground": fg_from, "images": len(val), "with_foreground": n_fg, "classes": names,
                    "extract_s": t_extract, "embed_img_per_s": q["img_per_s"], "kmeans_s": t_kmeans,
                    "args": vars(args)})
    common.write_json(out / "kmeans_eval.json", results)
    common.print_table(rows, ["protocol", "matching", "mIoU %", "std"])
    print(f"K-Means of {n_fg} prototypes × {len(seeds)} seeds × {len(rows)} settings in {t_kmeans:.1f} s → "
          f"{out / 'kmeans_eval.json'}")
    return results


if __name__ == "__main__":
    common.run_main(main)
