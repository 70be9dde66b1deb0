r"""Semi-supervised fine-tuning with 1-100 % of the labels: paper Sec. 4.6, supp. F, Table 6 and Fig. 5.

The whole network is trained: backbone and DeepLab-v3 decoder start from an initialisation, and a fresh 1×1 classifier
(256 → classes) replaces the embedding head. Training uses cross-entropy (255 ignored) on a labeled fraction of the
train split; every run is scored on the val split at each image's original size (logits upsampled bilinearly to it,
one confusion matrix over the split, VOC mIoU). Several initialisations go into one table, like Table 6:
  - a MaskContrast checkpoint (pretrain.py's checkpoint.pth; backbone and decoder are copied, both heads dropped);
  - the paper's baseline, an ImageNet classifier: 'imagenet' (torchvision's weights, needs a network) or the path of a
    torchvision ResNet state dict; a MoCo v2 checkpoint file (keys under module.encoder_q.); 'random'.
  Those others get their backbone from the file and a randomly initialised decoder.

Labeled subsets (--fraction F..., --splits S). Split s has one fixed, seeded order of the train ids; its subset at
fraction f is the first max(1, round(f·N)) ids of that order (halves round up). Within a split the subsets are
therefore nested (1 % ⊂ 2 % ⊂ ... ⊂ 100 %): a larger fraction only adds labels, so columns differ by data alone.
The orders of the S splits start with S disjoint interleaved slices of one seeded permutation, so different splits of
one fraction share no image while f·N ≤ N // S (all of 1-12.5 % with 3 splits); beyond that they must overlap, and at
100 % every split is the whole train set (the spread is then training noise alone). The id lists are written to
SPLITS_DIR/<fraction>_<split>.txt (default OUT/splits) and a list already there is used as it is, so the same subsets
can be shared across initialisations and machines, or replaced by published split files.

Iterations. The paper does not say how long a run trains. Every run here trains for the same --iters iterations of
--batch-size images, whatever the fraction. A fixed number of epochs would give a 1 % run 100× fewer updates (and a
100× shorter poly schedule) than the 100 % run, so the table would measure training length as much as labels; with
equal iterations every run has the same optimisation budget and schedule, and small fractions just revisit their
images more often under augmentation (semi-supervised segmentation protocols likewise keep the schedule independent
of the number of labels). The default, 30,000 iterations at batch 8, is about 23 epochs of VOC trainaug (10,582
images).

Recipe (paper, supp. F). Batch 8, SGD momentum 0.9, weight decay 1e-4, poly decay (power 0.9, per iteration).
Baselines (ImageNet, MoCo, random): lr 0.004 at every fraction. MaskContrast init: lr 0.004 at ≥ 5 %; at 1-2 %
(fractions ≤ --low-fraction) lr 0.001 for backbone and decoder, 0.1 for the new classifier, and BatchNorm statistics
frozen: BN layers stay in eval mode, so their running mean/variance from pretraining are used and never updated
(their affine weights still train). --low-data-recipe all|none applies that recipe to every init or to none.

Commands
  1 GPU, Table 6 (VOC 2012 + SBD labels as common.download_voc assembles them; trainaug = 10,582 train images):
    python finetune.py --data-root VOCdevkit/VOC2012 --train-split trainaug --out runs/finetune \
        --init runs/pretrain/checkpoint.pth imagenet random --names maskcontrast imagenet random
  torchrun (--batch-size stays the global batch, 8):
    torchrun --nproc_per_node 2 finetune.py ...same flags...
  add a MoCo v2 row later: the same command with moco_v2_800ep.pth appended to --init, moco to --names, and
  --resume (finished runs are skipped, the split lists re-used, the table shows every row)
  CPU demo (demo.sh's synthetic data; 2 % = 3 labeled images, so MaskContrast gets the low-data recipe; about
  3 minutes on a shared 2-core CPU):
    python finetune.py --data-root demo_out/data --arch resnet18 --size 64 --fraction 0.02 --splits 2 --iters 40 \
        --batch-size 8 --workers 2 --init demo_out/pretrain/checkpoint.pth random --names maskcontrast random \
        --out demo_out/finetune

Paper: Table 6 compares MaskContrast (unsupervised saliency, ResNet-50) with supervised ImageNet pretraining after
fine-tuning on 1 / 2 / 5 / 12.5 / 100 % of VOC trainaug (mIoU on VOC 2012 val); the abstract (arXiv v1) reports that
with 1 % of the labels MaskContrast is 7.1 mIoU above the ImageNet baseline. The table's cells are not repeated here:
we did not have them at hand; copy them from the paper.

Outputs in --out: <init>/<fraction>_<split>/{checkpoint.pth (kind 'finetune', rebuilt by
common.model_from_checkpoint), result.json}, splits/*.txt, results.json (every run, mean ± std per fraction),
finetune_<fraction>.png (Fig. 5: image | ground truth | one prediction per initialisation, smallest fraction, split 0).
"""
import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import tv_tensors
from tqdm import tqdm

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-root", required=True, help="VOC-layout root with labels for both splits")
    common.add_download_arg(g)
    g.add_argument("--train-split", default="train", help="split the labeled fractions are drawn from (paper: "
                   "trainaug, 10,582 images, see common.download_voc; a plain VOC 2012 root only has 'train')")
    g.add_argument("--val-split", default="val", help="split that is scored")
    g.add_argument("--classes", type=int, default=0, help="number of classes incl. background; 0 = largest label in "
                   "the val split + 1 (21 on VOC)")
    g.add_argument("--size", type=int, default=512, help="training crops and evaluation inputs are size×size")
    g.add_argument("--fraction", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.125, 1.0],
                   help="labeled fractions of the train split (Table 6 columns)")
    g.add_argument("--splits", type=int, default=3, help="random labeled subsets per fraction")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the subsets (independent of --seed)")
    g.add_argument("--splits-dir", default=None, help="where the id lists are read from / written to "
                   "(default OUT/splits)")
    g = p.add_argument_group("model")
    g.add_argument("--init", nargs="+", default=["random"], help="one or more initialisations: pretrain.py "
                   "checkpoint, 'imagenet', a torchvision ResNet state-dict file, a MoCo v2 file, 'random'")
    g.add_argument("--names", nargs="+", default=None, help="table row names for --init (default: maskcontrast for a "
                   "pretrain checkpoint, the file's stem for other files, else the word itself)")
    g.add_argument("--arch", default="resnet50", help="resnet50 (paper) | resnet18 | resnet34 | resnet101; must "
                   "match a checkpoint's")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=30000, help="iterations per run, equal for every fraction")
    g.add_argument("--batch-size", type=int, default=8, help="global batch (split over torchrun processes)")
    g.add_argument("--lr", type=float, default=0.004, help="lr of every run outside the low-data recipe")
    g.add_argument("--low-lr", type=float, default=0.001, help="low-data recipe: backbone and decoder lr")
    g.add_argument("--low-head-lr", type=float, default=0.1, help="low-data recipe: lr of the new classifier")
    g.add_argument("--low-fraction", type=float, default=0.02, help="fractions up to this use the low-data recipe")
    g.add_argument("--low-data-recipe", default="maskcontrast", choices=["maskcontrast", "all", "none"],
                   help="which inits get the low-data recipe (lrs above + frozen BatchNorm statistics); paper: "
                   "MaskContrast only")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--wd", type=float, default=1e-4)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/finetune", help="output folder")
    g.add_argument("--resume", action="store_true", help="skip finished runs (result.json present) and continue "
                   "unfinished ones from their checkpoint")
    g.add_argument("--save-every", type=int, default=1000, help="iterations between checkpoints within a run")
    g.add_argument("--keep-checkpoints", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each finished run's weights (ResNet-50: ~160 MB a run)")
    g.add_argument("--n-figures", type=int, default=6, help="val images in the Fig. 5 grid")
    common.add_runtime_args(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Labeled subsets

def n_labeled(fraction, n):
    return max(1, min(n, int(math.floor(fraction * n + 0.5))))


def split_orders(ids, n_splits, seed):
    """One order of `ids` per split: first its own interleaved slice of a seeded permutation (disjoint from the other
    splits' slices), then the remaining ids in a per-split seeded order. Prefixes of one order are nested."""
    perm = np.random.default_rng(seed).permutation(len(ids))
    orders = []
    for s in range(n_splits):
        own = perm[s::n_splits]
        rest = np.random.default_rng([seed, s]).permutation(np.setdiff1d(perm, own))
        orders.append([ids[i] for i in np.concatenate([own, rest])])
    return orders


def fraction_tag(fraction, split):
    return f"{fraction:g}_{split}"


def labeled_subsets(train_ids, fractions, n_splits, seed, folder, write=True):
    """{(fraction, split): [ids]}, read from folder/<fraction>_<split>.txt when it exists, else drawn and written."""
    folder = Path(folder)
    orders = split_orders(train_ids, n_splits, seed)
    known = set(train_ids)
    subsets = {}
    for f in fractions:
        for s in range(n_splits):
            path = folder / f"{fraction_tag(f, s)}.txt"
            if path.exists():
                ids = [t.strip() for t in path.read_text().splitlines() if t.strip()]
                foreign = [i for i in ids if i not in known]
                if not ids or foreign:
                    what = f"lists ids not in the train split, e.g. {foreign[0]}" if foreign else "is empty"
                    raise common.UserError(f"{path}: {what}; delete it to draw a new subset, or pass another "
                                           "--splits-dir")
                if len(set(ids)) != len(ids):
                    raise common.UserError(f"{path}: lists an id twice; delete it to draw a new subset")
            else:
                ids = orders[s][:n_labeled(f, len(train_ids))]
                if write:
                    common.atomic_write(path, lambda p, ids=ids: p.write_text("\n".join(ids) + "\n"))
            subsets[(f, s)] = ids
    return subsets


# ----------------------------------------------------------------------------------------------------------------------
# Initialisations, learning-rate groups, frozen BatchNorm

@dataclass
class Init:
    name: str
    spec: str
    kind: str  # "maskcontrast" (a pretrain checkpoint), "checkpoint" (another kind of ours) or "backbone"


def resolve_inits(specs, names, arch):
    """What each --init is (reading project checkpoints once to check them) and its row name in the table."""
    if names and len(names) != len(specs):
        raise common.UserError(f"--names gives {len(names)} names for {len(specs)} --init values")
    inits = []
    for i, spec in enumerate(specs):
        kind, name = "backbone", spec
        if spec not in ("random", "imagenet"):
            try:
                ck = common.load_checkpoint(spec)
            except common.UserError:
                ck = None  # a torchvision/MoCo state dict: load_backbone_weights reads and checks it per run
                if not Path(spec).is_file():
                    raise common.UserError(f"--init {spec}: no such file (nor 'random' or 'imagenet')") from None
            if ck is not None:
                own = ck["args"].get("arch")
                if own != arch:
                    raise common.UserError(f"{spec}: holds a {own} model but --arch is {arch}; pass --arch {own}")
                kind = "maskcontrast" if ck.get("kind") == "pretrain" else "checkpoint"
            name = "maskcontrast" if kind == "maskcontrast" else Path(spec).stem
        inits.append(Init(names[i] if names else name, spec, kind))
    seen = [x.name for x in inits]
    if len(set(seen)) != len(seen):
        raise common.UserError(f"--init: two initialisations would share the name {seen}; pass --names")
    return inits


def build_model(init, arch, n_classes):
    """SegModel with a fresh classifier head; backbone (+ decoder for our checkpoints) from the initialisation."""
    model = common.SegModel(arch, n_classes, saliency_head=False)
    if init.kind == "backbone":
        report = common.load_backbone_weights(model.backbone, init.spec, arch)
    else:
        src = common.model_from_checkpoint(common.load_checkpoint(init.spec), init.spec)
        model.backbone.load_state_dict(src.backbone.state_dict())
        model.decoder.load_state_dict(src.decoder.state_dict())
        report = f"backbone + decoder from {init.spec}"
    # the released linear classifier's init: small weights keep the first logits near uniform
    nn.init.normal_(model.head.weight, 0, 0.01)
    nn.init.zeros_(model.head.bias)
    return model, report


def recipe(args, init, fraction):
    """(lr of backbone+decoder, lr of the new classifier, frozen BN) for one run, per the paper's supp. F."""
    low = fraction <= args.low_fraction + 1e-9 and (
        args.low_data_recipe == "all" or (args.low_data_recipe == "maskcontrast" and init.kind == "maskcontrast"))
    return (args.low_lr, args.low_head_lr, True) if low else (args.lr, args.lr, False)


def param_groups(model, lr, head_lr):
    """Two groups: everything but the classifier at `lr`, the new classifier at `head_lr`."""
    head = list(model.head.parameters())
    head_ids = {id(q) for q in head}
    body = [q for q in model.parameters() if id(q) not in head_ids]
    return [dict(params=body, lr=lr, base_lr=lr, name="backbone+decoder"),
            dict(params=head, lr=head_lr, base_lr=head_lr, name="classifier")]


def train_mode(model, freeze_bn):
    """Training mode; with freeze_bn, every BatchNorm layer back in eval mode so its running statistics are used
    as they are and never updated (its affine weight and bias still receive gradients)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


class LoopSampler(torch.utils.data.Sampler):
    """Indices for exactly `iters` batches: successive seeded shuffles of the subset, dealt round-robin to the
    processes, so every image is seen equally often and batches are full even when the subset is smaller than one.
    `start` skips the batches a resumed run already did."""

    def __init__(self, n_items, iters, batch, seed, rank=0, world=1, start=0):
        self.n_items, self.iters, self.batch, self.seed = n_items, iters, batch, seed
        self.rank, self.world, self.start = rank, world, start

    def __len__(self):
        return (self.iters - self.start) * self.batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        need, stream = self.iters * self.batch * self.world, []
        while len(stream) < need:
            stream += torch.randperm(self.n_items, generator=g).tolist()
        mine = stream[self.rank:need:self.world]
        return iter(mine[self.start * self.batch:])


# ----------------------------------------------------------------------------------------------------------------------
# Scoring and pictures

def check_labels(y, n_classes, label_path):
    if ((y >= n_classes) & (y != common.IGNORE)).any():
        raise common.UserError(f"{label_path}: has labels >= {n_classes} classes; pass --classes")


@torch.no_grad()
def evaluate(model, samples, args, device, n_classes, rank=0, world=1):
    """Confusion matrix over `samples` (each process scores every world-th image, then the counts are summed)."""
    model.eval()
    ds = common.SegDataset(samples, common.eval_transform(args.size), keep_label_size=True)
    ds = Subset(ds, range(rank, len(ds), world))
    loader = DataLoader(ds, batch_size=max(1, args.batch_size // world), num_workers=args.workers,
                        collate_fn=common.collate_keep_labels, pin_memory=device.type == "cuda")
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    for x, ys, idx in tqdm(loader, desc="eval", leave=False, disable=rank != 0):
        with common.autocast(device, args.amp):
            logits = model(x.to(device, non_blocking=True), upsample=False)[0].float()
        for lg, y, i in zip(logits, ys, idx):
            check_labels(y, n_classes, samples[int(i)].label)
            pred = F.interpolate(lg[None], size=y.shape, mode="bilinear", align_corners=False).argmax(1)[0]
            conf += common.confusion_matrix(pred, y, n_classes)
    if world > 1:
        conf = conf.to(device)
        dist.all_reduce(conf)
        conf = conf.cpu()
    return conf


@torch.no_grad()
def predict(model, samples, args, device):
    """Class maps at each image's original size (for the Fig. 5 grid)."""
    model.eval()
    tf, out = common.eval_transform(args.size), []
    for s in samples:
        img = common.read_image(s.image)
        x = tf(tv_tensors.Image(img))[None].to(device)
        with common.autocast(device, args.amp):
            lg = model(x, upsample=False)[0].float()
        out.append(F.interpolate(lg, size=img.shape[1:], mode="bilinear", align_corners=False).argmax(1)[0].cpu())
    return out


def save_figure(inits, samples, out, fraction, tile=160):
    """Fig. 5: one row per val image, image | ground truth | one prediction per initialisation."""
    tiles, names = [], [i.name for i in inits]
    for s in samples:
        row = [common.read_image(s.image), common.colorize(common.read_mask(s.label))]
        for name in names:
            p = out / name / fraction_tag(fraction, 0) / "pred" / f"{s.id}.png"
            if not p.exists():
                return None  # that run kept no predictions (e.g. split 0 of this fraction was not run)
            row.append(common.colorize(common.read_mask(p)))
        tiles += row
    path = out / f"finetune_{fraction:g}.png"
    common.save_grid(tiles, path, ncol=2 + len(names), size=tile)
    return path


def summarise(per_run):
    """mean ± sample std (ddof 1; 0 for a single split) of the runs' mIoU."""
    v = np.array(per_run, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# One run: model → optimizer → resume → loop → save

def finetune_run(init, fraction, split, ids, train_samples, val_samples, n_classes, args, rt, run_dir):
    # ------------------------------------------------------------------------------------------------------ model
    device = rt.device
    common.seed_all(args.seed + split)  # the same seed for every init and fraction of a split: paired comparisons
    model, report = build_model(init, args.arch, n_classes)
    lr, head_lr, freeze_bn = recipe(args, init, fraction)
    model.to(device)
    core = model
    if rt.world > 1:
        if device.type == "cuda" and not freeze_bn:
            # batch 8 over several GPUs leaves too few images per GPU for per-process BatchNorm statistics
            core = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # -------------------------------------------------------------------------------------------------- optimizer
    opt = torch.optim.SGD(param_groups(core, lr, head_lr), lr=lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = common.make_scaler(device, args.amp)
    # ----------------------------------------------------------------------------------------------------- resume
    ck_path, start = run_dir / "checkpoint.pth", 0
    if args.resume and ck_path.exists():
        ck = common.load_checkpoint(ck_path, kind="finetune")
        if ck.get("run", {}).get("iters") != args.iters:
            raise common.UserError(f"{ck_path}: was started with --iters {ck.get('run', {}).get('iters')}, now "
                                   f"{args.iters}; pass the same --iters or another --out")
        core.load_state_dict(ck["model"])
        if ck.get("optimizer"):
            opt.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
        start = ck["step"]
        common.print0(f"  resuming {ck_path} from step {start}/{args.iters}")
    common.print0(f"  {init.name} {fraction:g} split {split}: {len(ids)} labeled images, lr {lr:g} / classifier "
                  f"{head_lr:g}, BatchNorm {'frozen' if freeze_bn else 'trained'}; {report}")
    per_rank = args.batch_size // rt.world
    ds = common.SegDataset([train_samples[i] for i in ids], common.seg_train_transform(args.size))
    sampler = LoopSampler(len(ds), args.iters, per_rank, seed=args.seed * 1000 + split, rank=rt.rank,
                          world=rt.world, start=start)
    loader = DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=args.workers, drop_last=True,
                        pin_memory=device.type == "cuda")

    def save(step, final):
        state = dict(kind="finetune", model=core.state_dict(), args={**vars(args), "dim": n_classes},
                     saliency_head=False, step=step,
                     run=dict(init=init.spec, name=init.name, fraction=fraction, split=split, iters=args.iters,
                              n_labeled=len(ids), lr=lr, head_lr=head_lr, freeze_bn=freeze_bn))
        if not final:  # what a resumed run needs; a finished run keeps weights only
            state.update(optimizer=opt.state_dict(), scaler=scaler.state_dict())
        if rt.main:
            common.save_checkpoint(ck_path, **state)

    # ------------------------------------------------------------------------------------------------------- loop
    t0, losses = time.time(), []
    bar = tqdm(total=args.iters, initial=start, desc=f"{init.name} {fraction:g}/{split}", disable=not rt.main,
               leave=False)
    train_mode(model, freeze_bn)
    for step, (x, y, idx) in enumerate(loader, start=start):
        for g in opt.param_groups:
            g["lr"] = common.poly_lr(g["base_lr"], step, args.iters)
        bad = ((y >= n_classes) & (y != common.IGNORE)).flatten(1).any(1)
        if bad.any():
            check_labels(y[bad][0], n_classes, ds.samples[int(idx[bad][0])].label)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with common.autocast(device, args.amp):
            logits = model(x)[0]
        # summed over the labeled pixels / their count: a crop whose pixels are all ignored adds 0, not NaN
        loss = F.cross_entropy(logits.float(), y, ignore_index=common.IGNORE, reduction="sum") \
            / (y != common.IGNORE).sum().clamp(min=1)
        if not torch.isfinite(loss):
            raise common.UserError(f"{init.name} {fraction:g} split {split}: loss is {loss.item()} at step {step}; "
                                   f"lower --lr / --low-head-lr or use --amp none")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % args.save_every == 0 and step + 1 < args.iters:
            save(step + 1, final=False)
    bar.close()
    # ------------------------------------------------------------------------------------------------------- save
    train_s = time.time() - t0
    save(args.iters, final=True)
    conf = evaluate(core, val_samples, args, device, n_classes, rt.rank, rt.world)
    miou, iou = common.miou_from_confusion(conf)
    result = dict(init=init.name, init_spec=init.spec, fraction=fraction, split=split, n_labeled=len(ids),
                  iters=args.iters, lr=lr, head_lr=head_lr, freeze_bn=freeze_bn, miou=miou,
                  iou=[None if math.isnan(v) else v for v in iou.tolist()],
                  final_loss=float(np.mean(losses[-20:])) if losses else None, train_seconds=train_s,
                  eval_seconds=time.time() - t0 - train_s, device=str(device), world=rt.world)
    if rt.main:
        if fraction == min(args.fraction) and split == 0:  # the Fig. 5 grid reads these
            for s, p in zip(val_samples, predict(core, val_samples[:args.n_figures], args, device)):
                common.save_label_png(p.numpy(), run_dir / "pred" / f"{s.id}.png")
        common.write_json(run_dir / "result.json", result)  # written last: its presence means "finished"
        if not args.keep_checkpoints:
            ck_path.unlink(missing_ok=True)
    common.print0(f"  {init.name} {fraction:g} split {split}: mIoU {miou:.2f} "
                  f"({train_s:.0f} s training, loss {result['final_loss'] or float('nan'):.3f})")
    return result


# ----------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    # ------------------------------------------------------------------------------------------------------ args
    args = get_args(argv)
    common.resolve_download(args)
    rt = common.setup_runtime(args.device)
    if any(not 0 < f <= 1 for f in args.fraction):
        raise common.UserError(f"--fraction {args.fraction}: each must be in (0, 1]")
    if args.splits < 1 or args.iters < 1 or args.save_every < 1:
        raise common.UserError("--splits, --iters and --save-every must be at least 1")
    if args.batch_size % rt.world or args.batch_size // rt.world < 2:
        raise common.UserError(f"--batch-size {args.batch_size}: must be a multiple of the {rt.world} processes with "
                               "at least 2 images each (BatchNorm needs two)")
    args.fraction = sorted(set(args.fraction))
    inits = resolve_inits(args.init, args.names, args.arch)  # before anything is written: a bad --init stops here
    out = Path(args.out)
    splits_dir = Path(args.splits_dir) if args.splits_dir else out / "splits"
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # ------------------------------------------------------------------------------------------------------ data
    train_samples = common.list_samples(args.data_root, args.train_split, labels=True)
    val_samples = common.list_samples(args.data_root, args.val_split, labels=True)
    overlap = {s.id for s in train_samples} & {s.id for s in val_samples}
    if overlap:
        raise common.UserError(f"{args.data_root}: {len(overlap)} images are in both --train-split {args.train_split} "
                               f"and --val-split {args.val_split} (e.g. {sorted(overlap)[0]}); pass disjoint splits")
    n_classes = common.scan_classes(val_samples, args.classes)
    train_ids = [s.id for s in train_samples]
    index = {s.id: i for i, s in enumerate(train_samples)}
    subsets = labeled_subsets(train_ids, args.fraction, args.splits, args.split_seed, splits_dir, write=rt.main)
    if dist.is_initialized():
        dist.barrier()  # every process trains on the lists rank 0 read or wrote
        subsets = labeled_subsets(train_ids, args.fraction, args.splits, args.split_seed, splits_dir, write=False)
    common.print0(f"{len(train_samples)} train / {len(val_samples)} val images, {n_classes} classes; subsets: "
                  + ", ".join(f"{f:g} → {len(subsets[(f, 0)])}" for f in args.fraction) + f" (lists in {splits_dir})")
    # ------------------------------------------------------------------------------------------------------ runs
    results = {}
    for init in inits:
        for f in args.fraction:
            for s in range(args.splits):
                run_dir = out / init.name / fraction_tag(f, s)
                done = run_dir / "result.json"
                if args.resume and done.exists():
                    results[(init.name, f, s)] = json.loads(done.read_text())
                    common.print0(f"  {init.name} {f:g} split {s}: finished earlier, skipped "
                                  f"(mIoU {results[(init.name, f, s)]['miou']:.2f})")
                    continue
                if not args.resume and rt.main:
                    done.unlink(missing_ok=True)  # a run that now starts over must not look finished
                ids = [index[i] for i in subsets[(f, s)]]
                results[(init.name, f, s)] = finetune_run(init, f, s, ids, train_samples, val_samples, n_classes,
                                                          args, rt, run_dir)
    # ----------------------------------------------------------------------------------------------- table, figure
    table, rows = {}, []
    header = ["init"] + [f"{f * 100:g}% ({len(subsets[(f, 0)])})" for f in args.fraction]
    for init in inits:
        table[init.name] = {}
        row = [init.name]
        for f in args.fraction:
            per = [results[(init.name, f, s)]["miou"] for s in range(args.splits)]
            mean, std = summarise(per)
            table[init.name][f"{f:g}"] = dict(miou=per, mean=mean, std=std,
                                              n_labeled=[results[(init.name, f, s)]["n_labeled"]
                                                         for s in range(args.splits)])
            row.append(f"{mean:.1f} ± {std:.1f}")
        rows.append(row)
    if rt.main:
        common.write_json(out / "results.json", dict(
            table=table, runs=[results[k] for k in sorted(results, key=str)], n_train=len(train_ids),
            n_val=len(val_samples), classes=n_classes, splits=args.splits, args=vars(args)))
        common.print0(f"\nval mIoU (%), mean ± std over {args.splits} split(s), {args.iters} iterations per run "
                      f"({args.val_split}, {len(val_samples)} images):")
        common.print_table(rows, header)
        fig = save_figure(inits, val_samples[:args.n_figures], out, min(args.fraction))
        common.print0(f"results: {out / 'results.json'}" + (f"; predictions: {fig}" if fig else ""))
    if dist.is_initialized():
        dist.destroy_process_group()
    return table


if __name__ == "__main__":
    common.run_main(main)
