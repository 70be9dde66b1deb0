"""common.py: the model, the data and its validation, sampling, the training step's guard, output folders."""
import argparse
import importlib
import os

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from PIL import Image

import common
import synthetic
from common import UserError
from conftest import SCRIPTS


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_model_has_output_stride_8_and_two_heads(arch):
    m = common.SegModel(arch, 32).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert m.features(x).shape == (1, 256, 8, 6)
        emb, sal = m(x)
        small, _ = m(x, upsample=False)
        assert m.layer_features(x, "backbone").shape == (1, m.layer_channels("backbone"), 8, 6)
    assert emb.shape == (1, 32, 64, 48) and sal.shape == (1, 64, 48) and small.shape == (1, 32, 8, 6)


def test_imagenet_means_the_released_v1_weights(monkeypatch):
    asked = []

    def fake_state_dict(self, progress=True):
        asked.append(str(self))
        raise OSError("offline")

    monkeypatch.setattr(type(common.torchvision.models.ResNet50_Weights.IMAGENET1K_V1), "get_state_dict",
                        fake_state_dict)
    net = common.dilated_resnet("resnet50")
    for spec in ("imagenet", "imagenet-v2"):
        with pytest.raises(UserError, match="could not fetch"):
            common.load_backbone_weights(net, spec, "resnet50")
    assert asked == ["ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"]
    with pytest.raises(UserError, match="no IMAGENET1K_V2 weights for resnet18"):
        common.load_backbone_weights(common.dilated_resnet("resnet18"), "imagenet-v2", "resnet18")


def test_synthetic_data_is_not_solved_by_colour(synth_root):
    """Nearest class-mean colour of a pixel must not tell the class: hues are random; shape and texture are not."""
    samples = [s for split in ("train", "val") for s in common.list_samples(synth_root, split, labels=True)]
    pix, lab = [], []
    for s in samples:
        img, y = common.read_image(s.image), common.read_label(s.label)
        fg = y > 0
        pix.append(img[:, fg].T.float())
        lab.append(y[fg].long())
    pix, lab = torch.cat(pix), torch.cat(lab)
    means = torch.stack([pix[lab == c].mean(0) for c in range(1, 5)])
    acc = ((torch.cdist(pix, means).argmin(1) + 1) == lab).float().mean()
    assert acc < 0.4, acc  # chance is 0.25
    assert set(lab.unique().tolist()) == {1, 2, 3, 4}


def test_synthetic_data_is_seeded(tmp_path):
    a = synthetic.make_synthetic_voc(tmp_path / "a", n_train=3, n_val=1, size=32, seed=5)
    b = synthetic.make_synthetic_voc(tmp_path / "b", n_train=3, n_val=1, size=32, seed=5)
    for sa, sb in zip(common.list_samples(a, "train", labels=True), common.list_samples(b, "train", labels=True)):
        assert torch.equal(common.read_label(sa.label), common.read_label(sb.label))
        assert torch.equal(common.read_image(sa.image), common.read_image(sb.image))


def test_miou_counts_only_classes_present():
    gt = torch.tensor([0, 0, 1, 1, 255, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    conf = common.confusion_matrix(pred, gt, 4)
    assert conf.sum() == 5  # the ignored pixel is not counted
    miou, iou = common.miou_from_confusion(conf)
    # class 0: tp 1, union 3; class 1: tp 2, union 3; class 2: tp 0, union 1; class 3 absent → NaN, not averaged
    assert torch.allclose(iou[:3], torch.tensor([100 / 3, 200 / 3, 0.0], dtype=torch.float64))
    assert torch.isnan(iou[3]) and miou == pytest.approx(100 / 3)
    assert common.miou_from_confusion(conf, absent="zero")[0] == pytest.approx(100 / 4)  # the release's K-Means rule


# ----------------------------------------------------------------------------------------------------------------------
# labels and images: what they are, not what they seem

def label_root(tmp_path, labels, size=(8, 8)):
    """A VOC-layout root whose 'val' split holds one image per label array."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for i, lab in enumerate(labels):
        Image.new("RGB", size[::-1]).save(tmp_path / "JPEGImages" / f"im{i}.jpg")
        if isinstance(lab, Image.Image):
            lab.save(tmp_path / "SegmentationClass" / f"im{i}.png")
        else:
            common.save_label_png(lab, tmp_path / "SegmentationClass" / f"im{i}.png")
        ids.append(f"im{i}")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids))
    return {"val": common.list_samples(tmp_path, "val", labels=True)}


def test_rgb_labels_in_the_voc_palette_map_back_and_other_rgb_is_refused(tmp_path, capsys):
    y = np.zeros((8, 8), np.uint8)
    y[2:5, 2:5], y[0] = 15, 255
    rgb = Image.fromarray(common.voc_palette()[y])  # what an image editor saves: the palette's colours, as RGB
    splits = label_root(tmp_path / "a", [rgb])
    assert torch.equal(common.read_label(splits["val"][0].label), torch.from_numpy(y))
    assert common.scan_labels(splits, classes=21) == 21 and "mapped back" in capsys.readouterr().out
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    with pytest.raises(UserError, match=r"im0.png: a RGB label, not class indices; save it as a palette"):
        common.scan_labels(label_root(tmp_path / "b", [photo]))
    with pytest.raises(UserError, match="a I;16 label"):
        common.scan_labels(label_root(tmp_path / "c", [Image.fromarray(y.astype(np.uint16))]))


@pytest.mark.parametrize("script,flag", [("linear_eval", "--train-split"), ("finetune", "--train-split"),
                                         ("kmeans_eval", "--retrieval-split")])
def test_train_val_overlap_refused(synth_root, tmp_path, script, flag):
    """An image in both splits would be scored on what it was trained on (or retrieve itself): refused first."""
    root = tmp_path / "voc"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for d in ("JPEGImages", "SegmentationClass"):
        os.symlink(synth_root / d, root / d)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("train_0000\ntrain_0001\nval_0000\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("val_0000\nval_0001\n")
    with pytest.raises(common.UserError, match=f"1 images are in both {flag} train and --val-split val"):
        __import__(script).main(["--data-root", str(root), "--out", str(tmp_path / "out"), "--arch", "resnet18",
                                 "--checkpoint", "random"])
    assert not (tmp_path / "out").exists()


def test_label_values_are_checked_against_the_classes(tmp_path):
    base = [np.full((8, 8), c, np.uint8) for c in (0, 1, 2, 3, 4)]
    assert common.scan_labels(label_root(tmp_path / "ok", base)) == 5
    stray = base + [np.full((8, 8), 30, np.uint8)]  # one image with a value far above the others
    with pytest.raises(UserError, match=r"im5.png: holds label value 30, but only 6 of the values 0..30 occur"):
        common.scan_labels(label_root(tmp_path / "stray", stray))
    assert common.scan_labels(label_root(tmp_path / "stray2", stray), classes=31) == 31  # declared: accepted
    with pytest.raises(UserError, match=r"im4.png: holds label value 4, but --classes is 3"):
        common.scan_labels(label_root(tmp_path / "few", base), classes=3)
    with pytest.raises(UserError, match="only background .0. and ignore"):
        common.scan_labels(label_root(tmp_path / "bg", [np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)]))
    with pytest.raises(UserError, match="every label pixel is 255"):
        common.scan_labels(label_root(tmp_path / "ign", [np.full((8, 8), 255, np.uint8)]))


def test_16_bit_and_odd_mode_images_are_read_as_they_look(tmp_path):
    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    Image.fromarray(grey).save(tmp_path / "g16.png")
    x = common.read_image(tmp_path / "g16.png")
    assert x.shape == (3, 8, 8) and x.min() == 0 and 240 <= x.max() <= 246 and len(x.unique()) > 50
    Image.new("CMYK", (5, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert common.read_image(tmp_path / "cmyk.jpg").shape == (3, 4, 5)


# ----------------------------------------------------------------------------------------------------------------------
# seeded sampling, the training step, output folders, checkpoints

def test_seeded_sampler_depends_on_seed_and_epoch_only():
    a = common.SeededSampler(10, seed=3)
    a.set_epoch(2)
    b = common.SeededSampler(10, seed=3)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(i for i, _ in a) == list(range(10))
    b.set_epoch(3)
    assert list(a) != list(b)
    b.set_epoch(2, start=4)  # resuming within an epoch skips what was done
    assert list(b) == list(a)[4:]
    # two processes share an epoch without overlap
    r0, r1 = common.SeededSampler(10, 3, rank=0, world=2), common.SeededSampler(10, 3, rank=1, world=2)
    assert len(list(r0)) == len(list(r1)) == 5 and not {i for i, _ in r0} & {i for i, _ in r1}
    # loop mode: an endless stream of epochs; a resumed stream continues where it stopped
    loop = common.SeededSampler(4, 3, loop=True)
    first = [v for _, v in zip(range(11), loop)]
    loop.set_epoch(0, start=7)
    assert [v for _, v in zip(range(4), loop)] == first[7:11]


def tiny_step(lr, explode=1e3):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    return net, common.TrainStep(opt, [net], torch.device("cpu"), "none", advice="lower the lr", check_every=1000,
                                 explode=explode)


def test_train_step_guard_stops_on_nan_explosion_and_bad_weights(tmp_path):
    net, step = tiny_step(0.1)
    x = torch.randn(8, 4)
    for _ in range(3):
        step(net(x).pow(2).mean())
    step.check("epoch 1")  # a healthy run passes
    step(net(x).sum() * float("nan"))
    with pytest.raises(UserError, match=r"training diverged by epoch 2: the loss or a gradient became inf/NaN; "
                                        r"likely causes: lower the lr"):
        step.check("epoch 2")
    net, step = tiny_step(0.1, explode=10)
    step(net(x).pow(2).mean())
    step.checkpoint = tmp_path / "checkpoint.pth"
    step(net(x).pow(2).mean() * 1e3)  # finite, but far past the first loss
    with pytest.raises(UserError, match=r"the loss reached .*checkpoint.pth, is from before and was checked finite"):
        step.check("step 2")
    net, step = tiny_step(0.1)
    step(net(x).pow(2).mean())
    net[1].running_var.fill_(float("inf"))  # a diverged BatchNorm statistic, the loss still fine
    with pytest.raises(UserError, match=r"a weight or BatchNorm statistic is inf/NaN \(1.running_var\)"):
        step.check("epoch 1")
    with pytest.raises(UserError, match="refusing to write .*1.running_var is not finite"):
        common.save_checkpoint(tmp_path / "ck.pth", "test", model=net.state_dict(), args={})
    assert not (tmp_path / "ck.pth").exists()


def test_prepare_out_refuses_to_overwrite_and_cleans_interrupted_writes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert common.prepare_out(out, resume=False, marks=["checkpoint.pth"]) is False
    (out / "checkpoint.pth").write_bytes(b"x")
    with pytest.raises(UserError, match=r"run: holds a run already \(checkpoint.pth\); pass --resume"):
        common.prepare_out(out, resume=False, marks=["checkpoint.pth"])
    assert common.prepare_out(out, resume=True, marks=["checkpoint.pth"]) is True
    dead = out / ".tmp-999999999-checkpoint.pth"  # left by a process killed during a save
    live = out / f".tmp-{os.getpid()}-other.pth"  # being written right now
    dead.write_bytes(b"half"), live.write_bytes(b"half")
    common.prepare_out(out, resume=True, marks=["checkpoint.pth"])
    assert not dead.exists() and live.exists()
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(UserError, match="file: cannot write there .a file is in the way.; pass another --out"):
        common.prepare_out(tmp_path / "file", resume=False, marks=[])

    def read_only(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(common.Path, "write_bytes", read_only)
    with pytest.raises(UserError, match=r"ro: cannot write there \(Permission denied\)"):
        common.prepare_out(tmp_path / "ro", resume=False, marks=[])


def test_load_checkpoint_refuses_junk_other_kinds_and_nan(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"junk.pth: not a PyTorch checkpoint torch.load can read \(\w+\); pass"):
        common.load_checkpoint(tmp_path / "junk.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        common.load_checkpoint(tmp_path / "other.pth")
    torch.save({"kind": "linear", "model": {}, "args": {}}, tmp_path / "lin.pth")
    with pytest.raises(UserError, match="is a 'linear' checkpoint, this needs a 'pretrain' one"):
        common.load_checkpoint(tmp_path / "lin.pth", kind="pretrain")
    torch.save({"kind": "pretrain", "model": {"w": torch.tensor([1.0, float("inf")])}, "args": {}},
               tmp_path / "inf.pth")
    with pytest.raises(UserError, match="weight w is inf/NaN"):
        common.load_checkpoint(tmp_path / "inf.pth")


# ----------------------------------------------------------------------------------------------------------------------
# the paper's data (needs a network; the assembly is tested offline)

def fake_voc_and_sbd(tmp_path):
    voc, sbd = tmp_path / "VOCdevkit" / "VOC2012", tmp_path / "SBD"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    (sbd / "cls").mkdir(parents=True)
    ids = [f"2008_{i:06d}" for i in range(6)]
    for i in ids:
        Image.new("RGB", (20, 10)).save(voc / "JPEGImages" / f"{i}.jpg")
    for i in ids[:2] + ids[4:]:  # VOC labels for its own train and val
        common.save_label_png(np.ones((10, 20), np.uint8), voc / "SegmentationClass" / f"{i}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:2]))
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[4:]))
    (sbd / "train.txt").write_text("\n".join([ids[1], ids[2], ids[4]]))  # ids[4] is VOC val: must stay out
    (sbd / "val.txt").write_text(ids[3])
    for i in ids[1:5]:
        seg = np.full((10, 20), 7, np.uint8)
        scipy.io.savemat(sbd / "cls" / f"{i}.mat", {"GTcls": {"Segmentation": seg, "Boundaries": 0}})
    return voc, sbd, ids


def test_trainaug_assembly_from_voc_and_sbd(tmp_path):
    voc, sbd, ids = fake_voc_and_sbd(tmp_path)
    assert common.train_split(voc, None) == "train"  # no trainaug yet: the fallback, said
    counts = common.assemble_voc_trainaug(voc, sbd)
    assert counts == {"trainaug": 4, "val": 2} and common.train_split(voc, None) == "trainaug"
    assert (voc / "ImageSets/Segmentation/trainaug.txt").read_text().split() == ids[:4]
    samples = common.list_samples(voc, "trainaug", labels=True)
    labels = {s.id: common.read_label(s.label) for s in samples}
    assert labels[ids[1]].unique().tolist() == [1]  # VOC's own label wins over SBD's
    assert labels[ids[2]].unique().tolist() == [7] and labels[ids[2]].shape == (10, 20)
    assert not (voc / "SegmentationClassAug" / f"{ids[4]}.png").exists()
    scipy.io.savemat(sbd / "cls" / f"{ids[3]}.mat", {"GTcls": {"Segmentation": np.zeros((5, 5), np.uint8)}})
    (voc / "SegmentationClassAug" / f"{ids[3]}.png").unlink()
    with pytest.raises(UserError, match=f"{ids[3]}.mat: label is"):
        common.assemble_voc_trainaug(voc, sbd)


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(common.torchvision.datasets, "VOCSegmentation", offline)
    with pytest.raises(UserError, match="downloading PASCAL VOC 2012 / SBD .* failed"):
        common.download_voc(tmp_path)
    monkeypatch.setattr(common, "download_voc", lambda root: root + "/VOCdevkit/VOC2012")
    single = argparse.Namespace(download=True, data_root="d")
    several = argparse.Namespace(download=True, data_root=["d", "x"])
    common.resolve_download(single)
    common.resolve_download(several)
    assert single.data_root == "d/VOCdevkit/VOC2012" and several.data_root == ["d/VOCdevkit/VOC2012", "x"]


# ----------------------------------------------------------------------------------------------------------------------
# command lines

def parser_of(script, monkeypatch):
    built = []

    def keep(self, *a, **k):  # the parser get_args builds, without parsing anything
        built.append(self)
        raise SystemExit

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep)
    with pytest.raises(SystemExit):
        importlib.import_module(script).get_args([])
    return built[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script, monkeypatch):
    """Every flag that takes a value names its default in --help, and the docstring is shown line by line as
    written (its commands keep their line continuations)."""
    parser = parser_of(script, monkeypatch)
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and not action.required:
            line = parser._get_formatter()._format_action(action)
            assert "(default:" in line, f"{script} {action.option_strings[0]}: no default in --help"
    shown = parser.format_help()
    assert all(line in shown for line in importlib.import_module(script).__doc__.splitlines())


@pytest.mark.parametrize("script", SCRIPTS)
def test_sizes_and_counts_are_checked_by_argparse(script, capsys):
    mod = importlib.import_module(script)
    base = {"mine_masks": [], "pretrain": [], "linear_eval": ["--checkpoint", "random"],
            "kmeans_eval": ["--checkpoint", "random"], "finetune": ["--checkpoint", "random"]}[script]
    for flag, value in (("--batch-size", "0"), ("--size", "0"), ("--workers", "-1")):
        with pytest.raises(SystemExit) as e:
            mod.get_args(["--data-root", "x", *base, flag, value])
        assert e.value.code == 2 and f"argument {flag}: {value} must be" in capsys.readouterr().err


def _resnet18_state(seed):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_torchvision_v1_files_without_num_batches_tracked_load(tmp_path):
    """The release's ImageNet file predates BatchNorm's num_batches_tracked buffers: it must load, every weight."""
    sd = {k: v for k, v in _resnet18_state(1).items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "resnet18-v1.pth")
    net = common.dilated_resnet("resnet18")
    report = common.load_backbone_weights(net, str(tmp_path / "resnet18-v1.pth"), "resnet18")
    assert "nothing missing" in report
    own = net.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k


def test_moco_v2_checkpoints_load_the_query_encoder(tmp_path):
    """main_moco.py's file: {epoch, arch, state_dict: module.encoder_q.* (with the MLP head fc.0/fc.2),
    module.encoder_k.*, module.queue, module.queue_ptr, optimizer}: the backbone is encoder_q without its head."""
    q, k = _resnet18_state(2), _resnet18_state(3)
    head = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.zeros(512), "fc.2.weight": torch.randn(128, 512),
            "fc.2.bias": torch.zeros(128)}
    q = {**{n: v for n, v in q.items() if not n.startswith("fc.")}, **head}
    k = {**{n: v for n, v in k.items() if not n.startswith("fc.")}, **head}
    state = {**{f"module.encoder_q.{n}": v for n, v in q.items()}, **{f"module.encoder_k.{n}": v for n, v in k.items()},
             "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}},
               tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    net = common.dilated_resnet("resnet18")
    common.load_backbone_weights(net, str(tmp_path / "moco_v2_800ep_pretrain.pth.tar"), "resnet18")
    own = net.state_dict()
    assert torch.equal(own["conv1.weight"], q["conv1.weight"]) and not torch.equal(own["conv1.weight"],
                                                                                    k["conv1.weight"])
    assert all(torch.equal(own[n], v) for n, v in q.items() if not n.startswith("fc."))


def test_other_backbone_files_are_refused_in_one_line(tmp_path):
    sd = _resnet18_state(4)
    sd.pop("layer1.0.conv1.weight")
    torch.save(sd, tmp_path / "cut.pth")
    torch.save({"model": "not tensors"}, tmp_path / "odd.pth")
    net = common.dilated_resnet("resnet18")
    with pytest.raises(UserError, match="missing 1 keys e.g. \\['layer1.0.conv1.weight'\\]"):
        common.load_backbone_weights(net, str(tmp_path / "cut.pth"), "resnet18")
    with pytest.raises(UserError, match="not a state dict of tensors"):
        common.load_backbone_weights(net, str(tmp_path / "odd.pth"), "resnet18")
    with pytest.raises(UserError, match="does not fit resnet50"):
        common.load_backbone_weights(common.dilated_resnet("resnet50"), str(tmp_path / "cut.pth"), "resnet50")


def test_output_stride_16_dilates_layer4_alone(pretrain_ck):
    x = torch.randn(1, 3, 64, 64)
    for os_, hw in ((8, 8), (16, 4)):
        m = common.SegModel("resnet18", output_stride=os_).eval()
        assert m.layer_features(x, "backbone").shape[-2:] == (hw, hw)
        assert m.backbone.layer3[0].conv1.stride == ((1, 1) if os_ == 8 else (2, 2))
    a = common.load_model(str(pretrain_ck), None, 8)[0]
    b = common.load_model(str(pretrain_ck), None, 16)[0]
    assert common.fingerprint(a.state_dict()) == common.fingerprint(b.state_dict())  # the same weights, new geometry
