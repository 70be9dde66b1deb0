"""What two or more of the five MaskContrast scripts use: 1. the model (paper Fig. 3), 2. the data, 3. evaluation,
4. runtime (errors, flags, processes, the training step's divergence guard, checkpoints, output folders, pictures).
Read the scripts first (mine_masks.py → pretrain.py → linear_eval.py / kmeans_eval.py / finetune.py)."""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.ndimage
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.transforms import v2
from tqdm import tqdm


# ======================================================================================================================
# 1. The model (paper Fig. 3)

ARCH_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# --backbone-init / --checkpoint words for torchvision's ImageNet classifiers. The release used the V1 file
# (resnet50-19c8e357, 76.1 % top-1), which is what produced its published numbers; V2 (80.9 %) is torchvision's default.
TORCHVISION_WEIGHTS = {"imagenet": "IMAGENET1K_V1", "imagenet-v2": "IMAGENET1K_V2"}


def dilate(layer, d):
    """Stride 2 → dilation, the released rule (torchvision's replace_stride_with_dilation, also for BasicBlock): the
    strided 3×3 conv gets stride 1 and dilation d/2, every other 3×3 conv dilation d, the 1×1 shortcut stride 1."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation = m.padding = (d // 2, d // 2)
            elif m.kernel_size == (3, 3):
                m.dilation = m.padding = (d, d)


def dilated_resnet(arch, output_stride=8):
    """A torchvision ResNet whose last layers trade stride for dilation: output stride 8 (layer3 and layer4 dilated by
    2 and 4; 224 → 28), or 16 (layer4 alone, by 2: the paper's ImageNet and MoCo baselines, supp. C/E)."""
    if arch not in ARCH_CHANNELS:
        raise UserError(f"--arch {arch}: choose one of {', '.join(ARCH_CHANNELS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if output_stride == 8:
        dilate(net.layer3, 2)
        dilate(net.layer4, 4)
    else:
        dilate(net.layer4, 2)
    net.fc = nn.Identity()
    return net


class SegOutput(NamedTuple):
    out: torch.Tensor  # head output N×C×H×W: 32-d embeddings, or class logits once fine-tuning replaced the head
    saliency: torch.Tensor | None  # saliency logits N×H×W, None without a saliency head


class SegModel(nn.Module):
    """Backbone → DeepLab-v3 decoder (ASPP 12/24/36 + 3×3 conv, 256-d, stride 8) → `head`, a 1×1 conv to
    `head_channels` (32-d embeddings, or class logits), and `saliency_head`, a parallel 1×1 conv to one logit."""

    def __init__(self, arch="resnet50", head_channels=32, saliency_head=True, output_stride=8):
        super().__init__()
        self.arch = arch
        self.backbone = dilated_resnet(arch, output_stride)
        self.decoder = nn.Sequential(*list(DeepLabHead(ARCH_CHANNELS[arch], 1))[:-1])  # its last 1×1 → our heads
        self.head = nn.Conv2d(256, head_channels, 1)
        self.saliency_head = nn.Conv2d(256, 1, 1, bias=False) if saliency_head else None

    def backbone_features(self, x):
        """The dilated ResNet's last layer (2048-d for ResNet-50), stride 8 (or 16)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def features(self, x):
        """The 256-d decoder output, stride 8: what the linear classifier reads."""
        return self.decoder(self.backbone_features(x))

    def layer_features(self, x, layer):
        """--features of a frozen network: 'backbone', 'decoder' (256-d) or 'head', at stride 8."""
        if layer == "backbone":
            return self.backbone_features(x)
        f = self.features(x)
        return f if layer == "decoder" else self.head(f)

    def layer_channels(self, layer):
        return {"backbone": ARCH_CHANNELS[self.arch], "decoder": 256, "head": self.head.out_channels}[layer]

    def forward(self, x, upsample=True):
        """SegOutput(out, saliency), upsampled bilinearly to the input size (as released) unless upsample=False."""
        f = self.features(x)
        out = self.head(f)
        sal = self.saliency_head(f)[:, 0] if self.saliency_head is not None else None
        if upsample:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
            if sal is not None:
                sal = F.interpolate(sal[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return SegOutput(out, sal)


def load_backbone_weights(net, spec, arch):
    """Initialise a dilated ResNet from 'random', 'imagenet' (V1, as released), 'imagenet-v2', a torchvision or MoCo v2
    state-dict file. fc is dropped; only num_batches_tracked may be missing (V1 predates it). Returns what loaded."""
    if spec in (None, "", "random"):
        return "backbone: random init"
    if spec in TORCHVISION_WEIGHTS:
        try:
            weights = torchvision.models.get_model_weights(arch)[TORCHVISION_WEIGHTS[spec]]
        except KeyError:
            raise UserError(f"--backbone-init {spec}: torchvision has no {TORCHVISION_WEIGHTS[spec]} weights for "
                            f"{arch}") from None
        try:
            sd = weights.get_state_dict(progress=True)
        except Exception as e:  # network errors come in many types
            raise UserError(f"could not fetch torchvision's {weights} ({type(e).__name__}); download the state dict "
                            "elsewhere and pass its path instead") from None
    else:
        sd = torch_load(spec)
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
    missing = [k for k in own if k not in sd and not k.startswith("fc.") and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if bad_shape or missing or unexpected:
        raise UserError(f"{spec}: does not fit {arch} (missing {len(missing)} keys e.g. {missing[:2]}, unexpected "
                        f"{len(unexpected)} e.g. {unexpected[:2]}, wrong shape {len(bad_shape)} e.g. {bad_shape[:2]})")
    net.load_state_dict(sd, strict=False)
    return f"backbone: {len(sd)} tensors from {spec} (fc dropped, nothing missing or unexpected)"


# ======================================================================================================================
# 2. Data

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------------------------------------
# The VOC layout — ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass[Aug]/<id>.png,
# ROOT/ImageSets/Segmentation/<split>.txt, ROOT/saliency_<name>/<id>.png — or a plain folder of images

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


def dropped_ids(mask_folder):
    """The ids of MASK_FOLDER/dropped.txt: images mine_masks.py gave no mask (under 1 % object)."""
    f = Path(mask_folder) / "dropped.txt"
    return set(f.read_text().split()) if f.is_file() else set()


def read_ids(path):
    return [s.split()[0] for s in Path(path).read_text().splitlines() if s.strip()]


def train_split(root, split):
    """`split`, else 'trainaug', or 'train' (said) for a VOC 2012 root without SBD's labels."""
    if split:
        return split
    if (Path(root) / "ImageSets" / "Segmentation" / "trainaug.txt").is_file() or not is_voc_root(root):
        return "trainaug"
    print0(f"note: {root} lists no trainaug split (VOC 2012 + SBD); training on 'train' instead")
    return "train"


def labelled_splits(root, train=None, val="val", classes=0, workers=0, flag="--train-split"):
    """(the train split's name, its samples, the val samples, the number of classes) of a labelled root: the splits
    must be disjoint (an image in both would be scored on what it was trained on); their labels are scanned."""
    train = train_split(root, train)
    train_samples, val_samples = list_samples(root, train, labels=True), list_samples(root, val, labels=True)
    overlap = {s.id for s in train_samples} & {s.id for s in val_samples}
    if overlap:
        raise UserError(f"{root}: {len(overlap)} images are in both {flag} {train} and --val-split {val} (e.g. "
                        f"{sorted(overlap)[0]}); pass disjoint splits")
    return train, train_samples, val_samples, scan_labels({train: train_samples, val: val_samples}, classes, workers)


def list_samples(root, split=None, saliency=None, mask_root=None, labels=False):
    """The samples of a VOC-layout root (the split's ids, or all of JPEGImages) or a folder of images; with `labels`
    each one's label (SegmentationClass[Aug]/, required), with `saliency` its mask path (not checked)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (pass a VOC-layout root or a folder of images)")
    if is_voc_root(root):
        if split:
            lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not lst.is_file():
                have = sorted(p.stem for p in lst.parent.glob("*.txt")) if lst.parent.is_dir() else []
                raise UserError(f"{lst}: split list not found (splits here: {', '.join(have) or 'none'})")
            ids = read_ids(lst)
        else:
            ids = sorted(p.stem for p in (root / "JPEGImages").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        jpg = {i: root / "JPEGImages" / f"{i}.jpg" for i in ids}
        images = {i: p if p.exists() else next(p.parent.glob(f"{i}.*"), p) for i, p in jpg.items()}
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


# ---------------------------------------------------------------------------------------------------------------------
# Reading images, masks and labels: every failure names the file

@contextlib.contextmanager
def _opened(path, what):
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode {what} ({e}); replace or remove the file") from None


def open_rgb(path):
    """An image as an 8-bit RGB PIL image, whatever its mode (grey, palette, CMYK, RGBA, 16-bit)."""
    with _opened(path, "image") as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: scale to 8 bits (convert() would clip to white)
            a = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((a / 257 if a.max() > 255 else a).round().clip(0, 255).astype(np.uint8))
        return im.convert("RGB")


def read_image(path):
    """RGB uint8 3×H×W: JPEG and PNG through torchvision's decoder (twice PIL's speed), what it cannot read through
    PIL (CMYK, 16 bits, damage)."""
    if Path(path).suffix.lower() in (".jpg", ".jpeg", ".png"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                x = torchvision.io.decode_image(torchvision.io.read_file(str(path)),
                                                mode=torchvision.io.ImageReadMode.RGB)
            if x.dtype == torch.uint8:
                return x
        except (RuntimeError, ValueError, OSError, AttributeError):
            pass  # PIL decides, and names the file if it cannot read it either
    return torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1).contiguous()


def read_mask(path):
    """A saliency mask or map as a single-channel uint8 tensor H×W (0/255 masks; any mode is turned grey)."""
    with _opened(path, "mask") as im:
        return torch.from_numpy(np.array(im if im.mode in ("P", "L") else im.convert("L"), dtype=np.uint8))


def read_objects(path):
    """H×W uint8 object ids (mine_masks.py's format): 0 background, 1…254 objects; a 0/255 mask is one object. A 255
    beside other ids is refused: an anti-aliased grey mask is not an id map."""
    m = read_mask(path)
    if m.max() == 255:
        if ((m > 0) & (m < 255)).any():
            raise UserError(f"{path}: holds 255 beside other values {sorted(set(m[(m > 0) & (m < 255)].tolist()))[:3]}"
                            "…: not an object mask (0 background, 1…254 object ids, or 0/255 for one object); "
                            "threshold a grey mask to 0/255")
        m = (m == 255).to(torch.uint8)
    return m


def components(mask, min_area=0.01):
    """uint8 object ids of a salient mask: each 8-connected component whose filled area passes the area rule."""
    mask = np.asarray(mask)
    labels, _ = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
    objects, m = np.zeros(mask.shape, np.uint8), 0
    for k, box in enumerate(scipy.ndimage.find_objects(labels), start=1):
        part = labels[box] == k
        if scipy.ndimage.binary_fill_holes(part).sum() >= min_area * mask.size and m < 254:
            m += 1
            objects[box][part] = m
    return objects


def image_size(path):
    """The image's (height, width), read from its header only."""
    with _opened(path, "image") as im:
        return im.size[1], im.size[0]


def voc_palette():
    """The PASCAL VOC colour map, 256×3 uint8: bit 3j + c of the class index is bit 7 − j of colour channel c."""
    i, pal = np.arange(256), np.zeros((256, 3), np.uint8)
    for j in range(8):
        for c in range(3):
            pal[:, c] |= ((i >> (3 * j + c)) & 1).astype(np.uint8) << (7 - j)
    return pal


def decode_label(path):
    """(class ids H×W uint8 from a palette or single-channel PNG, 255 = ignore; whether it was RGB). An RGB label
    in VOC palette colours is mapped back; any other RGB or 16-bit label is refused: its levels are not classes."""
    with _opened(path, "label") as im:
        if im.mode in ("P", "L", "1"):
            return torch.from_numpy(np.array(im, dtype=np.uint8)), False
        if im.mode in ("RGB", "RGBA"):
            rgb = np.array(im.convert("RGB"), dtype=np.int64)
            code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            pal = voc_palette().astype(np.int64)
            pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
            colours, inverse = np.unique(code, return_inverse=True)
            index = {c: i for i, c in enumerate(pal_code.tolist())}
            if all(c in index for c in colours.tolist()):
                lut = np.array([index[c] for c in colours.tolist()], np.uint8)
                return torch.from_numpy(lut[inverse].reshape(code.shape)), True
        raise UserError(f"{path}: a {im.mode} label, not class indices; save it as a palette or single-channel 8-bit "
                        "PNG whose pixel values are the class ids (255 = ignore), e.g. with PIL: "
                        "Image.fromarray(class_ids.astype('uint8')).save(path)")


def read_label(path):
    """A class-index label H×W uint8 (see decode_label)."""
    return decode_label(path)[0]


def _label_counts(batch):
    """Pixel counts per value (B×256) of a batch of samples' labels, and how many were RGB: in the loader workers."""
    decoded = [decode_label(s.label) for s in batch]
    counts = torch.stack([torch.bincount(y.flatten().long(), minlength=256) for y, _ in decoded])
    return counts, sum(from_rgb for _, from_rgb in decoded)


def scan_labels(splits, classes=0, workers=0):
    """Validate every label of `splits` ({name: samples}) before any work: refuse a value ≥ `classes`, a stray value
    far above the others, a split with no object class. Returns `classes`, else the largest value + 1."""
    hists, rgb, where = {}, 0, {}
    for name, samples in splits.items():
        loader = torch.utils.data.DataLoader(samples, batch_size=32, num_workers=workers, collate_fn=_label_counts)
        h = []
        for counts, n_rgb in tqdm(loader, desc=f"checking {name} labels", leave=False, disable=len(samples) < 500):
            h.append(counts)
            rgb += n_rgb
        hists[name] = torch.cat(h)  # (images, 256) pixel count per value
        for v in (hists[name][:, :IGNORE] > 0).any(0).nonzero()[:, 0].tolist():
            where.setdefault(v, samples[int((hists[name][:, v] > 0).nonzero()[0, 0])].label)
    if rgb:
        print0(f"note: {rgb} RGB label PNGs hold only VOC palette colours and were mapped back to class indices")
    present = sorted(where)
    top = present[-1] if present else 0
    if classes and top >= classes:
        raise UserError(f"{where[top]}: holds label value {top}, but --classes is {classes}")
    if not classes and present and len(present) - 1 < top / 2:
        raise UserError(f"{where[top]}: holds label value {top}, but only {len(present)} of the values 0..{top} occur "
                        "in these labels; fix that value, or pass --classes N if the dataset has N classes (21 for "
                        "PASCAL VOC)")
    for name, h in hists.items():
        if h[:, :IGNORE].sum() == 0:
            raise UserError(f"{name}: every label pixel is {IGNORE} (ignore); nothing can be learned or scored")
        if h[:, 1:IGNORE].sum() == 0:
            raise UserError(f"{name}: its labels hold only background (0) and ignore ({IGNORE}); a score on them "
                            "would measure background alone")
    return classes or top + 1


def class_names(n, root=None):
    """ROOT/classes.txt (one a line) where there is one, VOC's for 21, else class<i>."""
    f = Path(root or ".") / "classes.txt"
    names = f.read_text().split() if root and f.is_file() else VOC_CLASSES if n == len(VOC_CLASSES) else []
    return list(names)[:n] if len(names) >= n else [f"class{i}" for i in range(n)]


def save_label_png(label, path):
    """Save a H×W class-index array as a VOC palette PNG (atomically)."""
    im = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette().flatten().tolist())
    save_png(im, path)


def save_mask_png(mask, path):
    """Save a H×W {0,1} or bool array as a 0/255 grey PNG (atomically)."""
    save_png(Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L"), path)


def save_objects_png(objects, path):
    """H×W object ids as a PNG: one object 0/255 grey, several a palette PNG coloured like VOC classes."""
    objects = np.asarray(objects)
    if objects.max(initial=0) > 254:
        raise UserError(f"{path}: {int(objects.max())} objects; a mask PNG holds at most 254")
    if objects.max(initial=0) <= 1:
        save_mask_png(objects, path)
    else:
        save_label_png(objects, path)


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation. Geometry runs in the DataLoader workers; colour runs batched on the training device with parameters
# the workers drew, so a 16-core machine can feed a GPU (the per-image hue shift alone costs ~2 ms of a core).

def draw_view(hw, scale=(0.2, 1.0)):
    """A random view of an H×W image from torch's global RNG: RandomResizedCrop's box (area share `scale`, aspect
    3/4 to 4/3) and a horizontal flip."""
    top, left, h, w = torchvision.transforms.RandomResizedCrop.get_params(torch.empty(0, *hw), scale, (3 / 4, 4 / 3))
    return top, left, h, w, bool(torch.rand(()) < 0.5)


def crop_view(t, view, size):
    """Apply a drawn view to an image 3×H×W (antialiased) or a mask H×W (nearest): crop, resize, flip."""
    top, left, h, w, flip = view
    if t.dim() == 2:
        t = v2.functional.resized_crop(t[None], top, left, h, w, [size, size], v2.InterpolationMode.NEAREST)[0]
    else:
        t = v2.functional.resized_crop(t, top, left, h, w, [size, size], antialias=True)
    return t.flip(-1) if flip else t


def draw_color_params(rng, jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2):
    """RandomApply([ColorJitter(*jitter)], p_jitter) + RandomGrayscale(p_gray) drawn for one image from a numpy
    Generator: float32 (9,) = [b, c, s, h factors (identity 1, 1, 1, 0), the ops 0–3 in their order, grayscale]."""
    b, c, s, h = jitter
    if not 0 <= h <= 0.5:
        raise UserError(f"hue jitter {h}: must lie in [0, 0.5], as torchvision's")
    params = np.array([1, 1, 1, 0, 0, 1, 2, 3, 0], dtype=np.float32)  # no jitter, no grayscale
    if rng.random() < p_jitter:
        params[0:3] = [rng.uniform(max(0.0, 1 - x), 1 + x) for x in (b, c, s)]
        params[3] = rng.uniform(-h, h)
        params[4:8] = rng.permutation(4)  # as torchvision: a fresh random order of the ops per image
    params[8] = rng.random() < p_gray
    return torch.from_numpy(params)


def _gray(x):
    """ITU-R 601-2 luma, as torchvision's rgb_to_grayscale: B×3×H×W → B×1×H×W."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend_step(x, op, factors, active):
    """Brightness, contrast or saturation (`op` (B,)) where `active` (B,), in place: torchvision's blend
    clamp(f·x + (1 − f)·ref, 0, 1), ref = 0, the image's mean luma or each pixel's luma."""
    op = op.view(-1, 1, 1, 1)
    gray = _gray(x)                                                                   # gray: B×1×H×W
    ref = torch.where(op == 2, gray, torch.where(op == 1, gray.mean(dim=(2, 3), keepdim=True), 0.0))
    # where op is hue, `active` is False by construction, and factor 1 makes the step the identity
    f = torch.where(active.view(-1, 1, 1, 1), factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1), 1.0)
    return x.mul_(f).add_(ref * (1 - f)).clamp_(0, 1)


def _adjust_hue(x, hue):
    """torchvision's adjust_hue by hue (B,) turns, in the closed form of HSV → RGB:
    channel = V − (max − min)·clamp(min(k, 4 − k), 0, 1), k = (n + 6H) mod 6, n = 5, 3, 1."""
    r, g, b = x.unbind(1)                                                             # each B×H×W
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    inv_delta = 1 / torch.where(delta > 0, delta, 1.0)  # a grey pixel has delta 0: any hue gives it back
    h6 = torch.where(maxc == r, g - b, torch.where(maxc == g, b - r + 2 * delta, r - g + 4 * delta)).mul_(inv_delta)
    h6 += 6 * hue.view(-1, 1, 1)                                                      # h6: 6 × the new hue
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(h6.unsqueeze(1) + n, 6)                                       # k: B×3×H×W
    return torch.minimum(k, 4 - k).clamp_(0, 1).mul_(-delta.unsqueeze(1)).add_(maxc.unsqueeze(1))


def apply_color_params(x, params):
    """Colour-augment x B×3×H×W in [0, 1] with params B×9 of draw_color_params: torchvision's ops image by image
    (tests), without a loop or a host sync. float32, also under autocast."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, params = x.to(torch.float32, copy=True), params.float()
        factors, order = params[:, 0:4], params[:, 4:8].long()                        # B×4, B×4
        hue_pos = (order == 3).long().argmax(dim=1)                                   # hue_pos: B
        # the HSV round trip is expensive, so it runs once for the batch: an image's ops before it in its order run
        # in the first loop, those after it in the second (three steps each)
        for pos in range(0, 3):
            x = _blend_step(x, order[:, pos], factors, active=pos < hue_pos)
        hue = factors[:, 3]
        # where the hue op is skipped, x stays exact (the round trip is exact only up to rounding), as torchvision's
        x = torch.where((hue != 0).view(-1, 1, 1, 1), _adjust_hue(x, hue), x)
        for pos in range(1, 4):
            x = _blend_step(x, order[:, pos], factors, active=pos > hue_pos)
        return torch.where(params[:, 8].view(-1, 1, 1, 1) > 0.5, _gray(x).expand_as(x), x)


def normalize(x):
    """ImageNet normalisation of (…, 3, H, W) in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def seg_train_transform(size, scale=(0.75, 1.25), degrees=5, border_label=0):
    """Supervised training, as released: flip, scale jitter with a small rotation (bicubic: PIL images only; labels
    nearest), resize to size². What a zoom-out or rotation brings in is `border_label` (0 as released, 255 ignored)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=degrees, scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                        fill={Image.Image: 0, tv_tensors.Image: 0, tv_tensors.Mask: border_label}),
        v2.Resize((size, size), antialias=True),
        v2.ToImage(),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size, resize="bicubic"):
    """Evaluation: the image resized to size² (bicubic unantialiased = the release's INTER_CUBIC; bilinear
    antialiased); labels stay at their size."""
    return v2.Compose([
        v2.Resize((size, size), interpolation=v2.InterpolationMode[resize.upper()], antialias=resize == "bilinear"),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@contextlib.contextmanager
def seeded(seed):
    """A block on torch's global CPU RNG seeded with `seed` (torchvision's transforms draw from it), restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator alone: torch.manual_seed would queue GPU seeds
        yield


class SeededSampler(torch.utils.data.Sampler):
    """(index, seed) pairs in an order and with augmentation seeds drawn from (seed, epoch): what a run sees depends on
    --seed alone. Process `rank` takes every world-th visit; loop=True never ends; set_epoch skips `start` visits."""

    def __init__(self, n, seed, rank=0, world=1, loop=False):
        self.n, self.seed, self.rank, self.world, self.loop = n, seed, rank, world, loop
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def visits(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n)
        return list(zip(order.tolist(), rng.integers(0, 2 ** 62, self.n).tolist()))

    def __len__(self):
        return self.n // self.world - self.start

    def __iter__(self):
        if not self.loop:
            yield from self.visits(self.epoch)[self.rank::self.world][:self.n // self.world][self.start:]
            return
        position, first, epoch = 0, self.start * self.world, 0
        while True:
            for visit in self.visits(epoch):
                if position >= first and position % self.world == self.rank:
                    yield visit
                position += 1
            epoch += 1


class SegDataset(torch.utils.data.Dataset):
    """Labelled images. Items (index, seed) of SeededSampler: image and label augmented jointly by `transform` drawn
    from the seed. Plain indices: the image through `transform`, the label kept at its size to be scored there."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        s = self.samples[i]
        label = read_label(s.label)
        if seed is None:
            img = read_image(s.image)
            check_same_size(label, img.shape[1:], s.label, s.image, "label")
            return self.transform(tv_tensors.Image(img)), label.long(), i
        img = open_rgb(s.image)
        check_same_size(label, (img.height, img.width), s.label, s.image, "label")
        with seeded(seed):
            x, y = self.transform(img, tv_tensors.Mask(label))
        return x, y, i


def check_same_size(t, hw, path, image_path, what):
    if tuple(t.shape[-2:]) != tuple(hw):
        raise UserError(f"{path}: {what} is {tuple(t.shape[-2:])} but image {image_path} is {tuple(hw)}; it must be "
                        "at the image's original size")


def collate_keep_labels(batch):
    """Stack images; keep labels of different sizes as a list."""
    xs, ys, idx = zip(*batch)
    return torch.stack(xs), list(ys), torch.tensor(idx)


# ---------------------------------------------------------------------------------------------------------------------
# The paper's data, for users with a network: PASCAL VOC 2012 + SBD → the usual trainaug split

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
    val = set(read_ids(sets / "val.txt"))
    ids = sorted((set(read_ids(sets / "train.txt")) | set(read_ids(sbd / "train.txt"))
                  | set(read_ids(sbd / "val.txt"))) - val)
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
    write_text(sets / "trainaug.txt", "\n".join(ids) + "\n")
    return {"trainaug": len(ids), "val": len(val)}


def add_labelled_data_args(g, train_split=True):
    """The data flags of the scripts that read labels (linear_eval.py, finetune.py, kmeans_eval.py)."""
    g.add_argument("--data-root", required=True, help="VOC-layout root with labels (SegmentationClass[Aug])")
    add_download_arg(g)
    if train_split:
        g.add_argument("--train-split", default=None, help="split to train on (default trainaug, the paper's "
                       "10,582 images; train where the root has no trainaug)")
    g.add_argument("--val-split", default="val", help="split that is scored")
    g.add_argument("--classes", type=nonnegative_int, default=0, help="number of classes incl. background; 0 = the "
                   "largest label value in the splits + 1 (21 on VOC)")


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
    """Fetch VOC 2012 and SBD with torchvision's dataset classes into ROOT and assemble trainaug; returns the VOC
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
        print0(f"warning: expected 10582 trainaug and 1449 val images, got {counts}")
    return voc


# ======================================================================================================================
# 3. Evaluation

def confusion_matrix(pred, gt, n_classes, ignore_index=IGNORE):
    """(n_classes, n_classes) int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long().to(pred.device)
    keep = gt != ignore_index
    idx = gt[keep] * n_classes + pred[keep].clamp(0, n_classes - 1)
    return torch.bincount(idx, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def miou_from_confusion(conf, absent="skip"):
    """(mIoU in %, per-class IoU in %). A class absent from prediction and ground truth is left out of the mean
    (absent='skip', VOC's convention) or counts 0 (absent='zero', the release's K-Means and retrieval scoring)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))) * 100
    return float(iou.nanmean() if absent == "skip" else iou.nan_to_num(0).mean()), iou


def segmentation_loss(logits, y):
    """Cross-entropy over the labelled pixels (255 ignored): summed, then divided by their count, so that a batch
    whose pixels are all ignored adds 0 instead of NaN."""
    return F.cross_entropy(logits.float(), y, ignore_index=IGNORE, reduction="sum") / (y != IGNORE).sum().clamp(min=1)


@dataclass
class Reader:
    """How an evaluation's images reach the network: resized to size² (interpolation `resize`: bicubic as the
    release), `batch_size` at a time by `workers` loader processes, onto `device`, under autocast `amp`."""
    size: int
    resize: str
    batch_size: int
    workers: int
    device: torch.device
    amp: str


@torch.no_grad()
def evaluate_segmentation(predict, samples, n_classes, reader, world=None, keep=0, refine=None):
    """Score `predict` (B×3×S×S → logits B×C×h×w, upsampled bilinearly) at each label's size, each process on every
    world.size-th image; refine(sample, probs) (a CRF) adds conf_refined. Returns {conf, conf_refined, shown}."""
    device, amp = reader.device, reader.amp
    world = world or World(device=device)
    ds = torch.utils.data.Subset(SegDataset(samples, eval_transform(reader.size, reader.resize)),
                                 range(world.rank, len(samples), world.size))
    loader = torch.utils.data.DataLoader(ds, batch_size=reader.batch_size, num_workers=reader.workers,
                                         collate_fn=collate_keep_labels, pin_memory=device.type == "cuda")
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long, device=device)
    conf_refined = torch.zeros_like(conf) if refine else None
    shown = []
    for x, ys, idx in tqdm(loader, desc="eval", leave=False, disable=not world.is_main):
        with autocast(device, amp):
            logits = predict(x.to(device, non_blocking=True)).float()
        for lg, y, i in zip(logits, ys, idx.tolist()):
            y = y.to(device, non_blocking=True)
            lg = F.interpolate(lg[None], size=y.shape, mode="bilinear", align_corners=False)[0]
            pred = lg.argmax(0)
            conf += confusion_matrix(pred, y, n_classes)
            if refine:
                conf_refined += confusion_matrix(refine(samples[i], lg.softmax(0)).argmax(0), y, n_classes)
            if len(shown) < keep:
                shown.append((samples[i], y.cpu(), pred.cpu()))
    if world.size > 1:
        for c in (conf, conf_refined):
            if c is not None:
                dist.all_reduce(c)
    return {"conf": conf.cpu(), "conf_refined": conf_refined.cpu() if refine else None, "shown": shown}


def add_checkpoint_arg(g, many=False):
    g.add_argument("--checkpoint", required=True, nargs="+" if many else None,
                   help="the network" + ("s" if many else "") + ": a checkpoint.pth of pretrain.py or mine_masks.py; "
                   "or, as a baseline, a fresh SegModel of --arch with a random backbone ('random'), torchvision's "
                   "ImageNet classifier ('imagenet' = V1 as released, 'imagenet-v2') or a torchvision/MoCo v2 "
                   "state-dict file as its backbone")
    g.add_argument("--arch", default=None, help="architecture of a baseline (default resnet50); a checkpoint's own "
                   "arch is used, and a different --arch is refused")
    g.add_argument("--output-stride", type=int, default=8, choices=[8, 16], help="8: layer3 and layer4 dilated (as "
                   "pretrained); 16: layer4 alone, as the paper evaluates the ImageNet and MoCo baselines")
    g.add_argument("--resize", default="bicubic", choices=["bicubic", "bilinear"], help="interpolation of the images "
                   "resized to --size for scoring (released: bicubic)")


# The layers each kind of network has trained: an evaluation of another layer would score random weights.
TRAINED_LAYERS = {"pretrain": ("backbone", "decoder", "head"), "saliency": ("backbone", "decoder"),
                  "baseline": ("backbone",)}


def check_trained(kind, features, spec):
    """Refuse to read a layer that `spec` never trained, naming the flag to use instead."""
    if features not in TRAINED_LAYERS[kind]:
        why = ("a baseline's decoder and head are freshly initialised" if kind == "baseline" else
               "mine_masks.py trains the saliency head, not the embedding head")
        raise UserError(f"--features {features}: {spec} never trained that layer ({why}); use --features "
                        f"{TRAINED_LAYERS[kind][-1]}" + (" --output-stride 16, the paper's baseline protocol"
                                                         if kind == "baseline" else ""))


def fingerprint(state):
    """16 hex digits hashing a state dict's names and values: which network a result was computed from. Every
    evaluation records it and compares it before it reuses a stored result or resumes a run."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model(spec, arch, output_stride=8):
    """(model, kind, a line saying what it is) for a --checkpoint: a pretrain.py or mine_masks.py SegModel, or a
    baseline, a fresh SegModel of `arch` whose backbone is random, torchvision's ImageNet classifier or a file."""
    ck = None if spec == "random" or spec in TORCHVISION_WEIGHTS else torch_load(spec)
    if not (isinstance(ck, dict) and "kind" in ck and "model" in ck):
        arch = arch or "resnet50"
        model = SegModel(arch, saliency_head=False, output_stride=output_stride)
        report = load_backbone_weights(model.backbone, spec, arch)
        what = "a RANDOM-WEIGHTS BASELINE" if spec == "random" else f"a BASELINE with backbone {spec}"
        return model, "baseline", f"scoring {what}: a fresh {arch} SegModel, {report}"
    check_checkpoint(ck, spec)
    if ck["kind"] not in ("pretrain", "saliency"):
        raise UserError(f"{spec}: is a '{ck['kind']}' checkpoint; this needs a 'pretrain' one (pretrain.py) or a "
                        "'saliency' one (mine_masks.py)")
    own = ck["args"].get("arch")
    if arch and own and arch != own:
        raise UserError(f"{spec}: holds a {own} model but --arch says {arch}; drop --arch or pass a {arch} checkpoint")
    model = model_from_checkpoint(ck, spec, output_stride)
    return model, ck["kind"], f"{ck['kind']} checkpoint {spec} ({model.arch}, epoch {ck.get('epoch', '?')})"


def default_eval_out(spec, arch, what):
    """OUT of an evaluation: next to the --checkpoint file, or runs/<what>_<arch>_<word> for random / imagenet."""
    if spec == "random" or spec in TORCHVISION_WEIGHTS:
        return Path("runs") / f"{what}_{arch or 'resnet50'}_{spec}"
    return Path(spec).parent / what


# ======================================================================================================================
# 4. Runtime plumbing

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


def _number(kind, low, what, high=None):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s} is not a finite number")
        if not (v > low if what == ">" else v >= low) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"{s} must be {what} {low}" + (f" and <= {high}" if high else ""))
        return v
    return parse


positive_int = _number(int, 0, ">")
nonnegative_int = _number(int, 0, ">=")
positive_float = _number(float, 0, ">")
nonnegative_float = _number(float, 0, ">=")
probability = _number(float, 0, ">=", high=1)  # a probability, a momentum, a share of an image
real_number = _number(float, -math.inf, ">")  # any finite number, e.g. a logit


def add_runtime_args(p):
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = cuda if available")
    g.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"],
                   help="CUDA mixed precision; ignored on CPU. GradScaler only for fp16")
    g.add_argument("--workers", type=nonnegative_int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes")
    g.add_argument("--seed", type=int, default=0)
    return g


@dataclass
class World:
    """This process among the torchrun processes (rank 0 of 1 without torchrun), and its device."""
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_world(device="auto"):
    """One process by default; under torchrun (WORLD_SIZE > 1) one process per GPU (nccl), or gloo on CPU."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want_cuda else "gloo")
        return World(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if want_cuda else
                     torch.device("cpu"))
    return World(0, 1, torch.device("cuda" if want_cuda else "cpu"))


def print0(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


@torch.no_grad()
def autocast(device, amp):
    """bf16 (default) or fp16 autocast on CUDA; full precision on CPU, where autocast buys nothing for convs."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def seed_all(*keys):
    """Seed python, numpy and torch (CPU and CUDA) from a tuple of integers, e.g. (seed, epoch, rank): reseeding at
    each epoch makes its dropout masks a function of the seed alone, so a resumed run continues exactly."""
    s = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def poly_lr(base_lr, step, total, power=0.9):
    return base_lr * (1 - step / total) ** power


def _grad_norm(params):
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one fused kernel
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class TrainStep:
    """zero_grad, backward (scaled under fp16), step, and the divergence guard: steps keep on-device flags (no host
    sync), and check(), every `check_every` steps and before each checkpoint, refuses a non-finite loss, gradient or
    weight of `modules`, or a loss `explode`× past the first: a checkpoint is always good."""

    def __init__(self, optimizer, modules, device, amp, advice, check_every=50, explode=1e3):
        self.optimizer, self.modules = optimizer, modules
        fp16 = device.type == "cuda" and amp == "fp16"
        self.advice = advice + (" or an fp16 overflow (try --amp bf16)" if fp16 else "")
        self.check_every, self.explode = check_every, explode
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.top = torch.zeros((), device=device)
        self.first = None  # the run's first loss (kept across a resume), the scale an explosion is measured against
        self.steps, self.checkpoint = 0, None

    def __call__(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        if not self.scaler.is_enabled():  # under fp16 the scaler itself skips steps with non-finite gradients
            bad = bad | ~torch.isfinite(_grad_norm(self.params).to(loss.device))
        self.bad |= bad
        self.top = torch.maximum(self.top, loss.nan_to_num(0))
        if self.first is None:
            self.first = loss
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.steps += 1
        if self.steps % self.check_every == 0:
            self.check(f"step {self.steps}")
        return loss

    def check(self, where):
        reason = None
        if bool(self.bad):  # the host sync, once per check
            reason = "the loss or a gradient became inf/NaN"
        elif self.first is not None and float(self.top) > self.explode * max(float(self.first), 1.0):
            reason = f"the loss reached {float(self.top):.3g}, its first value was {float(self.first):.3g}"
        else:
            bad = first_nonfinite((n, t) for m in self.modules for n, t in m.state_dict().items())
            if bad:
                reason = f"a weight or BatchNorm statistic is inf/NaN ({bad})"
        if reason:
            good = (f"; the last checkpoint, {self.checkpoint}, is from before and was checked finite: resume it with "
                    "a lower learning rate, or start afresh" if self.checkpoint else "")
            raise UserError(f"training diverged by {where}: {reason}; likely causes: {self.advice}{good}")

    def state_dict(self):
        return {"scaler": self.scaler.state_dict(), "first_loss": None if self.first is None else float(self.first)}

    def load_state_dict(self, state):
        self.scaler.load_state_dict(state["scaler"])
        if state.get("first_loss") is not None:
            self.first = torch.tensor(state["first_loss"], device=self.bad.device)


# ---------------------------------------------------------------------------------------------------------------------
# Files: atomic writes, output folders, checkpoints

def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: readers never see a half-written file. A kill in between leaves
    a .tmp-<pid>-<name> that prepare_out removes at the next start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def save_object(path, obj):
    """torch.save, atomically."""
    atomic_write(path, lambda p: torch.save(obj, p))


def save_png(image, path):
    """A PIL image or an (H, W[, 3]) uint8 array as a PNG, atomically."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    atomic_write(path, lambda p: image.save(p, format="PNG"))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable(folder, flag="--out"):
    """Create `folder` (and its parents) and write a probe file in it; any failure is one line naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        what = "a file is in the way" if folder.exists() and not folder.is_dir() else (e.strerror or type(e).__name__)
        raise UserError(f"{folder}: cannot write there ({what}); pass another {flag}") from None


def prepare_out(out, resume, marks, flag="--out", is_main=True):
    """Make OUT writable and clear of killed writes' leftovers before any work; a run there (a file matching a glob
    of `marks`) needs --resume or another --out, never overwritten silently. Returns whether it held a run."""
    out = Path(out)
    if not is_main:
        return any(next(out.glob(m), None) for m in marks) if out.is_dir() else False
    check_writable(out, flag)
    for tmp in out.rglob(".tmp-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
    found = next((p for m in marks for p in out.glob(m)), None)
    if found and not resume:
        raise UserError(f"{out}: holds a run already ({found.relative_to(out)}); pass --resume to continue it or "
                        f"another {flag} (or delete it)")
    return found is not None


def torch_load(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path}: not a PyTorch checkpoint torch.load can read ({type(e).__name__}); pass a "
                        ".pth written by torch.save") from None


def _tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def first_nonfinite(named):
    """The name of the first float tensor of (name, tensor) pairs whose sum is inf/NaN (a NaN, an inf, or values that
    overflow: diverged either way), else None. A sum per tensor is ten times faster than isfinite on a CPU."""
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    ok = torch.stack([t.detach().sum().float().cpu() for _, t in named]).isfinite() if named else torch.ones(0)
    return None if ok.all() else named[int((~ok).nonzero()[0, 0])][0]


def save_checkpoint(path, kind, **state):
    """Write a checkpoint atomically; one holding a non-finite tensor is refused, so a checkpoint is always good."""
    bad = first_nonfinite(_tensors(state))
    if bad:
        raise UserError(f"refusing to write {path}: {bad} is not finite (the run diverged)")
    save_object(path, {"kind": kind, **state})


def check_checkpoint(ck, path, kind=None):
    """Refuse what is not a checkpoint of this project, of the wrong kind, or holding inf/NaN weights."""
    if not isinstance(ck, dict) or "model" not in ck or "args" not in ck:
        raise UserError(f"{path}: not a checkpoint of this project (no 'model'/'args'); pass a checkpoint.pth "
                        "written by pretrain.py, mine_masks.py or finetune.py")
    if kind and ck.get("kind") != kind:
        raise UserError(f"{path}: is a '{ck.get('kind')}' checkpoint, this needs a '{kind}' one")
    bad = first_nonfinite(_tensors(ck["model"]))
    if bad:
        raise UserError(f"{path}: weight {bad} is inf/NaN (a diverged run); pass a checkpoint from before it")
    return ck


def load_checkpoint(path, kind=None):
    return check_checkpoint(torch_load(path), path, kind)


def restart_from_checkpoint(path, kind, made_with, afresh_on_change=False, **objects):
    """The one way every script resumes (as DINO's): the `kind` checkpoint at `path` must be made with `made_with`
    (the starting network's fingerprint among them), else one line names what differs (`afresh_on_change`: a note and
    None). Each of `objects` (module, optimizer, TrainStep or tensor) loads its entry. Returns the checkpoint."""
    ck = load_checkpoint(path, kind)
    for k, v in made_with.items():
        old = ck.get("made_with", {}).get(k)
        if old != v:
            if afresh_on_change:
                print0(f"note: {path} was made with {k} {old}, not {v}: starting afresh")
                return None
            raise UserError(f"{path}: was made with {k} {old}, not {v}; pass the same settings or another --out")
    for name, obj in objects.items():
        if obj is not None and ck.get(name) is not None:
            obj.copy_(ck[name]) if torch.is_tensor(obj) else obj.load_state_dict(ck[name])
    print0(f"resumed {path} at {'epoch' if 'epoch' in ck else 'step'} {ck.get('epoch', ck.get('step'))}")
    return ck


def model_from_checkpoint(ck, path="checkpoint", output_stride=8):
    """Rebuild the SegModel a checkpoint holds (arch from its args, heads from its weights) and load it strictly."""
    sd, arch = ck["model"], ck["args"].get("arch", "resnet50")
    if "head.weight" not in sd:
        raise UserError(f"{path}: holds no SegModel weights")
    model = SegModel(arch, sd["head.weight"].shape[0], saliency_head="saliency_head.weight" in sd,
                     output_stride=output_stride)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit a {arch} SegModel ({str(e).splitlines()[0]})") from None
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Printing and pictures

def print_table(rows, header):
    """A small fixed-width table for the end of a run."""
    cells = [[str(h) for h in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print0("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print0("  ".join("-" * w for w in widths))


def colorize(label):
    """H×W class indices → 3×H×W uint8 in the VOC palette (255 = ignore shows white-ish)."""
    pal = torch.from_numpy(voc_palette())
    return pal[label.long().clamp(0, 255)].permute(2, 0, 1).contiguous()


def save_grid(tiles, path, ncol, size=None):
    """Save a list of 3×H×W uint8 tiles as one PNG grid, `ncol` tiles a row, each resized to `size`×`size`."""
    if size:
        tiles = [F.interpolate(t[None].float(), size=(size, size), mode="nearest")[0].to(torch.uint8) for t in tiles]
    grid = torchvision.utils.make_grid(tiles, nrow=ncol, padding=2, pad_value=255)
    save_png(grid.permute(1, 2, 0).numpy(), path)
