r"""Semi-supervised fine-tuning with 1–100 % of the labels: paper Sec. 4.6, supp. F; Table 6 and Fig. 5.

The whole network is trained: backbone and DeepLab-v3 decoder start from an initialisation, and a fresh 1×1 classifier
(256 → classes) replaces the embedding head. Cross-entropy (255 ignored) on a labelled fraction of the train split;
every run is scored on the val split at each image's original size (one confusion matrix over the split, VOC mIoU).
Several initialisations (--checkpoint) go into one table, as in Table 6: a pretrain.py checkpoint gives backbone and
decoder (both heads dropped), a baseline only its backbone.

Labelled subsets (--fraction F..., --splits S): split s has one seeded order of the train ids and its subset at
fraction f is the first max(1, round(f·N)) of them, so the subsets of a split are nested (1 % ⊂ 2 % ⊂ … ⊂ 100 %);
the S orders start with disjoint slices of one permutation, so the splits of a fraction share no image while
f·N ≤ N // S. The id lists go to OUT/splits/<fraction>_<split>.txt, and a list already there is used as it is.

Length (the paper does not say): --iters iterations whatever the fraction. A fixed number of epochs would give a 1 %
run 100× fewer updates and a 100× shorter poly schedule than a 100 % run: the table would measure training
length as much as labels.

Recipe (supp. F): batch 8, SGD momentum 0.9, weight decay 1e-4, poly decay per iteration, lr 0.004; a MaskContrast
init at 1–2 % (≤ --low-fraction): lr 0.001 for backbone and decoder, 0.1 for the new classifier, BatchNorm statistics
frozen (the layers in eval mode; their affine weights still train).

Commands
  python finetune.py --data-root VOC --checkpoint runs/pretrain/checkpoint.pth imagenet random \
      --names maskcontrast imagenet random                                      # Table 6, 3 splits × 5 fractions
  torchrun --nproc_per_node 2 finetune.py ...same flags...                      # --batch-size stays global (8)
  ... --resume   adds rows or fractions later: finished runs are skipped, the split lists re-used

Outputs in --out: <name>/<fraction>_<split>/{checkpoint.pth, result.json}, splits/*.txt, results.json (every run,
mean ± std per fraction), finetune_<fraction>.png (Fig. 5: image | ground truth | one prediction per initialisation).
"""
import argparse
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import common


# ======================================================================================================================
# Labelled subsets

def fraction_tag(fraction, split):
    return f"{fraction:g}_{split}"


def labeled_subsets(train_ids, fractions, n_splits, seed, folder, write=True):
    """{(fraction, split): [ids]}, read from folder/<fraction>_<split>.txt when it exists, else drawn and written."""
    folder = Path(folder)
    perm = np.random.default_rng(seed).permutation(len(train_ids))
    orders = []
    for s in range(n_splits):
        own = perm[s::n_splits]  # disjoint across splits
        rest = np.random.default_rng([seed, s]).permutation(np.setdiff1d(perm, own))
        orders.append([train_ids[i] for i in np.concatenate([own, rest])])
    known = set(train_ids)
    subsets = {}
    for f in fractions:
        n = max(1, math.floor(f * len(train_ids) + 0.5))  # rounded half up, never empty
        for s in range(n_splits):
            path = folder / f"{fraction_tag(f, s)}.txt"
            if path.exists():
                ids = common.read_ids(path)
                foreign = [i for i in ids if i not in known]
                if not ids or foreign:
                    what = f"lists ids not in the train split, e.g. {foreign[0]}" if foreign else "is empty"
                    raise common.UserError(f"{path}: {what}; delete it to draw a new subset, or pass another "
                                           "--splits-dir")
                if len(set(ids)) != len(ids):
                    raise common.UserError(f"{path}: lists an id twice; delete it to draw a new subset")
            else:
                ids = orders[s][:n]
                if write:
                    common.write_text(path, "\n".join(ids) + "\n")
            subsets[(f, s)] = ids
    return subsets


# ======================================================================================================================
# Initialisations and the recipe

@dataclass
class Init:
    name: str
    spec: str
    kind: str  # "maskcontrast" (a pretrain checkpoint), "checkpoint" (a mine_masks one) or "backbone"
    weights: dict = None  # a project checkpoint's backbone and decoder, read once for all its runs


def resolve_inits(specs, names, arch):
    """What each --checkpoint is (project checkpoints read once, to check them) and its row name in the table."""
    if names and len(names) != len(specs):
        raise common.UserError(f"--names gives {len(names)} names for {len(specs)} --checkpoint values")
    inits = []
    for i, spec in enumerate(specs):
        kind, name, weights = "backbone", spec, None
        if spec != "random" and spec not in common.TORCHVISION_WEIGHTS:
            ck = common.torch_load(spec)
            if isinstance(ck, dict) and "kind" in ck and "model" in ck:
                common.check_checkpoint(ck, spec)
                own = ck["args"].get("arch")
                if own != arch:
                    raise common.UserError(f"{spec}: holds a {own} model but --arch is {arch}; pass --arch {own}")
                kind = "maskcontrast" if ck["kind"] == "pretrain" else "checkpoint"
                weights = {k: v for k, v in ck["model"].items() if k.startswith(("backbone.", "decoder."))}
            name = "maskcontrast" if kind == "maskcontrast" else Path(spec).stem
        inits.append(Init(names[i] if names else name, spec, kind, weights))
    seen = [x.name for x in inits]
    if len(set(seen)) != len(seen):
        raise common.UserError(f"--checkpoint: two initialisations would share the name {seen}; pass --names")
    return inits


def build_model(init, arch, n_classes, output_stride=8):
    """SegModel with a fresh classifier head; backbone (+ decoder for our checkpoints) from the initialisation."""
    model = common.SegModel(arch, n_classes, saliency_head=False, output_stride=output_stride)
    if init.kind == "backbone":
        report = common.load_backbone_weights(model.backbone, init.spec, arch)
    else:
        missing, unexpected = model.load_state_dict(init.weights, strict=False)
        if unexpected or any(k.startswith(("backbone.", "decoder.")) for k in missing):
            raise common.UserError(f"{init.spec}: its backbone and decoder do not fit a {arch} SegModel")
        report = f"backbone + decoder from {init.spec}"
    # the released linear classifier's init: small weights keep the first logits near uniform
    nn.init.normal_(model.head.weight, 0, 0.01)
    nn.init.zeros_(model.head.bias)
    return model, report


@dataclass
class Recipe:
    """One run's optimisation (supp. F): the lr of backbone + decoder, of the new classifier, frozen BatchNorm."""
    lr: float
    head_lr: float
    freeze_bn: bool


def recipe(init, fraction, lr, low_lr, low_head_lr, low_fraction, low_data_recipe):
    """Recipe of one (init, fraction): the low-data one up to `low_fraction` for the inits `low_data_recipe` names."""
    low = fraction <= low_fraction + 1e-9 and (
        low_data_recipe == "all" or (low_data_recipe == "maskcontrast" and init.kind == "maskcontrast"))
    return Recipe(low_lr, low_head_lr, True) if low else Recipe(lr, lr, False)


def param_groups(model, lr, head_lr):
    """Two groups: everything but the classifier at `lr`, the new classifier at `head_lr`."""
    head = list(model.head.parameters())
    head_ids = {id(q) for q in head}
    body = [q for q in model.parameters() if id(q) not in head_ids]
    return [dict(params=body, lr=lr, base_lr=lr, name="backbone+decoder"),
            dict(params=head, lr=head_lr, base_lr=head_lr, name="classifier")]


def train_mode(model, freeze_bn):
    """Training mode; with freeze_bn, every BatchNorm layer in eval mode: its running statistics used, never updated."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


# ======================================================================================================================
# One run: model → optimizer → resume → loop → save

@dataclass
class RunConfig:
    """What every run of a table shares: its settings, and the split every run is scored on."""
    arch: str
    size: int
    iters: int
    batch_size: int
    momentum: float
    wd: float
    save_every: int
    keep_checkpoint: bool
    workers: int
    amp: str
    seed: int
    output_stride: int
    resize: str
    resume: bool
    val_samples: list
    n_classes: int


def finetune_run(init, rec, cfg, world, split, train_samples, run_dir, n_figures=0):
    """Train one initialisation on `train_samples` (the labelled subset of `split`) and score it on cfg.val_samples;
    resumed exactly (data order, augmentation and dropout depend only on the seed and the iteration). Returns the
    result, also in run_dir/result.json."""
    device = world.device
    tag = f"{init.name} {run_dir.name.replace('_', ' split ')}"
    # ========================================================================================================= model
    common.seed_all(cfg.seed, split)  # the same seed for every init and fraction of a split: paired comparisons
    model, report = build_model(init, cfg.arch, cfg.n_classes, cfg.output_stride)
    init_weights = common.fingerprint(model.state_dict())  # the network this run starts from, fresh classifier too
    done = run_dir / "result.json"
    if cfg.resume and done.exists():  # finished earlier: its score stands only for the same starting network
        result = json.loads(done.read_text())
        if result.get("init_weights") != init_weights:
            raise common.UserError(f"{done}: was fine-tuned from network {result.get('init_weights')}, but "
                                   f"{init.spec} now gives network {init_weights}; pass another --out")
        common.print0(f"  {tag}: finished earlier, skipped (mIoU {result['miou']:.2f})")
        return result
    model.to(device)
    ddp_model = model
    if world.size > 1:
        if device.type == "cuda" and not rec.freeze_bn:
            # batch 8 over several GPUs leaves too few images per GPU for per-process BatchNorm statistics
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # ===================================================================================================== optimizer
    optimizer = torch.optim.SGD(param_groups(model, rec.lr, rec.head_lr), lr=rec.lr, momentum=cfg.momentum,
                                weight_decay=cfg.wd)
    step = common.TrainStep(optimizer, [model], device, cfg.amp,
                            advice=f"a learning rate too high (lr {rec.lr:g}, classifier {rec.head_lr:g}: --lr, "
                                   "--low-lr, --low-head-lr)")
    # ======================================================================================================== resume
    ck_path, start = run_dir / "checkpoint.pth", 0
    made_with = {"init_weights": init_weights, "iters": cfg.iters}
    if cfg.resume and ck_path.exists():  # a finished run's checkpoint keeps the weights alone: no optimizer to restore
        ck = common.restart_from_checkpoint(ck_path, "finetune", made_with, model=model, optimizer=optimizer,
                                            train_step=step)
        start, step.checkpoint = ck["step"], ck_path
    common.print0(f"  {tag}: {len(train_samples)} labelled images, lr {rec.lr:g} / classifier {rec.head_lr:g}, "
                  f"BatchNorm {'frozen' if rec.freeze_bn else 'trained'}; {report}")
    per_rank = cfg.batch_size // world.size
    ds = common.SegDataset(train_samples, common.seg_train_transform(cfg.size))
    sampler = common.SeededSampler(len(ds), cfg.seed * 1000 + split, world.rank, world.size, loop=True)
    sampler.set_epoch(0, start=start * per_rank)
    loader = DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers, drop_last=True,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    run = dict(init=init.spec, name=init.name, init_weights=init_weights, iters=cfg.iters,
               n_labeled=len(train_samples), **vars(rec))
    # ========================================================================================================== loop
    t0, loss_sum = time.time(), torch.zeros((), device=device)
    bar = tqdm(total=cfg.iters, initial=start, desc=tag, disable=not world.is_main, leave=False)
    train_mode(ddp_model, rec.freeze_bn)
    batches = iter(loader)
    for it in range(start, cfg.iters):
        x, y, _ = next(batches)
        for g in optimizer.param_groups:
            g["lr"] = common.poly_lr(g["base_lr"], it, cfg.iters)
        common.seed_all(cfg.seed, split, it)  # dropout: a function of the iteration, so a resumed run is exact
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with common.autocast(device, cfg.amp):
            logits = ddp_model(x).out
        loss = step(common.segmentation_loss(logits, y))
        if it >= cfg.iters - 20:
            loss_sum += loss
        bar.update(1)
        if (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iters:
            step.check(f"{tag}, step {it + 1}")
            if world.is_main:
                common.save_checkpoint(ck_path, "finetune", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                       train_step=step.state_dict(), step=it + 1, run=run, made_with=made_with,
                                       args={"arch": cfg.arch})
            step.checkpoint = ck_path
    bar.close()
    step.check(f"{tag}, step {cfg.iters}")
    # ========================================================================================================== save
    train_s = time.time() - t0
    if world.is_main:  # a finished run keeps its weights only (or nothing, with --no-keep-checkpoints)
        common.save_checkpoint(ck_path, "finetune", model=model.state_dict(), step=cfg.iters, run=run,
                               made_with=made_with, args={"arch": cfg.arch})
    model.eval()
    reader = common.Reader(cfg.size, cfg.resize, per_rank, cfg.workers, device, "none")  # scored in fp32, as the LC
    ev = common.evaluate_segmentation(partial(model.layer_features, layer="head"), cfg.val_samples, cfg.n_classes,
                                      reader, world, keep=n_figures if world.is_main else 0)
    miou, iou = common.miou_from_confusion(ev["conf"])
    result = dict(init=init.name, init_spec=init.spec, init_weights=init_weights, n_labeled=len(train_samples),
                  iters=cfg.iters, output_stride=cfg.output_stride, **vars(rec),
                  miou=miou, iou=[None if math.isnan(v) else v for v in iou.tolist()],
                  final_loss=float(loss_sum) / min(20, cfg.iters - start) if cfg.iters > start else None,
                  train_seconds=train_s, eval_seconds=time.time() - t0 - train_s, device=str(device),
                  world=world.size)
    if world.is_main:
        for s, _, pred in ev["shown"]:  # the Fig. 5 grid reads these
            common.save_label_png(pred.numpy(), run_dir / "pred" / f"{s.id}.png")
        common.write_json(run_dir / "result.json", result)  # written last: its presence means "finished"
        if not cfg.keep_checkpoint:
            ck_path.unlink(missing_ok=True)
    common.print0(f"  {tag}: mIoU {miou:.2f} ({train_s:.0f} s training)")
    return result


# ======================================================================================================================
# Table and figure

def save_figure(inits, samples, out, fraction, tile=160):
    """Fig. 5: one row per val image, image | ground truth | one prediction per initialisation."""
    tiles = []
    for s in samples:
        row = [common.read_image(s.image), common.colorize(common.read_label(s.label))]
        for init in inits:
            p = out / init.name / fraction_tag(fraction, 0) / "pred" / f"{s.id}.png"
            if not p.exists():
                return None  # that run kept no predictions (e.g. split 0 of this fraction was not run)
            row.append(common.colorize(common.read_label(p)))
        tiles += row
    if not tiles:  # --n-figures 0
        return None
    path = out / f"finetune_{fraction:g}.png"
    common.save_grid(tiles, path, ncol=2 + len(inits), size=tile)
    return path


# ======================================================================================================================

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    pos = common.positive_int
    g = p.add_argument_group("data")
    common.add_labelled_data_args(g)
    g.add_argument("--size", type=pos, default=512, help="training crops and evaluation inputs are size×size")
    g.add_argument("--fraction", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.125, 1.0],
                   help="labelled fractions of the train split (Table 6 columns), each in (0, 1]")
    g.add_argument("--splits", type=pos, default=3, help="random labelled subsets per fraction")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the subsets (independent of --seed)")
    g.add_argument("--splits-dir", default=None, help="where the id lists are read from / written to "
                   "(default OUT/splits)")
    g = p.add_argument_group("model")
    common.add_checkpoint_arg(g, many=True)
    g.add_argument("--names", nargs="+", default=None, help="table row names for --checkpoint (default: "
                   "maskcontrast for a pretrain checkpoint, the file's stem for other files, else the word itself)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=pos, default=30000, help="iterations per run, equal for every fraction")
    g.add_argument("--batch-size", type=pos, default=8, help="global batch (split over torchrun processes)")
    g.add_argument("--lr", type=common.positive_float, default=0.004, help="lr outside the low-data recipe")
    g.add_argument("--low-lr", type=common.positive_float, default=0.001, help="low-data recipe: backbone, decoder lr")
    g.add_argument("--low-head-lr", type=common.positive_float, default=0.1, help="low-data recipe: classifier lr")
    g.add_argument("--low-fraction", type=float, default=0.02, help="fractions up to this use the low-data recipe")
    g.add_argument("--low-data-recipe", default="maskcontrast", choices=["maskcontrast", "all", "none"],
                   help="inits with the low-data recipe (lrs above, frozen BatchNorm statistics); paper: MaskContrast")
    g.add_argument("--momentum", type=common.probability, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=common.nonnegative_float, default=1e-4)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/finetune", help="output folder")
    g.add_argument("--resume", action="store_true", help="skip finished runs (result.json present) and continue "
                   "unfinished ones exactly from their checkpoint")
    g.add_argument("--save-every", type=pos, default=1000, help="iterations between checkpoints within a run")
    g.add_argument("--keep-checkpoints", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each finished run's weights (ResNet-50: ~160 MB a run)")
    g.add_argument("--n-figures", type=common.nonnegative_int, default=6, help="val images in the Fig. 5 grid")
    common.add_runtime_args(p)
    p.set_defaults(arch="resnet50")
    args = p.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fraction):
        p.error(f"--fraction {args.fraction}: each must be in (0, 1]")
    args.fraction = sorted(set(args.fraction))
    return args


def main(argv=None):
    # =========================================================================================================== args
    args = get_args(argv)
    common.resolve_download(args)
    world = common.setup_world(args.device)
    if args.batch_size % world.size or args.batch_size // world.size < 2:
        raise common.UserError(f"--batch-size {args.batch_size}: must divide among the {world.size} processes with at "
                               "least 2 images each (BatchNorm needs two)")
    inits = resolve_inits(args.checkpoint, args.names, args.arch)  # before anything is written: a bad one stops here
    out = Path(args.out)
    splits_dir = Path(args.splits_dir) if args.splits_dir else out / "splits"
    torch.backends.cudnn.benchmark = world.device.type == "cuda"

    # =========================================================================================================== data
    train_split, train_samples, val_samples, n_classes = common.labelled_splits(
        args.data_root, args.train_split, args.val_split, args.classes, args.workers)
    common.prepare_out(out, args.resume, ["results.json", "*/*/result.json", "*/*/checkpoint.pth"],
                       is_main=world.is_main)  # before any work
    train_ids = [s.id for s in train_samples]
    by_id = {s.id: s for s in train_samples}
    subsets = labeled_subsets(train_ids, args.fraction, args.splits, args.split_seed, splits_dir, write=world.is_main)
    if dist.is_initialized():
        dist.barrier()  # every process trains on the lists rank 0 read or wrote
        subsets = labeled_subsets(train_ids, args.fraction, args.splits, args.split_seed, splits_dir, write=False)
    cfg = RunConfig(args.arch, args.size, args.iters, args.batch_size, args.momentum, args.wd, args.save_every,
                    args.keep_checkpoints, args.workers, args.amp, args.seed, args.output_stride, args.resize,
                    args.resume, val_samples, n_classes)
    common.print0(f"{len(train_samples)} {train_split} / {len(val_samples)} {args.val_split} images, {n_classes} "
                  "classes; subsets: " + ", ".join(f"{f:g} → {len(subsets[(f, 0)])}" for f in args.fraction)
                  + f" (lists in {splits_dir})")

    # =========================================================================================================== runs
    results = {}
    for init in inits:
        for f in args.fraction:
            rec = recipe(init, f, args.lr, args.low_lr, args.low_head_lr, args.low_fraction, args.low_data_recipe)
            for s in range(args.splits):
                run_dir = out / init.name / fraction_tag(f, s)
                subset = [by_id[i] for i in subsets[(f, s)]]
                figures = args.n_figures if f == args.fraction[0] and s == 0 else 0
                results[(init.name, f, s)] = finetune_run(init, rec, cfg, world, s, subset, run_dir, figures)

    # ================================================================================================ table, figure
    table, rows = {}, []
    header = ["init"] + [f"{f * 100:g}% ({len(subsets[(f, 0)])})" for f in args.fraction]
    for init in inits:
        table[init.name] = {}
        row = [init.name]
        for f in args.fraction:
            runs = [results[(init.name, f, s)] for s in range(args.splits)]
            per = [r["miou"] for r in runs]
            mean, std = float(np.mean(per)), float(np.std(per, ddof=1)) if len(per) > 1 else 0.0  # sample std
            table[init.name][f"{f:g}"] = dict(miou=per, mean=mean, std=std, n_labeled=[r["n_labeled"] for r in runs])
            row.append(f"{mean:.1f} ± {std:.1f}")
        rows.append(row)
    if world.is_main:
        common.write_json(out / "results.json", dict(
            table=table, runs=[{**results[k], "fraction": k[1], "split": k[2]} for k in sorted(results, key=str)],
            n_train=len(train_ids), n_val=len(val_samples), classes=n_classes, splits=args.splits, args=vars(args)))
        common.print0(f"\nval mIoU (%), mean ± std over {args.splits} split(s), {args.iters} iterations per run "
                      f"({args.val_split}, {len(val_samples)} images):")
        common.print_table(rows, header)
        fig = save_figure(inits, val_samples[:args.n_figures], out, args.fraction[0])
        common.print0(f"results: {out / 'results.json'}" + (f"; predictions: {fig}" if fig else ""))
    if dist.is_initialized():
        dist.destroy_process_group()
    return table


if __name__ == "__main__":
    common.run_main(main)
