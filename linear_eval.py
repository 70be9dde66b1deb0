r"""Linear classifier evaluation: paper Sec. 4.1-I ("linear classifier"), Sec. 4.3 and supp. D; Tables 1, 3a and 5.

A pretrained network is frozen whole (weights and BatchNorm statistics; eval mode, so dropout is off). A freshly
initialised 1×1 convolution from its 256-d decoder output to the dataset's classes is the only thing trained:
cross-entropy (255 ignored) on logits upsampled to the label crop, SGD, flip + scale/rotation jitter, 512² inputs.
The val split is then scored at each image's original size (logits upsampled bilinearly to it): mIoU and per-class
IoU from one confusion matrix accumulated over the whole split, VOC convention. We report the LAST epoch; the released
code kept the epoch with the best val mIoU, which selects the model on the test split. A MoCo-style sanity check at
the end compares every tensor of the frozen network's state dict with its value before training and fails if one moved.

Baselines go through the same script (Table 1): `--features backbone` trains the 1×1 conv on the dilated backbone's
last layer (2048-d for ResNet-50) of any initialisation — random, torchvision's ImageNet classifier ('imagenet' or a
state-dict file) or a MoCo v2 checkpoint file — and `--checkpoint random` is a freshly initialised SegModel (the same
architecture as MaskContrast with random weights). `--predict DIR` segments a folder of your own images with the
trained classifier (palette PNGs + overlays).

Commands
  1 GPU (paper):   python linear_eval.py --data-root VOC --train-split trainaug \
                       --checkpoint runs/pretrain/checkpoint.pth
  released config: ... --lr-step 25
  torchrun:        torchrun --nproc_per_node 2 linear_eval.py ...same flags... (--batch-size is the global batch)
  baselines:       python linear_eval.py --data-root ... --features backbone --arch resnet50 --backbone-init imagenet
                   python linear_eval.py --data-root ... --features backbone --arch resnet50 \
                       --backbone-init moco_v2_800ep.pth.tar
                   python linear_eval.py --data-root ... --checkpoint random --arch resnet50
  CPU demo:        python linear_eval.py --data-root demo_out/data --train-split train --checkpoint \
                       demo_out/pretrain/checkpoint.pth --size 96 --epochs 8 --lr-step 6 --batch-size 8
  own images:      add --predict my_photos/ (a finished run given --resume goes straight to prediction)

Paper numbers (PASCAL VOC 2012 val, ResNet-50, LC = this protocol, mIoU %): MaskContrast with unsupervised saliency
58.4 (59.5 with CRF), with supervised saliency 63.9 (65.5 with CRF); MoCo v2 alone 45.0.

Outputs in --out (default: next to the checkpoint): linear.pth (the classifier, resumable every epoch),
linear_eval.json (mIoU, per-class IoU, loss per epoch, timings), linear_val.png (image | ground truth | prediction).
"""
import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import tv_tensors
from torchvision.utils import draw_segmentation_masks
from tqdm import tqdm

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-root", required=True, help="VOC-layout root with labels (SegmentationClass[Aug])")
    common.add_download_arg(g)
    g.add_argument("--train-split", default="trainaug", help="split the classifier is trained on (paper: trainaug, "
                   "10,582 images; a plain VOC 2012 root only has 'train')")
    g.add_argument("--val-split", default="val", help="split that is scored")
    g.add_argument("--classes", type=int, default=0, help="number of classes incl. background; 0 = largest label in "
                   "either split + 1 (21 on VOC)")
    g.add_argument("--size", type=int, default=512, help="training crops and evaluation inputs are size×size")
    g = p.add_argument_group("model")
    common.add_load_model_args(g)
    g.add_argument("--features", default="decoder", choices=["decoder", "backbone"],
                   help="decoder: 256-d DeepLab-v3 output (the paper's LC); backbone: the dilated ResNet's last layer")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=60)
    g.add_argument("--batch-size", type=int, default=16, help="global batch (split over torchrun processes)")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--wd", type=float, default=1e-4)
    g.add_argument("--lr-step", type=int, default=40, help="lr ×0.1 from this epoch on (paper 40, released config 25)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (default: CHECKPOINT_DIR/linear_<features>, or "
                   "runs/linear_<arch>_<features>_<init> for --checkpoint random)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/linear.pth if it exists")
    g.add_argument("--predict", default=None, help="after training, segment every image of this folder (or VOC "
                   "root) into OUT/predict/: <id>.png (palette) and <id>_overlay.png")
    g.add_argument("--n-figures", type=int, default=8, help="val images shown in linear_val.png")
    common.add_runtime_args(p)
    return p.parse_args(argv)


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def check_frozen(model, before):
    """MoCo's sanity check: every tensor of the frozen network's state dict (weights and BN buffers) is unchanged."""
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v.cpu(), before[k])]
    if changed:
        raise RuntimeError(f"sanity check failed: {len(changed)} tensors of the frozen network changed during linear "
                           f"training, e.g. {changed[:3]}")


# ----------------------------------------------------------------------------------------------------------------------
# One epoch of training, scoring, pictures

def train_one_epoch(extract, classifier, loader, optimizer, scaler, args, device, n_classes, samples):
    classifier.train()
    total, seen = 0.0, 0
    for x, y, idx in tqdm(loader, desc="train", leave=False, disable=not is_main()):
        bad = ((y >= n_classes) & (y != common.IGNORE)).flatten(1).any(1)
        if bad.any():
            s = samples[int(idx[bad][0])]
            raise common.UserError(f"{s.label}: has labels >= {n_classes} classes; pass --classes")
        if (y != common.IGNORE).sum() == 0:
            continue  # nothing to learn from a batch whose pixels are all ignored
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad(), common.autocast(device, args.amp):
            f = extract(x)
        with common.autocast(device, args.amp):
            logits = classifier(f)
        logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=common.IGNORE)
        if not torch.isfinite(loss):
            raise common.UserError(f"loss is {loss.item()}: lower --lr (now {args.lr}) or use --amp none")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(x)
        seen += len(x)
    return total / max(seen, 1)


@torch.no_grad()
def predict_logits(extract, classifier, x, device, amp):
    with common.autocast(device, amp):
        return classifier(extract(x.to(device, non_blocking=True))).float()


@torch.no_grad()
def evaluate(extract, classifier, samples, args, device, n_classes, batch_size, keep=0):
    """Confusion matrix over `samples` at each label's own size; the first `keep` predictions are returned too."""
    classifier.eval()
    ds = common.SegDataset(samples, common.eval_transform(args.size), keep_label_size=True)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=args.workers,
                        collate_fn=common.collate_keep_labels, pin_memory=device.type == "cuda")
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    shown = []
    for x, ys, idx in tqdm(loader, desc="eval", leave=False, disable=not is_main()):
        logits = predict_logits(extract, classifier, x, device, args.amp)
        for lg, y, i in zip(logits, ys, idx):
            if ((y >= n_classes) & (y != common.IGNORE)).any():
                raise common.UserError(f"{samples[int(i)].label}: has labels >= {n_classes} classes; pass --classes")
            pred = F.interpolate(lg[None], size=y.shape, mode="bilinear", align_corners=False).argmax(1)[0]
            conf += common.confusion_matrix(pred, y, n_classes)
            if len(shown) < keep:
                shown.append((samples[int(i)], y, pred.cpu()))
    return conf, shown


def save_figure(shown, path, tile=160):
    """One row per image: image | ground truth | prediction (VOC palette)."""
    tiles = []
    for s, y, pred in shown:
        tiles += [common.read_image(s.image), common.colorize(y), common.colorize(pred)]
    if tiles:
        common.save_grid(tiles, path, ncol=3, size=tile)


def overlay(img, pred, n_classes, alpha=0.5):
    present = [c for c in range(1, n_classes) if (pred == c).any()]
    if not present:
        return img
    pal = common.voc_palette()
    masks = torch.stack([pred == c for c in present])
    return draw_segmentation_masks(img, masks, alpha=alpha, colors=[tuple(int(v) for v in pal[c]) for c in present])


@torch.no_grad()
def predict_folder(extract, classifier, folder, out, args, device, n_classes):
    """Segment the user's own images: a palette PNG and an overlay per image, at the image's own size."""
    classifier.eval()
    tf = common.eval_transform(args.size)
    samples = common.list_samples(folder)
    for s in tqdm(samples, desc="predict"):
        img = common.read_image(s.image)
        logits = predict_logits(extract, classifier, tf(tv_tensors.Image(img))[None], device, args.amp)
        pred = F.interpolate(logits, size=img.shape[1:], mode="bilinear", align_corners=False).argmax(1)[0].cpu()
        common.save_label_png(pred.numpy(), out / f"{s.id}.png")
        ov = overlay(img, pred, n_classes).permute(1, 2, 0).numpy()
        common.atomic_write(out / f"{s.id}_overlay.png",
                            lambda p: Image.fromarray(ov).save(p, format="PNG"))
    return len(samples)


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------ args
    args = get_args(argv)
    common.resolve_download(args)
    rt = common.setup_runtime(args.device)
    device = rt.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    out = Path(args.out) if args.out else common.default_out(args, f"linear_{args.features}")

    # ------------------------------------------------------------------------------------------------------ data
    train_samples = common.list_samples(args.data_root, args.train_split, labels=True)
    val_samples = common.list_samples(args.data_root, args.val_split, labels=True)
    n_classes = common.scan_classes(val_samples + train_samples, args.classes)
    names = common.class_names(n_classes)
    train_ds = common.SegDataset(train_samples, common.seg_train_transform(args.size))
    sampler = DistributedSampler(train_ds, shuffle=True, seed=args.seed) if rt.world > 1 else None
    loader = DataLoader(train_ds, batch_size=max(1, args.batch_size // rt.world), shuffle=sampler is None,
                        sampler=sampler, num_workers=args.workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0)

    # ----------------------------------------------------------------------------------------------------- model
    common.seed_all(args.seed)  # the same random init on every process
    model, desc = common.load_model(args.checkpoint, args.arch, args.backbone_init)
    model = common.freeze(model.to(device))
    extract = model.features if args.features == "decoder" else model.backbone_features
    channels = 256 if args.features == "decoder" else common.ARCH_CHANNELS[model.arch]
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    classifier = nn.Conv2d(channels, n_classes, 1)
    nn.init.normal_(classifier.weight, std=0.01)  # the released init: a near-zero start for every class
    nn.init.zeros_(classifier.bias)
    classifier = classifier.to(device)
    raw_classifier = classifier
    if rt.world > 1:
        classifier = nn.parallel.DistributedDataParallel(classifier)
    spec = {"checkpoint": str(args.checkpoint), "features": args.features, "arch": model.arch,
            "backbone_init": args.backbone_init, "channels": channels, "n_classes": n_classes}
    common.seed_all(args.seed + rt.rank)  # but each process its own augmentations
    common.print0(f"{desc}; {args.features} features ({channels}-d) → {n_classes} classes; train {len(train_ds)} "
                  f"{args.train_split}, score {len(val_samples)} {args.val_split}; device {device}, world {rt.world}")

    # ------------------------------------------------------------------------------------------------- optimizer
    optimizer = torch.optim.SGD(raw_classifier.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd)
    scaler = common.make_scaler(device, args.amp)

    # ---------------------------------------------------------------------------------------------------- resume
    start, history, results = 0, [], None
    ck_path = out / "linear.pth"
    if args.resume and ck_path.exists():
        ck = common.load_checkpoint(ck_path, kind="linear")
        if ck["frozen"] != spec:
            raise common.UserError(f"{ck_path}: was trained on {ck['frozen']}, not {spec}; pass another --out")
        raw_classifier.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start, history, results = ck["epoch"], ck["history"], ck.get("results")
        common.print0(f"resumed {ck_path} at epoch {start}/{args.epochs}")
    elif args.resume:
        common.print0(f"--resume: no {ck_path} yet, starting from epoch 0")

    # ------------------------------------------------------------------------------------------------------ loop
    t0 = time.time()
    for epoch in range(start, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr = args.lr * (0.1 if epoch >= args.lr_step else 1.0)
        for gr in optimizer.param_groups:
            gr["lr"] = lr
        te = time.time()
        loss = train_one_epoch(extract, classifier, loader, optimizer, scaler, args, device, n_classes, train_samples)
        history.append({"epoch": epoch + 1, "lr": lr, "loss": loss,
                        "train_img_per_s": len(train_ds) / max(time.time() - te, 1e-9)})
        common.print0(f"epoch {epoch + 1}/{args.epochs}  lr {lr:.4g}  loss {loss:.4f}  "
                      f"{history[-1]['train_img_per_s']:.1f} img/s")
        results = None  # a new epoch invalidates earlier scores
        if rt.main:
            common.save_checkpoint(ck_path, kind="linear", model=raw_classifier.state_dict(),
                                   optimizer=optimizer.state_dict(), epoch=epoch + 1, history=history,
                                   args=vars(args), frozen=spec)
    train_s = time.time() - t0
    check_frozen(model, before)  # raises if anything but the new layer changed
    common.print0("sanity check passed: the frozen network is bit-identical to the loaded one")

    if results is None:
        te = time.time()
        conf, shown = evaluate(extract, raw_classifier, val_samples[rt.rank::rt.world], args, device, n_classes,
                               loader.batch_size, keep=args.n_figures if rt.main else 0)
        if rt.world > 1:
            conf = conf.to(device)
            dist.all_reduce(conf)
            conf = conf.cpu()
        miou, iou = common.miou_from_confusion(conf)
        results = {"miou": miou, "per_class_iou": {n: float(v) for n, v in zip(names, iou)},
                   "pixel_acc": float(conf.diag().sum() / conf.sum().clamp(min=1) * 100),
                   "epochs": args.epochs, "eval_s": time.time() - te, "train_s": train_s,
                   "val_images": len(val_samples), "train_images": len(train_ds), "model": desc, **spec}

        # ------------------------------------------------------------------------------------------------------ save
        if rt.main:
            save_figure(shown, out / "linear_val.png")
            common.save_checkpoint(ck_path, kind="linear", model=raw_classifier.state_dict(),
                                   optimizer=optimizer.state_dict(), epoch=args.epochs, history=history,
                                   args=vars(args), frozen=spec, results=results)
            common.write_json(out / "linear_eval.json", {**results, "history": history, "args": vars(args),
                                                         "confusion": conf.tolist()})
    common.print_table([(n, results["per_class_iou"][n]) for n in names] + [("mIoU", results["miou"])],
                       ["class", "IoU %"])
    common.print0(f"linear classifier, last epoch ({args.epochs}): mIoU {results['miou']:.2f} on "
                  f"{len(val_samples)} {args.val_split} images → {out / 'linear_eval.json'}")

    if args.predict and rt.main:
        n = predict_folder(extract, raw_classifier, args.predict, out / "predict", args, device, n_classes)
        common.print0(f"segmented {n} images of {args.predict} → {out / 'predict'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    common.run_main(main)
