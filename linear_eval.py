r"""The linear classifier on frozen features: paper Sec. 4.1-I ("linear classifier") and supp. D; Tables 1, 3a, 5.

A pretrained network is frozen whole (weights, BatchNorm statistics, eval mode so dropout is off). A fresh 1×1 conv
from its 256-d decoder output to the classes is the only thing trained: cross-entropy (255 ignored) on the logits
upsampled to the 512² crop, SGD, flip + scale/rotation jitter, as released. The val split is scored at each image's
original size (VOC mIoU) at the LAST epoch: the release kept the epoch with the best val mIoU, which selects on the
test split. --crf also scores LC + CRF (a dense CRF in torch, at the release's settings). A MoCo-style sanity check
fails the run if any tensor of the frozen network moved.

Commands
  python linear_eval.py --data-root VOC --checkpoint runs/pretrain/checkpoint.pth          # Tables 1 and 3a
  python linear_eval.py --data-root VOC --checkpoint runs/pretrain/checkpoint.pth --crf    # + the CRF column
  # Table 1's baselines as the paper ran them (supp. C): backbone features, only layer4 dilated (output stride 16)
  python linear_eval.py --data-root VOC --checkpoint moco_v2_800ep_pretrain.pth.tar --features backbone \
      --output-stride 16
  python linear_eval.py --data-root VOC --checkpoint imagenet --features backbone --output-stride 16
  python linear_eval.py --data-root VOC --checkpoint random --features backbone        # random weights
  torchrun --nproc_per_node 2 linear_eval.py ...same flags...  (--batch-size stays the global batch)
  ... --predict my_photos/   segments your own images (a finished run given --resume goes straight there)

Outputs in --out (default: next to the checkpoint): linear.pth (the classifier, every epoch), linear_eval.json
(mIoU, per-class IoU, the loss per epoch), linear_val.png (image | ground truth | prediction [| with CRF]).
"""
import argparse
import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.utils import draw_segmentation_masks
from tqdm import tqdm

import common


# ======================================================================================================================
# The linear protocol

class LinearProbe(nn.Module):
    """A frozen network and a fresh 1×1 conv on its layer `features`, initialised as released (N(0, 0.01), zero
    bias): every class starts near zero."""

    def __init__(self, model, features, n_classes):
        super().__init__()
        self.model, self.features = model.eval().requires_grad_(False), features
        self.classifier = nn.Conv2d(model.layer_channels(features), n_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def train(self, mode=True):
        super().train(mode)
        self.model.eval()  # the frozen network keeps its BatchNorm statistics and has no dropout
        return self

    def forward(self, x):
        with torch.no_grad():
            f = self.model.layer_features(x, self.features)
        return self.classifier(f)  # class logits at stride 8


def check_frozen(model, before):
    """MoCo's sanity check: no tensor of the frozen network's state dict (weights, BN buffers) changed."""
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v.cpu(), before[k])]
    if changed:
        raise RuntimeError(f"sanity check failed: {len(changed)} tensors of the frozen network changed during linear "
                           f"training, e.g. {changed[:3]}")


# ======================================================================================================================
# Dense CRF (the release's LC + CRF column), in torch

# Mean-field inference in the fully connected CRF of Krähenbühl & Koltun ("Efficient Inference in Fully Connected CRFs
# with Gaussian Edge Potentials", NeurIPS 2011) with the arithmetic of the C++ code pydensecrf wraps (DenseCRF2D,
# addPairwiseGaussian/Bilateral, Potts, DIAG_KERNEL, NORMALIZE_SYMMETRIC), as the release uses it. Both kernels are
# filtered with the permutohedral lattice of Adams, Baek & Davis (Eurographics 2010): splat, blur, slice, as sparse
# (CSR) matrices on the inputs' device, the C++ hash table a sort of packed keys. On 320 VOC images it gives
# pydensecrf's argmax on every pixel (NOTES.md); tests/golden/crf_pydensecrf.json pins it.

def _lattice(feat):
    """Permutohedral lattice for feat N×d float32 (features divided by their stds) as sparse matrices, with M lattice
    points: splat M×N, blurs: d+1 of M×M, slice N×M = splat^T."""
    n, d = feat.shape
    dev = feat.device
    # Elevate onto the plane sum(x)=0 of R^(d+1), scaled for a blur of unit std in feature space (Adams et al.
    # p.5-6); in float32 and the C++ order, so that the rounding below agrees with it.
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scale = torch.tensor([1.0 / math.sqrt((i + 1) * (i + 2)) * inv_std for i in range(d)], device=dev)
    inv = torch.tensor(1.0 / (d + 1), device=dev)                  # float32, as the C++ multiplies
    cf = feat * scale                                              # N×d
    elev = torch.empty(n, d + 1, device=dev)                       # N×d+1
    acc = torch.zeros(n, device=dev)
    for j in range(d, 0, -1):
        elev[:, j] = acc - j * cf[:, j - 1]
        acc = acc + cf[:, j - 1]
    elev[:, 0] = acc

    # Nearest remainder-0 point (all coordinates multiples of d+1), then the rank of each residual
    # coordinate in decreasing order (ties to the lower index); the rank says which simplex we are in.
    down = torch.round(elev * inv)                                 # N×d+1, integer-valued
    rem0 = down * (d + 1)
    res = elev - rem0
    less = res[:, :, None] < res[:, None, :]                       # N×d+1×d+1: res_i < res_j
    upper = torch.ones(d + 1, d + 1, dtype=torch.bool, device=dev).triu(1)   # i < j
    rank = (less & upper).sum(2) + (~less & upper).sum(1) + down.sum(1, keepdim=True).long()
    # The rounded point may lie off the plane (sum(down) != 0): wrapping the rank brings it back.
    wrap = (rank < 0).long() - (rank > d).long()                   # N×d+1
    rank = rank + (d + 1) * wrap
    rem0 = rem0 + (d + 1) * wrap

    # Barycentric weights (Adams et al. p.10): differences of the sorted residuals.
    by_pos = torch.zeros(n, d + 1, device=dev).scatter_(1, d - rank, (elev - rem0) * inv)
    weight = by_pos - F.pad(by_pos[:, :-1], (1, 0))
    weight[:, 0] += 1 - by_pos[:, d]

    # Corner r of the simplex is rem0 + the canonical offset r - (d+1)·[rank > d-r]; the last of
    # the d+1 coordinates is implied by sum = 0, so keys have d integers.
    r = torch.arange(d + 1, device=dev)[None, :, None]             # (1, d+1, 1)
    keys = rem0[:, None, :d].long() + r - (d + 1) * (rank[:, None, :d] > d - r).long()  # N×d+1×d
    # Pack keys into one int64 with d+1 of margin per coordinate: a neighbour's code is the point's plus a constant.
    lo = keys.amin((0, 1)) - (d + 1)
    span = keys.amax((0, 1)) - lo + d + 2
    assert math.prod(span.tolist()) < 2 ** 62, "lattice too large to pack into int64"
    stride = torch.cumprod(torch.cat([span.new_ones(1), span[:-1]]), 0)   # (d,)
    points, vertex, count = torch.unique(((keys - lo) * stride).sum(2), return_inverse=True,
                                         return_counts=True)       # (M,), N×d+1, (M,)
    m = len(points)

    # CSR: a fast sparse @ dense on CPU and CUDA. Filtering is slice @ blur_d @ ... @ blur_0 @ splat.
    cols, order = vertex.sort(1)
    slice_ = _csr(torch.full((n,), d + 1, device=dev), cols, weight.gather(1, order), (n, m))
    order = vertex.reshape(-1).argsort(stable=True)                # entries grouped by lattice point
    splat = _csr(count, order // (d + 1), weight.reshape(-1)[order], (m, n))
    # Blur along lattice axis j with [1/2, 1, 1/2]: a neighbour has every coordinate -1 except
    # coordinate j, which moves +d; absent neighbours contribute nothing.
    blurs = []
    point = torch.arange(m, device=dev)
    for step in [(d + 1) * stride[j] - stride.sum() for j in range(d)] + [-stride.sum()]:
        code = torch.stack([points, points + step, points - step], 1)        # M×3
        idx = torch.searchsorted(points, code).clamp(max=m - 1)
        keep = points[idx] == code
        idx, order = torch.where(keep, idx, point[:, None]).sort(1)  # columns ascending per row
        keep = keep.gather(1, order)
        vals = torch.tensor([1.0, 0.5, 0.5], device=dev).expand(m, 3).gather(1, order)
        blurs.append(_csr(keep.sum(1), idx[keep], vals[keep], (m, m)))     # M×M
    return splat, blurs, slice_


def _csr(count, cols, vals, size):
    """CSR matrix from its entries listed row by row, count (R,) entries in each row.  Indices are
    int32, which the CPU product uses natively (int64 would be converted at every product)."""
    crow = F.pad(count.cumsum(0), (1, 0))
    with warnings.catch_warnings():  # silence torch's "sparse CSR support is in beta" notice
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow.int(), cols.int(), vals, size, check_invariants=False)


def _filter(x, splat, blurs, slice_):
    """Approximate Gaussian filtering sum_j k(f_i, f_j) x_j of x N×C, the pixel's own term included as in the
    reference; its constant factor 1/(1+2^-d) is left out: the normalisation cancels it."""
    y = splat @ x                                                  # M×C
    for blur in blurs:
        y = blur @ y
    return slice_ @ y                                              # N×C


def dense_crf(image, probs, iters=10, gauss_sxy=1.0, gauss_compat=3.0, bilat_sxy=67.0,
              bilat_srgb=3.0, bilat_compat=4.0):
    """image: uint8 3×H×W RGB (image.flip(0) reproduces the release, see CRFRefine); probs: C×H×W class
    probabilities on the same device. Returns float32 C×H×W: the mean-field marginals Q after `iters` iterations."""
    c, h, w = probs.shape
    assert image.shape == (3, h, w) and image.dtype == torch.uint8, "image must be uint8 (3, H, W)"
    dev = probs.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    xy = torch.stack([xs, ys], -1).reshape(-1, 2)                  # N×2, x first as DenseCRF2D
    rgb = image.reshape(3, -1).t().float()                         # N×3
    kernels = []
    for feat, compat in ((xy / gauss_sxy, gauss_compat),
                         (torch.cat([xy / bilat_sxy, rgb / bilat_srgb], 1), bilat_compat)):
        lattice = _lattice(feat)
        # NORMALIZE_SYMMETRIC: K -> D^-1/2 K D^-1/2 with D = K·1 (each pixel's total kernel weight).
        norm = _filter(torch.ones(h * w, 1, device=dev), *lattice).rsqrt()   # N×1
        kernels.append((lattice, norm, compat))

    # Unary -log p, with p clipped at 1e-5 as pydensecrf.utils.unary_from_softmax does.
    unary = -probs.float().clamp_min(1e-5).log().reshape(c, -1).t()  # N×C
    q = torch.softmax(-unary, 1)
    for _ in range(iters):
        # Potts energy w·[l_i != l_j] equals -w·[l_i == l_j] up to a constant, so each kernel's
        # message *adds* w·(filtered Q) to the logits: Q ∝ exp(-U + Σ_k w_k · K̃_k Q).
        logits = -unary
        for lattice, norm, compat in kernels:
            logits = logits + compat * norm * _filter(norm * q, *lattice)
        q = torch.softmax(logits, 1)
    return q.t().reshape(c, h, w).contiguous()


# ======================================================================================================================
# Pictures and your own images

def save_figure(shown, shown_crf, path, tile=160):
    """One row per image: image | ground truth | prediction [| prediction after the CRF] (VOC palette)."""
    tiles = []
    for k, (s, y, pred) in enumerate(shown):
        tiles += [common.read_image(s.image), common.colorize(y), common.colorize(pred)]
        if shown_crf:
            tiles.append(common.colorize(shown_crf[k]))
    if tiles:
        common.save_grid(tiles, path, ncol=4 if shown_crf else 3, size=tile)


@torch.no_grad()
def predict_folder(probe, folder, out, reader, n_classes, crf):
    """Segment the user's own images: a palette PNG and an overlay per image, at the image's own size."""
    probe.eval()
    device, amp, tf = reader.device, reader.amp, common.eval_transform(reader.size, reader.resize)
    samples, pal = common.list_samples(folder), common.voc_palette()
    for s in tqdm(samples, desc="predict"):
        img = common.read_image(s.image)
        with common.autocast(device, amp):
            logits = probe(tf(tv_tensors.Image(img))[None].to(device)).float()
        probs = F.interpolate(logits, size=img.shape[1:], mode="bilinear", align_corners=False)[0].softmax(0)
        pred = (dense_crf(img.flip(0).to(device), probs) if crf else probs).argmax(0).cpu()
        common.save_label_png(pred.numpy(), out / f"{s.id}.png")
        present = [c for c in range(1, n_classes) if (pred == c).any()]
        if present:
            colors = [tuple(int(v) for v in pal[c]) for c in present]
            img = draw_segmentation_masks(img, torch.stack([pred == c for c in present]), alpha=0.5, colors=colors)
        common.save_png(img.permute(1, 2, 0).numpy(), out / f"{s.id}_overlay.png")
    return len(samples)


class CRFRefine:
    """evaluate_segmentation's `refine`: the dense CRF of a val image's class probabilities."""

    def __init__(self, device, keep=0):
        self.device, self.keep, self.shown = device, keep, []

    def __call__(self, sample, probs):
        # the release hands the CRF OpenCV's BGR image; the lattice is not symmetric in the channel order (RGB gives
        # the same argmax on 99.87 % of the pixels)
        q = dense_crf(common.read_image(sample.image).flip(0).to(self.device), probs)
        if len(self.shown) < self.keep:
            self.shown.append(q.argmax(0).cpu())
        return q


# ======================================================================================================================

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    pos = common.positive_int
    g = p.add_argument_group("data")
    common.add_labelled_data_args(g)
    g.add_argument("--size", type=pos, default=512, help="training crops and evaluation inputs are size×size")
    g.add_argument("--border-label", type=int, default=0, choices=[0, 255], help="label of what a zoom-out or "
                   "rotation brings in: 0 = background (released), 255 = ignored")
    g = p.add_argument_group("model")
    common.add_checkpoint_arg(g)
    g.add_argument("--features", default="decoder", choices=["decoder", "head", "backbone"],
                   help="the layer read: decoder = the 256-d DeepLab-v3 output (the paper's LC), head = the D-dim "
                   "embedding, backbone = the dilated ResNet's last layer (Table 1's ImageNet and MoCo rows)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=pos, default=60)
    g.add_argument("--batch-size", type=pos, default=16, help="global batch (split over torchrun processes)")
    g.add_argument("--lr", type=common.positive_float, default=0.1)
    g.add_argument("--momentum", type=common.probability, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=common.nonnegative_float, default=1e-4)
    g.add_argument("--lr-step", type=common.nonnegative_int, default=26, help="epochs at the full lr before it drops "
                   "×0.1: 26 as released (its `epoch > 25`), 40 as the paper's text says")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (default: CHECKPOINT_DIR/linear_<features>, or "
                   "runs/linear_<features>_<arch>_<baseline>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (a finished one: only score, "
                   "--crf, --predict)")
    g.add_argument("--crf", action="store_true", help="also score LC + CRF (10 mean-field iterations; Gaussian sxy 1 "
                   "compat 3, bilateral sxy 67 srgb 3 compat 4, the release's settings)")
    g.add_argument("--predict", default=None, help="after training, segment every image of this folder (or VOC "
                   "root) into OUT/predict/: <id>.png (palette) and <id>_overlay.png")
    g.add_argument("--n-figures", type=common.nonnegative_int, default=8, help="val images shown in linear_val.png")
    common.add_runtime_args(p)
    p.set_defaults(amp="none")  # the release trains and scores in fp32
    return p.parse_args(argv)


def main(argv=None):
    # =========================================================================================================== args
    args = get_args(argv)
    common.resolve_download(args)
    world = common.setup_world(args.device)
    device = world.device
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: cuDNN picks its fastest kernels once
    out = Path(args.out or common.default_eval_out(args.checkpoint, args.arch, f"linear_{args.features}"))

    # =========================================================================================================== data
    train_split, train_samples, val_samples, n_classes = common.labelled_splits(
        args.data_root, args.train_split, args.val_split, args.classes, args.workers)
    names = common.class_names(n_classes, args.data_root)
    resuming = common.prepare_out(out, args.resume, ["linear.pth"], is_main=world.is_main)  # before any work
    train_ds = common.SegDataset(train_samples, common.seg_train_transform(args.size, border_label=args.border_label))
    sampler = common.SeededSampler(len(train_ds), args.seed, world.rank, world.size)
    loader = DataLoader(train_ds, batch_size=max(1, args.batch_size // world.size), sampler=sampler,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0, generator=torch.Generator())

    # ========================================================================================================== model
    common.seed_all(args.seed)  # the same classifier init on every process
    model, kind, desc = common.load_model(args.checkpoint, args.arch, args.output_stride)
    common.check_trained(kind, args.features, args.checkpoint)
    probe = LinearProbe(model, args.features, n_classes).to(device)
    ddp_probe = probe if world.size == 1 else nn.parallel.DistributedDataParallel(probe)
    before = {k: v.detach().cpu().clone() for k, v in probe.model.state_dict().items()}
    spec = {"weights": common.fingerprint(before), "checkpoint": str(args.checkpoint), "features": args.features,
            "arch": model.arch, "output_stride": args.output_stride, "channels": probe.classifier.in_channels,
            "n_classes": n_classes}
    reader = common.Reader(args.size, args.resize, loader.batch_size, args.workers, device, args.amp)
    scoring = {"size": args.size, "resize": args.resize, "amp": args.amp}
    common.print0(f"{desc}; {args.features} features ({spec['channels']}-d) → {n_classes} classes; train "
                  f"{len(train_ds)} {train_split}, score {len(val_samples)} {args.val_split}; device {device}")

    # ====================================================================================================== optimizer
    optimizer = torch.optim.SGD(probe.classifier.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd)
    step = common.TrainStep(optimizer, [probe.classifier], device, args.amp,
                            advice=f"a learning rate too high (--lr {args.lr:g})")

    # ========================================================================================================= resume
    start, history, results = 0, [], None
    ck_path = out / "linear.pth"
    if resuming:
        ck = common.restart_from_checkpoint(ck_path, "linear", spec, model=probe.classifier, optimizer=optimizer,
                                            train_step=step)
        start, history, results, step.checkpoint = ck["epoch"], ck["history"], ck.get("results"), ck_path

    # ======================================================================================================= training
    t0 = time.time()
    for epoch in range(start, args.epochs):
        lr = args.lr * (0.1 if epoch >= args.lr_step else 1.0)
        for g in optimizer.param_groups:
            g["lr"] = lr
        sampler.set_epoch(epoch)
        ddp_probe.train()
        loss_sum, te = torch.zeros((), device=device), time.time()
        for x, y, _ in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not world.is_main):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with common.autocast(device, args.amp):
                logits = ddp_probe(x)
            logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss_sum += step(common.segmentation_loss(logits, y))
        step.check(f"epoch {epoch + 1}")  # before the checkpoint: a saved classifier is always a finite one
        history.append({"epoch": epoch + 1, "lr": lr, "loss": float(loss_sum) / len(loader),
                        "train_img_per_s": len(train_ds) / max(time.time() - te, 1e-9)})
        common.print0(f"epoch {epoch + 1}/{args.epochs}  lr {lr:.4g}  loss {history[-1]['loss']:.4f}  "
                      f"{history[-1]['train_img_per_s']:.1f} img/s")
        results = None  # a new epoch invalidates earlier scores
        if world.is_main:
            common.save_checkpoint(ck_path, "linear", model=probe.classifier.state_dict(),
                                   optimizer=optimizer.state_dict(), train_step=step.state_dict(), epoch=epoch + 1,
                                   history=history, args=vars(args), made_with=spec)
        step.checkpoint = ck_path
    train_s = time.time() - t0
    check_frozen(probe.model, before)  # raises if anything but the new layer changed
    common.print0("sanity check passed: the frozen network is bit-identical to the loaded one")

    # ===================================================================================================== evaluation
    if results is None or (args.crf and "miou_crf" not in results) or results.get("scoring") != scoring:
        te = time.time()
        crf = CRFRefine(device, args.n_figures if world.is_main else 0) if args.crf else None
        probe.eval()
        ev = common.evaluate_segmentation(probe, val_samples, n_classes, reader, world,
                                          keep=args.n_figures if world.is_main else 0, refine=crf)
        miou, iou = common.miou_from_confusion(ev["conf"])
        results = {"miou": miou, "per_class_iou": dict(zip(names, iou.tolist())),
                   "pixel_acc": float(ev["conf"].diag().sum() / ev["conf"].sum().clamp(min=1) * 100),
                   "epochs": args.epochs, "eval_s": time.time() - te, "train_s": train_s,
                   "val_images": len(val_samples), "train_images": len(train_ds), "model": desc,
                   "confusion": ev["conf"].tolist(), "scoring": scoring, **spec}
        if crf:
            results["miou_crf"], iou_crf = common.miou_from_confusion(ev["conf_refined"])
            results["per_class_iou_crf"] = dict(zip(names, iou_crf.tolist()))

        # =================================================================================================== save
        if world.is_main:
            save_figure(ev["shown"], crf.shown if crf else None, out / "linear_val.png")
            common.save_checkpoint(ck_path, "linear", model=probe.classifier.state_dict(),
                                   optimizer=optimizer.state_dict(), train_step=step.state_dict(), epoch=args.epochs,
                                   history=history, args=vars(args), made_with=spec, results=results)
            common.write_json(out / "linear_eval.json", {**results, "history": history, "args": vars(args)})
    with_crf = "miou_crf" in results
    rows = [(n, results["per_class_iou"][n]) + ((results["per_class_iou_crf"][n],) if with_crf else ()) for n in names]
    rows.append(("mIoU", results["miou"]) + ((results["miou_crf"],) if with_crf else ()))
    common.print_table(rows, ["class", "IoU %"] + (["with CRF"] if with_crf else []))
    common.print0(f"linear classifier, last epoch ({args.epochs}): mIoU {results['miou']:.2f}"
                  + (f", with CRF {results['miou_crf']:.2f}" if with_crf else "")
                  + f" on {len(val_samples)} {args.val_split} images → {out / 'linear_eval.json'}")

    if args.predict and world.is_main:
        n = predict_folder(probe, args.predict, out / "predict", reader, n_classes, args.crf)
        common.print0(f"segmented {n} images of {args.predict} → {out / 'predict'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    common.run_main(main)
