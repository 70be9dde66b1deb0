r"""MaskContrast pretraining: paper Sec. 3.3, Algorithm 1, Fig. 3, Table 2 (ablations).

Every image has one object: the pixels its saliency mask calls salient. Each salient pixel of a query view is pulled to
the mean embedding (prototype) of its object in a second augmented view, computed by a momentum key network, and pushed
away from the prototypes of the other images in the batch and of a FIFO queue of earlier batches. A 1-channel saliency
head on the same decoder features is trained with a (class-balanced) BCE against the masks.

    # the demo (demo.sh): synthetic data, masks from mine_masks.py, resnet18 from scratch, CPU (10 minutes on 2 cores)
    python pretrain.py --data-root demo_out/data --saliency mined --arch resnet18 --size 64 --batch-size 16 \
        --queue-size 64 --epochs 60 --lr 0.1 --momentum 0.99 --color-jitter 0.4 0.4 0.4 0.5 --workers 2 \
        --out demo_out/pretrain
    # the paper's run on one GPU: VOC train_aug with mined masks, MoCo v2 backbone (ImageNet, 800 epochs)
    python pretrain.py --data-root VOC --split trainaug --saliency unsup --backbone-init moco_v2_800ep.pth.tar \
        --out runs/pretrain
    # the same on 2 GPUs (global batch 64 → 32 per GPU, key-encoder batch shuffle, queue fed by both)
    torchrun --nproc_per_node 2 pretrain.py --data-root VOC --split trainaug --saliency unsup --out runs/pretrain
    # speed: images/s, peak memory and the share of time spent waiting for data, on the real pipeline
    python pretrain.py --data-root VOC --split trainaug --saliency unsup --benchmark 50

Paper (PASCAL VOC val, ResNet-50, MoCo v2 init): linear classifier 58.4 mIoU (unsupervised saliency) / 63.9
(supervised saliency); K-Means 35.0 / 44.2. Table 2b ablations: --no-views, --queue-size 0, --no-momentum.
"""
import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import tv_tensors
from torchvision.utils import draw_segmentation_masks
from tqdm import tqdm

from common import (HelpFormatter, SegModel, UserError, add_download_arg, add_runtime_args, all_gather_nograd,
                    autocast, denormalize, image_size, is_voc_root, list_samples, load_backbone_weights,
                    load_checkpoint, make_scaler, poly_lr, print0, print_table, read_image, read_mask,
                    resolve_download, run_main, saliency_dir, save_checkpoint, save_grid, seed_all, setup_runtime,
                    train_transform, write_json)


# ----------------------------------------------------------------------------------------------------------------------
# Algorithm 1

def maskcontrast_loss(q, k, s_q, s_k, queue, temperature=0.5, weighting="enet"):
    """The contrastive loss of Algorithm 1 for one batch.

    q, k: (N, D, H, W) unit-norm pixel embeddings of the query and key views (k carries no gradient);
    s_q, s_k: (N, H, W) {0,1} saliency masks of the two views; queue: (D, K) unit-norm prototypes of earlier batches.
    Returns (loss, p_k): p_k (N, D) are the unit-norm key prototypes, one per image, to be enqueued.
    """
    N, D, H, W = q.shape
    # prototypes: mean key embedding over each object's salient pixels, then L2-normalised
    s_k = s_k.reshape(N, H * W).to(k.dtype)                              # s_k: (N, HW)
    p_k = F.normalize(torch.einsum("ndp,np->nd", k.reshape(N, D, H * W), s_k), dim=1)  # p_k: (N, D)
    # the salient pixels of the query view, each labelled with its object (= its image's index in the batch)
    s_q = s_q.reshape(N * H * W).bool()                                  # s_q: (NHW,)
    q = q.permute(0, 2, 3, 1).reshape(N * H * W, D)[s_q]                 # q: (P, D)
    obj = torch.arange(N, device=q.device).repeat_interleave(H * W)[s_q]  # obj: (P,)
    # logits: the batch's prototypes (own object = positive, others = negatives) then the queue (negatives)
    l_batch = q @ p_k.T                                                  # l_batch: (P, N)
    l_queue = q @ queue                                                  # l_queue: (P, K)
    logits = torch.cat([l_batch, l_queue], dim=1) / temperature          # logits: (P, N + K)
    ce = F.cross_entropy(logits, obj, reduction="none")                  # ce: (P,)
    if weighting == "none":
        return ce.mean(), p_k
    # E-Net weighting (released code): small objects weigh more, w = 1 / ln(1.02 + share of the salient pixels)
    share = torch.bincount(obj, minlength=N).to(ce.dtype) / obj.numel()  # share: (N,)
    w = 1.0 / torch.log(1.02 + share[obj])                               # w: (P,)
    return (w * ce).sum() / w.sum(), p_k


def saliency_loss(logits, target, balanced=True):
    """BCE on the saliency head; balanced (released code, HED-style): positives weigh the share of negatives."""
    t = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    if not balanced:
        return bce.mean()
    w = 1 - t.mean()  # #neg / #all over the batch
    return (w * (bce * t).sum() + (1 - w) * (bce * (1 - t)).sum()) / t.numel()


class MaskContrast(nn.Module):
    """Query network, momentum key network and the queue of prototypes (MoCo's builder, with masks)."""

    def __init__(self, encoder, queue_size=128, momentum=0.999, temperature=0.5, weighting="enet",
                 sal_weight=1.0, balanced_bce=True, key_encoder=True, loss_res="input"):
        super().__init__()
        self.m, self.T, self.weighting, self.sal_weight = momentum, temperature, weighting, sal_weight
        self.balanced_bce, self.loss_res = balanced_bce, loss_res
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder).requires_grad_(False) if key_encoder else None
        self.register_buffer("queue", F.normalize(torch.randn(encoder.dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        """θ_k ← m·θ_k + (1 − m)·θ_q over parameters (BatchNorm buffers are the key network's own)."""
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.mul_(self.m).add_(pq.detach(), alpha=1 - self.m)

    @torch.no_grad()
    def enqueue(self, p_k):
        """FIFO: the prototypes of every GPU's batch overwrite the oldest columns."""
        p_k = all_gather_nograd(p_k)
        K, n = self.queue.shape[1], p_k.shape[0]
        if K == 0:
            return
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + n] = p_k.T.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % K)

    @torch.no_grad()
    def key_forward(self, im_k):
        """Key embeddings at stride 8 (upsampled by the caller); shuffle-BN across GPUs as in MoCo."""
        if self.encoder_k is None:  # Table 2b "no momentum encoder": the query network, without gradient
            return self.encoder_q(im_k, upsample=False)[0]
        self.momentum_update()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.encoder_k(im_k, upsample=False)[0]
        world, rank = dist.get_world_size(), dist.get_rank()
        x = all_gather_nograd(im_k)
        perm = torch.randperm(x.shape[0], device=x.device)
        dist.broadcast(perm, src=0)
        k = self.encoder_k(x[perm.view(world, -1)[rank]], upsample=False)[0]
        return all_gather_nograd(k)[torch.argsort(perm).view(world, -1)[rank]]

    def forward(self, im_q, s_q, im_k, s_k):
        emb, sal = self.encoder_q(im_q, upsample=self.loss_res == "input")
        k = self.key_forward(im_k)
        if self.loss_res == "input":  # released code: the loss at full input resolution (64× the pixels of stride 8)
            k = F.interpolate(k, size=im_k.shape[-2:], mode="bilinear", align_corners=False)
        else:  # masks brought to stride 8: a pixel is salient when most of its 8×8 cell is
            s_q = F.adaptive_avg_pool2d(s_q[:, None].float(), emb.shape[-2:])[:, 0] > 0.5
            s_k = F.adaptive_avg_pool2d(s_k[:, None].float(), k.shape[-2:])[:, 0] > 0.5
        with torch.autocast(im_q.device.type, enabled=False):  # the loss in fp32
            q, k = F.normalize(emb.float(), dim=1), F.normalize(k.float(), dim=1)
            loss_c, p_k = maskcontrast_loss(q, k, s_q, s_k, self.queue.clone(), self.T, self.weighting)
            loss_s = saliency_loss(sal.float(), s_q, self.balanced_bce)
        self.enqueue(p_k)
        return loss_c + self.sal_weight * loss_s, {"contrast": loss_c.detach(), "saliency": loss_s.detach()}


# ----------------------------------------------------------------------------------------------------------------------
# Data: two augmented views that both hold part of the object

def pretrain_samples(roots, split, saliency, mask_root=None, missing="error"):
    """Images with a usable mask. Missing masks are an error unless mine_masks.py listed the image as dropped (or
    --missing-masks skip); empty masks are skipped; a mask of another size than its image is an error."""
    out, n_empty, n_missing = [], 0, 0
    for root in roots:
        samples = list_samples(root, split if is_voc_root(root) else None, saliency=saliency, mask_root=mask_root)
        d = saliency_dir(root, saliency, mask_root)
        if not d.is_dir():
            raise UserError(f"{d}: no saliency masks; run `python mine_masks.py --data-root {root} --name {saliency}`"
                            " first (or pass --saliency/--mask-root where they are)")
        dropped = set((d / "dropped.txt").read_text().split()) if (d / "dropped.txt").is_file() else set()
        for s in tqdm(samples, desc=f"checking masks in {d}", leave=False, disable=len(samples) < 500):
            if not s.saliency.exists():
                if s.id in dropped or missing == "skip":
                    n_missing += 1
                    continue
                raise UserError(f"{s.image}: no saliency mask at {s.saliency}; mine masks for it with mine_masks.py, "
                                "or pass --missing-masks skip to train on the images that have one")
            m = read_mask(s.saliency)
            if tuple(m.shape) != image_size(s.image):
                raise UserError(f"{s.saliency}: mask is {tuple(m.shape)} but image {s.image} is "
                                f"{image_size(s.image)}; masks must be at the image's original size")
            if (m > 127).any():
                out.append(s)
            else:
                n_empty += 1
    print0(f"pretraining set: {len(out)} images ({n_empty} with an empty mask and {n_missing} without a mask skipped)")
    if not out:
        raise UserError(f"no image with a non-empty saliency mask under {', '.join(map(str, roots))}")
    return out


class ViewPairs(Dataset):
    """(query view, its mask, key view, its mask). Both views must show a salient fraction strictly between min_area
    and max_area: a few draws per image, then a random other image, and after `max_images` images an error."""

    def __init__(self, samples, size, min_area=0.01, max_area=0.99, tries=3, max_images=20, same_view=False,
                 jitter=(0.4, 0.4, 0.4, 0.1)):
        self.samples, self.t = samples, train_transform(size, jitter=jitter)
        self.min_area, self.max_area, self.tries, self.max_images = min_area, max_area, tries, max_images
        self.same_view = same_view

    def __len__(self):
        return len(self.samples)

    def _ok(self, mask):
        return self.min_area < mask.float().mean().item() < self.max_area

    def __getitem__(self, i):
        for _ in range(self.max_images):
            s = self.samples[i]
            img, mask = tv_tensors.Image(read_image(s.image)), tv_tensors.Mask((read_mask(s.saliency) > 127).byte())
            for _ in range(self.tries):
                xq, mq = self.t(img, mask)
                xk, mk = (xq, mq) if self.same_view else self.t(img, mask)
                if self._ok(mq) and self._ok(mk):
                    return xq, mq.bool(), xk, mk.bool()
            i = int(torch.randint(len(self.samples), ()))
        raise UserError(f"no view pair with a salient share in ({self.min_area}, {self.max_area}) after "
                        f"{self.max_images} images; are the masks nearly empty or full? (--min-area/--max-area)")


def save_views_grid(batch, path, n=8):
    """Query and key views with their masks drawn on: what the network is asked to match."""
    xq, mq, xk, mk = (t[:n] for t in batch)
    tiles = []
    for a, b, c, d in zip(xq, mq, xk, mk):
        tiles += [draw_segmentation_masks(denormalize(a), b, alpha=0.45, colors="red"),
                  draw_segmentation_masks(denormalize(c), d, alpha=0.45, colors="red")]
    save_grid(tiles, path, ncol=8)


# ----------------------------------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-root", nargs="+", required=True,
                   help="VOC-layout roots and/or plain image folders, combined")
    add_download_arg(g)
    g.add_argument("--split", default="train", help="split list of the VOC-layout roots (ImageSets/Segmentation)")
    g.add_argument("--saliency", default="unsup", help="masks are read from ROOT/saliency_<name>/<id>.png")
    g.add_argument("--mask-root", default=None, help="read masks from MASK_ROOT/saliency_<name>/ instead of ROOT")
    g.add_argument("--missing-masks", default="error", choices=["error", "skip"],
                   help="an image without a mask (not listed as dropped by mine_masks.py)")
    g.add_argument("--size", type=int, default=224, help="crop size of each view")
    g.add_argument("--min-area", type=float, default=0.01, help="salient share of a view must exceed this "
                   "(released code 0.01; the paper's text says 0.1)")
    g.add_argument("--max-area", type=float, default=0.99, help="... and stay below this")
    g.add_argument("--color-jitter", type=float, nargs=4, default=[0.4, 0.4, 0.4, 0.1], metavar=("B", "C", "S", "H"),
                   help="ColorJitter brightness, contrast, saturation, hue (applied with p=0.8)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", help="resnet50 (paper) | resnet18 | resnet34 | resnet101")
    g.add_argument("--backbone-init", default="random",
                   help="random | imagenet (torchvision, needs a network) | PATH (torchvision or MoCo v2 state dict)")
    g.add_argument("--dim", type=int, default=32, help="embedding dimension D")
    g = p.add_argument_group("MaskContrast")
    g.add_argument("--queue-size", type=int, default=128, help="K prototypes in the memory bank (0 = none, Table 2b)")
    g.add_argument("--momentum", type=float, default=0.999, help="key network momentum m")
    g.add_argument("--temperature", type=float, default=0.5, help="τ")
    g.add_argument("--weighting", default="enet", choices=["enet", "none"],
                   help="enet: released code's per-object weights 1/ln(1.02+p); none: Algorithm 1's plain mean")
    g.add_argument("--sal-weight", type=float, default=1.0, help="weight of the saliency loss")
    g.add_argument("--plain-bce", action="store_true", help="plain BCE instead of the released class-balanced BCE")
    g.add_argument("--loss-res", default="input", choices=["input", "feature"],
                   help="loss on every input pixel (released code) or at the stride-8 feature map (64× cheaper)")
    g.add_argument("--no-views", action="store_true", help="Table 2b: key view = query view")
    g.add_argument("--no-momentum", action="store_true", help="Table 2b: keys from the query network (no grad)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=60, help="paper 60; released configs 40")
    g.add_argument("--batch-size", type=int, default=64, help="global batch (divided among GPUs)")
    g.add_argument("--lr", type=float, default=0.004)
    g.add_argument("--wd", type=float, default=1e-4)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/pretrain", help="checkpoint.pth, log.jsonl, results.json, views.png")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth")
    g.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="time N training steps after warm-up (images/s, memory, data wait) and exit")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    add_runtime_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    resolve_download(args)
    rt = setup_runtime(args.device)
    out = Path(args.out)
    if args.batch_size % rt.world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {rt.world} processes")
    if args.queue_size % args.batch_size:
        raise UserError(f"--queue-size {args.queue_size} must be a multiple of the global batch {args.batch_size}")
    seed_all(args.seed)

    # data
    samples = pretrain_samples(args.data_root, args.split, args.saliency, args.mask_root, args.missing_masks)
    if len(samples) < args.batch_size:
        raise UserError(f"{len(samples)} images is fewer than one batch (--batch-size {args.batch_size})")
    dataset = ViewPairs(samples, args.size, args.min_area, args.max_area, same_view=args.no_views,
                        jitter=args.color_jitter)
    gen = torch.Generator()
    sampler = DistributedSampler(dataset, seed=args.seed, drop_last=True) if rt.world > 1 else None
    loader = DataLoader(dataset, batch_size=args.batch_size // rt.world, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, pin_memory=rt.device.type == "cuda", drop_last=True,
                        generator=gen, persistent_workers=False)

    # model
    encoder = SegModel(args.arch, args.dim, saliency_head=True)
    print0(load_backbone_weights(encoder.backbone, args.backbone_init, args.arch))
    model = MaskContrast(encoder, args.queue_size, args.momentum, args.temperature, args.weighting, args.sal_weight,
                         not args.plain_bce, key_encoder=not args.no_momentum, loss_res=args.loss_res).to(rt.device)
    if rt.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.encoder_q.compile()
        if model.encoder_k is not None:
            model.encoder_k.compile()
    core = model  # unwrapped, for checkpoints
    if rt.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.index is not None
                                                    else None)

    # optimizer
    opt = torch.optim.SGD(core.encoder_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    scaler = make_scaler(rt.device, args.amp)

    # resume
    start_epoch, step, history = 0, 0, []
    if args.resume and (out / "checkpoint.pth").exists():
        ck = load_checkpoint(out / "checkpoint.pth", kind="pretrain")
        for key in ("arch", "dim", "queue_size", "no_momentum"):
            if ck["args"].get(key) != vars(args)[key]:
                raise UserError(f"{out / 'checkpoint.pth'}: was trained with --{key.replace('_', '-')} "
                                f"{ck['args'].get(key)}, not {vars(args)[key]}; use another --out or the same flags")
        core.encoder_q.load_state_dict(ck["model"])
        if core.encoder_k is not None:
            core.encoder_k.load_state_dict(ck["key_model"])
        core.queue.copy_(ck["queue"])
        core.queue_ptr.copy_(ck["queue_ptr"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start_epoch, step, history = ck["epoch"], ck["step"], ck["history"]
        print0(f"resumed from {out / 'checkpoint.pth'} at epoch {start_epoch}")

    def batches(epoch):
        """Each epoch's order and augmentations depend only on (seed, epoch, rank): resume continues exactly."""
        torch.manual_seed(args.seed + 1000 * epoch + rt.rank)
        gen.manual_seed(args.seed + 1000 * epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        for b in loader:
            yield [t.to(rt.device, non_blocking=True) for t in b]

    if args.benchmark:
        return benchmark(model, opt, scaler, batches, args, rt)

    # loop
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, args.epochs):
        lr = poly_lr(args.lr, epoch, args.epochs)  # per epoch, as the released code
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        sums, n, t0 = torch.zeros(3, device=rt.device), 0, time.time()
        bar = tqdm(batches(epoch), total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not rt.main,
                   leave=False)
        for it, (xq, sq, xk, sk) in enumerate(bar):
            if epoch == start_epoch and it == 0 and rt.main:
                save_views_grid([t.cpu() for t in (xq, sq, xk, sk)], out / "views.png")
            if rt.device.type == "cuda":
                xq, xk = (x.contiguous(memory_format=torch.channels_last) for x in (xq, xk))
            with autocast(rt.device, args.amp):
                loss, parts = model(xq, sq, xk, sk)
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at epoch {epoch + 1}, step {it}; lower --lr, try --amp none,"
                                f" or resume from the last good checkpoint ({out / 'checkpoint.pth'})")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            sums += torch.stack([loss.detach(), parts["contrast"], parts["saliency"]])
            n += 1
            if it % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if rt.world > 1:
            dist.all_reduce(sums)
            sums /= rt.world
        loss, contrast, sal = (sums / max(n, 1)).tolist()
        rec = {"epoch": epoch + 1, "step": step, "lr": lr, "loss": loss, "contrast": contrast, "saliency": sal,
               "images_per_s": n * args.batch_size / (time.time() - t0)}
        history.append(rec)
        if rt.main:
            print0(json.dumps(rec))
            save_checkpoint(out / "checkpoint.pth", kind="pretrain", model=core.encoder_q.state_dict(),
                            key_model=core.encoder_k.state_dict() if core.encoder_k is not None else None,
                            queue=core.queue, queue_ptr=core.queue_ptr, optimizer=opt.state_dict(),
                            scaler=scaler.state_dict(), epoch=epoch + 1, step=step, history=history,
                            args=vars(args), saliency_head=True)
            write_json(out / "log.json", history)

    # save
    if rt.main:
        write_json(out / "results.json", {"args": vars(args), "images": len(samples), "history": history,
                                          "final_loss": history[-1]["loss"] if history else None})
        print_table([[h["epoch"], h["loss"], h["contrast"], h["saliency"], h["lr"] * 1000] for h in history],
                    ["epoch", "loss", "contrastive", "saliency", "lr×1e3"])
        print0(f"wrote {out / 'checkpoint.pth'}, {out / 'results.json'}, {out / 'views.png'}")
    if dist.is_initialized():
        dist.destroy_process_group()


def benchmark(model, opt, scaler, batches, args, rt, warmup=5):
    """Training steps on the real pipeline: images/s, peak memory, and the share of time spent waiting for data."""
    cuda = rt.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def endless():
        epoch = 0
        while True:
            yield from batches(epoch)
            epoch += 1

    it = endless()
    model.train()
    wait = total = 0.0
    for i in tqdm(range(warmup + args.benchmark), desc="benchmark", disable=not rt.main):
        if i == warmup:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            wait, start = 0.0, time.perf_counter()
        t = time.perf_counter()
        xq, sq, xk, sk = next(it)
        wait += time.perf_counter() - t
        with autocast(rt.device, args.amp):
            loss, _ = model(xq, sq, xk, sk)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if cuda:
            sync()  # data wait is measured against finished GPU work
    total = time.perf_counter() - start
    mem = (torch.cuda.max_memory_allocated() / 2**30 if cuda
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "steps": args.benchmark,
           "batch_size": args.batch_size, "size": args.size, "arch": args.arch, "amp": args.amp,
           "images_per_s": args.benchmark * args.batch_size / total, "peak_memory_gib": mem,
           "data_wait_share": wait / total, "loss_res": args.loss_res, "workers": args.workers}
    print0(json.dumps(res))
    print_table([[res["device"], res["images_per_s"], res["peak_memory_gib"], 100 * res["data_wait_share"]]],
                ["device", "images/s", "peak GiB" + (" (GPU)" if cuda else " (RSS)"), "data wait %"])
    return res


if __name__ == "__main__":
    run_main(main)
