"""What two or more MaskContrast scripts share: errors, runtime (DDP, AMP, seeding, LR), data in the PASCAL VOC layout,
the synthetic demo dataset, the DeepLab-v3 model with its two heads, checkpoints, metrics and picture grids.

Read the scripts first (mine_masks.py → pretrain.py → linear_eval.py / kmeans_eval.py / finetune.py); come here when
they call something.
"""
import argparse
import colorsys
import contextlib
import copy
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------------------------------------
# Errors and command lines

class UserError(Exception):
    """A problem the user can fix (a path, a file, a flag). Printed as one line, never as a stack trace."""


def run_main(main):
    """Run a script's main(); a UserError (also one raised inside a DataLoader worker) becomes one line and exit 2."""
    try:
        main()
    except UserError as e:
        msg = str(e).strip()
        if "Original Traceback" in msg:  # DataLoader workers re-raise with the worker's traceback in the message
            msg = msg.splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help (also for flags without a help text), and the script's docstring kept as written."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def add_runtime_args(p):
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    g.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"],
                   help="CUDA mixed precision; ignored on CPU. GradScaler only for fp16")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader worker processes")
    g.add_argument("--seed", type=int, default=0)
    return g


# ----------------------------------------------------------------------------------------------------------------------
# Runtime: distributed, precision, seeding, schedules, atomic files

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_runtime(device="auto"):
    """Single process by default; under torchrun (RANK/WORLD_SIZE set) one process per GPU, or gloo on CPU."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want_cuda else "gloo")
        dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
        return Dist(dist.get_rank(), dist.get_world_size(), dev)
    return Dist(0, 1, torch.device("cuda" if want_cuda else "cpu"))


def print0(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


@torch.no_grad()
def all_gather_nograd(t):
    """Concatenate a tensor from every process along dim 0 (no gradient flows back, as in MoCo)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def autocast(device, amp):
    """bf16 (default) or fp16 autocast on CUDA; full precision on CPU, where autocast buys nothing for convs."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_scaler(device, amp):
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp == "fp16")


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def poly_lr(base_lr, step, total, power=0.9):
    return base_lr * (1 - step / total) ** power


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=float) + "\n"))


def print_table(rows, header):
    """A small fixed-width table for the end of a run."""
    cells = [[str(h) for h in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print0("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print0("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------------------------------------------------
# Data in the PASCAL VOC layout (ROOT/JPEGImages, ROOT/SegmentationClass[Aug], ROOT/ImageSets/Segmentation/<split>.txt,
# ROOT/saliency_<name>) or a plain folder of images

@dataclass
class Sample:
    id: str
    image: Path
    label: Path | None = None
    saliency: Path | None = None


def is_voc_root(root):
    return (Path(root) / "JPEGImages").is_dir()


def saliency_dir(root, name, mask_root=None):
    """Where the masks of `root` live: MASK_ROOT/saliency_<name>, MASK_ROOT defaulting to the data root itself."""
    return Path(mask_root or root) / f"saliency_{name}"


def list_samples(root, split=None, saliency=None, mask_root=None, labels=False):
    """The samples of one root: a VOC-layout root (ids from the split list, or all JPEGImages) or a plain image
    folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (pass a VOC-layout root or a folder of images)")
    if is_voc_root(root):
        if split:
            lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not lst.is_file():
                have = sorted(p.stem for p in lst.parent.glob("*.txt")) if lst.parent.is_dir() else []
                raise UserError(f"{lst}: split list not found (splits here: {', '.join(have) or 'none'})")
            ids = [s.split()[0] for s in lst.read_text().splitlines() if s.strip()]
        else:
            ids = sorted(p.stem for p in (root / "JPEGImages").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images = {}
        for i in ids:
            p = root / "JPEGImages" / f"{i}.jpg"
            images[i] = p if p.exists() else next((root / "JPEGImages").glob(f"{i}.*"), p)
    else:
        images = {p.stem: p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        ids = list(images)
    if not ids:
        raise UserError(f"{root}: no images found (expected JPEGImages/*.jpg or image files)")
    samples = [Sample(i, images[i]) for i in ids]
    if labels:
        dirs = [root / "SegmentationClass", root / "SegmentationClassAug"]
        for s in samples:
            s.label = next((d / f"{s.id}.png" for d in dirs if (d / f"{s.id}.png").exists()), None)
            if s.label is None:
                raise UserError(f"{root}: image {s.id} has no label in SegmentationClass/ or SegmentationClassAug/")
    if saliency:
        d = saliency_dir(root, saliency, mask_root)
        for s in samples:
            s.saliency = d / f"{s.id}.png"
    return samples


def read_image(path):
    """RGB uint8 tensor (3, H, W); a missing or corrupt file is a UserError naming it."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode image ({e}); replace or remove the file") from None


def read_mask(path):
    """Single-channel uint8 tensor (H, W) of a palette/grey PNG: class indices or 0/255 saliency."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "1"):
                im = im.convert("L")
            return torch.from_numpy(np.array(im, dtype=np.uint8))
    except FileNotFoundError:
        raise UserError(f"{path}: mask not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode mask ({e}); replace or remove the file") from None


def image_size(path):
    """(H, W) from the header only; a missing or unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"{path}: cannot read image ({e}); replace or remove the file") from None


def voc_palette():
    """The PASCAL VOC colour map: 256 RGB triplets from the bits of the class index."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def save_label_png(label, path):
    """Save a (H, W) class-index array as a VOC palette PNG (atomically)."""
    im = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette().flatten().tolist())
    atomic_write(path, lambda p: im.save(p, format="PNG"))


def save_mask_png(mask, path):
    """Save a (H, W) {0,1} or bool array as a 0/255 grey PNG (atomically)."""
    im = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L")
    atomic_write(path, lambda p: im.save(p, format="PNG"))


def train_transform(size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1)):
    """The released pretraining augmentation, applied to image and mask jointly (the mask resampled nearest);
    `jitter` = ColorJitter's (brightness, contrast, saturation, hue)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def seg_train_transform(size, scale=(0.75, 1.25), degrees=5):
    """Supervised training (linear probe, fine-tuning): flip, scale jitter with a small rotation, fixed-size crop."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=degrees, scale=scale, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size):
    """Evaluation: the image resized to size×size (labels stay at their original size, predictions go back to it)."""
    return v2.Compose([
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def denormalize(x):
    """Normalised (…, 3, H, W) float → uint8 for pictures."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


class SegDataset(torch.utils.data.Dataset):
    """Labeled images for training (joint transform) or evaluation (image resized, label kept at original size)."""

    def __init__(self, samples, transform, keep_label_size=False):
        self.samples, self.transform, self.keep_label_size = samples, transform, keep_label_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        img = read_image(s.image)
        label = read_mask(s.label) if s.label else torch.full(img.shape[1:], IGNORE, dtype=torch.uint8)
        if label.shape != img.shape[1:]:
            raise UserError(f"{s.label}: label is {tuple(label.shape)}, image {s.image} is {tuple(img.shape[1:])}")
        if self.keep_label_size:
            return self.transform(tv_tensors.Image(img)), label.long(), i
        x, y = self.transform(tv_tensors.Image(img), tv_tensors.Mask(label))
        return x, y.long(), i


def collate_keep_labels(batch):
    """Stack images; keep labels of different sizes as a list."""
    xs, ys, idx = zip(*batch)
    return torch.stack(xs), list(ys), torch.tensor(idx)


# ----------------------------------------------------------------------------------------------------------------------
# The paper's data, for users with a network: PASCAL VOC 2012 + SBD → the usual train_aug split

def _read_ids(path):
    return [s.split()[0] for s in Path(path).read_text().splitlines() if s.strip()]


def assemble_voc_trainaug(voc, sbd):
    """Add SBD's labels to an extracted VOC2012 folder in our layout: SegmentationClassAug/<id>.png for the SBD images
    without a VOC label, and ImageSets/Segmentation/trainaug.txt = (VOC train ∪ SBD train ∪ SBD val) − VOC val
    (10,582 images for the real datasets). Returns {split: count}."""
    import scipy.io
    voc, sbd = Path(voc), Path(sbd)
    sets = voc / "ImageSets" / "Segmentation"
    for need in (sets / "train.txt", sets / "val.txt", sbd / "train.txt", sbd / "val.txt", sbd / "cls"):
        if not need.exists():
            raise UserError(f"{need}: missing; is {voc} an extracted VOC2012 and {sbd} an extracted SBD dataset/?")
    val = set(_read_ids(sets / "val.txt"))
    ids = sorted((set(_read_ids(sets / "train.txt")) | set(_read_ids(sbd / "train.txt"))
                  | set(_read_ids(sbd / "val.txt"))) - val)
    aug = voc / "SegmentationClassAug"
    aug.mkdir(exist_ok=True)
    for i in ids:
        if (voc / "SegmentationClass" / f"{i}.png").exists() or (aug / f"{i}.png").exists():
            continue
        mat = sbd / "cls" / f"{i}.mat"
        try:
            label = scipy.io.loadmat(mat)["GTcls"][0]["Segmentation"][0]
        except (OSError, KeyError, IndexError, ValueError) as e:
            raise UserError(f"{mat}: cannot read the SBD label ({e})") from None
        jpg = voc / "JPEGImages" / f"{i}.jpg"
        if not jpg.exists():
            raise UserError(f"{jpg}: image of SBD label {mat} not found")
        if tuple(label.shape) != image_size(jpg):
            raise UserError(f"{mat}: label is {label.shape}, its image is {image_size(jpg)}")
        save_label_png(label, aug / f"{i}.png")
    atomic_write(sets / "trainaug.txt", lambda p: p.write_text("\n".join(ids) + "\n"))
    return {"trainaug": len(ids), "val": len(val)}


def add_download_arg(group):
    group.add_argument("--download", action="store_true", help="fetch PASCAL VOC 2012 + SBD into the (first) "
                       "--data-root with torchvision, assemble the trainaug split, and read from there")


def resolve_download(args):
    """With --download, fetch VOC into the (first) --data-root and point --data-root at the VOC2012 folder."""
    if getattr(args, "download", False):
        if isinstance(args.data_root, list):
            args.data_root[0] = str(download_voc(args.data_root[0]))
        else:
            args.data_root = str(download_voc(args.data_root))


def download_voc(root):
    """Fetch VOC 2012 and SBD with torchvision's dataset classes into ROOT and assemble train_aug; returns the VOC
    root to pass as --data-root (ROOT/VOCdevkit/VOC2012)."""
    root = Path(root)
    try:
        torchvision.datasets.VOCSegmentation(root, year="2012", image_set="trainval", download=True)
        torchvision.datasets.SBDataset(root / "SBD", image_set="train", mode="segmentation", download=True)
    except Exception as e:  # network errors come in many types (URLError, HTTPError, OSError, RuntimeError)
        raise UserError(f"downloading PASCAL VOC 2012 / SBD into {root} failed ({type(e).__name__}: {e}); check the "
                        "network, or download VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz yourself and "
                        "extract them there") from None
    voc = root / "VOCdevkit" / "VOC2012"
    counts = assemble_voc_trainaug(voc, root / "SBD")
    print0(f"VOC ready at {voc}: {counts}")
    if counts != {"trainaug": 10582, "val": 1449}:
        print0(f"warning: expected 10582 train_aug and 1449 val images, got {counts}")
    return voc


# ----------------------------------------------------------------------------------------------------------------------
# The synthetic demo dataset

SYNTH_CLASSES = ("background", "disc", "square", "triangle", "cross")


def _texture(kind, h, w, rng):
    """A two-colour pattern in [0,1]: stripes, checkerboard, dots or rings, at a random phase and period."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(5, 9)
    if kind == 1:  # stripes at a random angle
        a = rng.uniform(0, np.pi)
        t = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0
    elif kind == 2:  # checkerboard
        t = ((xx // (period / 2)).astype(int) + (yy // (period / 2)).astype(int)) % 2 == 0
    elif kind == 3:  # dots on a grid
        t = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 3.2) ** 2
    else:  # concentric rings
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = np.sin(np.hypot(yy - cy, xx - cx) * 2 * np.pi / period) > 0
    return t.astype(np.float32)


def _shape(kind, h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if kind == 1:
        return dy ** 2 + dx ** 2 < r ** 2
    if kind == 2:
        return (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
    if kind == 3:  # upward triangle
        return (dy < r * 0.7) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.65)
    return ((np.abs(dy) < r * 0.35) & (np.abs(dx) < r)) | ((np.abs(dx) < r * 0.35) & (np.abs(dy) < r))


def _synthetic_image(size, rng):
    """One image: a noisy low-frequency background and one or two objects of one class (shape + texture)."""
    h = w = size
    # background: a smooth, muted random colour field plus fine noise (so that "not flat" does not mean "object"),
    # less saturated than the objects, as the backdrop of a photo usually is
    coarse = rng.uniform(0, 1, (3, 4, 4)).astype(np.float32)
    coarse = 0.35 * coarse + 0.65 * coarse.mean(0, keepdims=True)
    bg = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=(h, w), mode="bicubic",
                                         align_corners=False)[0].numpy().transpose(1, 2, 0)
    bg = np.clip(bg + rng.normal(0, 0.05, (h, w, 3)), 0, 1)
    cls = int(rng.integers(1, len(SYNTH_CLASSES)))
    label = np.zeros((h, w), np.uint8)
    img = bg
    for k in range(1 if rng.uniform() < 0.7 else 2):
        r = rng.uniform(0.22, 0.34) * size if k == 0 else rng.uniform(0.14, 0.2) * size
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        m = _shape(cls, h, w, cy, cx, r)
        # a light and a dark shade of one random hue: colour says nothing about the class, and demo.sh's full hue
        # jitter (--color-jitter 0.4 0.4 0.4 0.5) covers every hue, so pretraining can learn to ignore it
        hue = rng.uniform()
        c1 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 0.9), rng.uniform(0.85, 1.0)))
        c2 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 0.9), rng.uniform(0.25, 0.4)))
        t = _texture(cls, h, w, rng)[..., None]
        obj = t * c1 + (1 - t) * c2
        img = np.where(m[..., None], obj, img)
        label[m] = cls
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    return (img * 255).astype(np.uint8), label


def make_synthetic_voc(root, n_train=160, n_val=60, size=96, seed=0):
    """Write a small seeded VOC-layout dataset: four classes that differ by shape and texture (hues are random),
    one or two objects of one class per image on a textured background; labels in SegmentationClass, the oracle
    salient-object masks in saliency_oracle. Returns the root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "saliency_oracle", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    splits = {"train": [f"train_{i:04d}" for i in range(n_train)], "val": [f"val_{i:04d}" for i in range(n_val)]}
    for ids in splits.values():
        for i in ids:
            img, label = _synthetic_image(size, rng)
            Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=92)
            save_label_png(label, root / "SegmentationClass" / f"{i}.png")
            save_mask_png(label > 0, root / "saliency_oracle" / f"{i}.png")
    for name, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root


# ----------------------------------------------------------------------------------------------------------------------
# The model: DeepLab-v3 on a dilated ResNet (output stride 8), 256-d decoder features → embedding and saliency heads

ARCH_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def _dilate_basic_layer(layer, dilation, first_dilation):
    """What replace_stride_with_dilation does for Bottleneck, done by hand for BasicBlock (which refuses it)."""
    for i, block in enumerate(layer):
        d = first_dilation if i == 0 else dilation
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def dilated_resnet(arch):
    """torchvision ResNet with layer3/layer4 dilated 2/4 instead of strided: 224 input → 28×28 features."""
    if arch not in ARCH_CHANNELS:
        raise UserError(f"--arch {arch}: choose one of {', '.join(ARCH_CHANNELS)}")
    ctor = getattr(torchvision.models, arch)
    if arch in ("resnet18", "resnet34"):
        net = ctor()
        _dilate_basic_layer(net.layer3, 2, 1)
        _dilate_basic_layer(net.layer4, 4, 2)
    else:
        net = ctor(replace_stride_with_dilation=[False, True, True])
    net.fc = nn.Identity()
    return net


def _stem_to_layer4(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


class SegModel(nn.Module):
    """Backbone → DeepLab-v3 decoder (ASPP + 3×3 conv, 256-d) → `head` (1×1, D-dim embeddings or class logits)
    and an optional 1-channel `saliency_head` reading the same 256-d features (paper Fig. 3)."""

    def __init__(self, arch="resnet50", dim=32, saliency_head=True):
        super().__init__()
        self.arch, self.dim = arch, dim
        self.backbone = dilated_resnet(arch)
        self.decoder = nn.Sequential(*list(DeepLabHead(ARCH_CHANNELS[arch], 1))[:-1])  # its last 1×1 → our heads
        self.head = nn.Conv2d(256, dim, 1)
        self.saliency_head = nn.Conv2d(256, 1, 1, bias=False) if saliency_head else None

    def backbone_features(self, x):
        return _stem_to_layer4(self.backbone, x)

    def features(self, x):
        """256-d decoder features at stride 8 (what the linear probe reads)."""
        return self.decoder(self.backbone_features(x))

    def forward(self, x, upsample=True):
        """(embeddings (N, dim, H, W), saliency logits (N, H, W) or None), upsampled to the input unless told not."""
        f = self.features(x)
        out, sal = self.head(f), self.saliency_head(f)[:, 0] if self.saliency_head is not None else None
        if upsample:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
            if sal is not None:
                sal = F.interpolate(sal[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return out, sal


def _torch_load(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def load_backbone_weights(net, spec, arch):
    """Initialise a (dilated) torchvision ResNet from `spec`: 'random'; 'imagenet' (torchvision's weights, needs a
    network); a torchvision ImageNet state-dict file; or a MoCo v2 checkpoint (keys under module.encoder_q.).
    fc is dropped; any other missing or unexpected key refuses the file. Returns a one-line report."""
    if spec in (None, "", "random"):
        return "backbone: random init"
    if spec == "imagenet":
        try:
            sd = torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=True)
        except Exception as e:
            raise UserError(f"could not fetch torchvision's ImageNet weights for {arch} ({e}); download the state "
                            "dict elsewhere and pass its path instead") from None
    else:
        sd = _torch_load(spec)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise UserError(f"{spec}: not a state dict of tensors (expected a torchvision ResNet or MoCo checkpoint)")
        for prefix in ("module.encoder_q.", "encoder_q.", "module."):
            if any(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                break
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    own = net.state_dict()
    bad_shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not k.startswith("fc.")]
    unexpected = [k for k in sd if k not in own]
    if bad_shape or missing or unexpected:
        raise UserError(f"{spec}: does not fit {arch} (missing {len(missing)} keys e.g. {missing[:2]}, unexpected "
                        f"{len(unexpected)} e.g. {unexpected[:2]}, wrong shape {len(bad_shape)} e.g. {bad_shape[:2]})")
    net.load_state_dict(sd, strict=False)
    return f"backbone: {len(sd)} tensors from {spec} (fc dropped, nothing missing or unexpected)"


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, **state):
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path, kind=None):
    """A checkpoint written by these scripts; `kind` (e.g. 'pretrain') is checked when given."""
    ck = _torch_load(path)
    if not isinstance(ck, dict) or "model" not in ck or "args" not in ck:
        raise UserError(f"{path}: not a checkpoint of this project (no 'model'/'args'); pass a checkpoint.pth "
                        "written by pretrain.py, mine_masks.py or finetune.py")
    if kind and ck.get("kind") != kind:
        raise UserError(f"{path}: is a '{ck.get('kind')}' checkpoint, this needs a '{kind}' one")
    return ck


def model_from_checkpoint(ck, path="checkpoint"):
    """Rebuild the SegModel a checkpoint holds (arch and dims from its args) and load its weights strictly."""
    a = ck["args"]
    model = SegModel(a.get("arch", "resnet50"), a.get("dim", 32), saliency_head=ck.get("saliency_head", True))
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit a {a.get('arch')} SegModel ({str(e).splitlines()[0]})") from None
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation helpers (linear_eval.py, kmeans_eval.py, finetune.py): which model, which classes, where outputs go

def add_load_model_args(g):
    """The flags load_model reads: a checkpoint, or a fresh model of --arch with backbone weights --backbone-init."""
    g.add_argument("--checkpoint", default="random", help="checkpoint.pth of pretrain.py (kind 'pretrain') or "
                   "mine_masks.py (kind 'saliency'); 'random' = a fresh SegModel of --arch without saliency head")
    g.add_argument("--arch", default=None, help="with --checkpoint random: resnet18/34/50/101 (default resnet50); "
                   "with a checkpoint it must match the checkpoint's own")
    g.add_argument("--backbone-init", default="random", help="with --checkpoint random: random, imagenet "
                   "(torchvision's weights) or a file (torchvision ResNet state dict or MoCo v2 checkpoint)")


def load_model(checkpoint, arch, backbone_init):
    """The network to evaluate and a one-line description: a checkpoint's SegModel, or a fresh SegModel of `arch`
    (no saliency head) whose backbone comes from `backbone_init`."""
    if checkpoint == "random":
        arch = arch or "resnet50"
        model = SegModel(arch, dim=32, saliency_head=False)
        return model, f"fresh {arch} SegModel, {load_backbone_weights(model.backbone, backbone_init, arch)}"
    if backbone_init not in (None, "", "random"):
        raise UserError(f"--backbone-init {backbone_init}: only applies to --checkpoint random (a checkpoint "
                               "brings its own backbone)")
    ck = load_checkpoint(checkpoint)
    if ck.get("kind") not in ("pretrain", "saliency"):
        raise UserError(f"{checkpoint}: is a '{ck.get('kind')}' checkpoint; this needs a 'pretrain' one "
                               "(pretrain.py) or a 'saliency' one (mine_masks.py)")
    own = ck["args"].get("arch")
    if arch and own and arch != own:
        raise UserError(f"{checkpoint}: holds a {own} model but --arch says {arch}; drop --arch or pass a "
                               f"{arch} checkpoint")
    model = model_from_checkpoint(ck, checkpoint)
    return model, f"{ck.get('kind')} checkpoint {checkpoint} ({model.arch}, epoch {ck.get('epoch', '?')})"


def scan_classes(samples, classes=0):
    """Number of classes (incl. background): `classes` when given, else the largest label in `samples` + 1."""
    top = -1
    for s in samples:
        y = read_mask(s.label)
        y = y[y != IGNORE]
        if y.numel():
            top = max(top, int(y.max()))
    if classes and top >= classes:
        raise UserError(f"{samples[0].label.parent}: labels go up to {top} but --classes is {classes}")
    return classes or top + 1


def class_names(n):
    if n == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    if n == len(SYNTH_CLASSES):
        return list(SYNTH_CLASSES)
    return [f"class{i}" for i in range(n)]


def default_out(args, what):
    if args.checkpoint != "random":
        return Path(args.checkpoint).parent / what
    init = Path(args.backbone_init).stem if args.backbone_init not in ("random", "imagenet") else args.backbone_init
    return Path("runs") / f"{what}_{args.arch or 'resnet50'}_{init}"


def freeze(model):
    """Eval mode (BatchNorm keeps its statistics, dropout is off) and no gradients: the linear protocol."""
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Metrics

def confusion_matrix(pred, gt, n_classes, ignore_index=IGNORE):
    """(n_classes, n_classes) int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long().to(pred.device)
    keep = gt != ignore_index
    idx = gt[keep] * n_classes + pred[keep].clamp(0, n_classes - 1)
    return torch.bincount(idx, minlength=n_classes ** 2).reshape(n_classes, n_classes).cpu()


def miou_from_confusion(conf):
    """(mIoU in %, per-class IoU in % with NaN for classes absent from both prediction and ground truth, which VOC
    leaves out of the mean)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))) * 100
    return float(iou.nanmean()), iou


# ----------------------------------------------------------------------------------------------------------------------
# Pictures

def colorize(label):
    """(H, W) class indices → (3, H, W) uint8 in the VOC palette (255 = ignore shows white-ish)."""
    pal = torch.from_numpy(voc_palette())
    return pal[label.long().clamp(0, 255)].permute(2, 0, 1).contiguous()


def save_grid(tiles, path, ncol, size=None):
    """Save a list of (3, H, W) uint8 tiles as one PNG grid, `ncol` tiles a row, each resized to `size`×`size`."""
    if size:
        tiles = [F.interpolate(t[None].float(), size=(size, size), mode="nearest")[0].to(torch.uint8) for t in tiles]
    grid = torchvision.utils.make_grid(tiles, nrow=ncol, padding=2, pad_value=255)
    atomic_write(path, lambda p: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(p, format="PNG"))

