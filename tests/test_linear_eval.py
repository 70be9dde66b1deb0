"""linear_eval.py: the frozen-network sanity check, scoring at the label's own size, end to end, bad input."""
import json
import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import common
import synthetic
import linear_eval as le
from conftest import kill_after_first_checkpoint, one_line_error


def _epoch(model, synth_root, frozen):
    """One epoch of the linear protocol (LinearProbe, TrainStep) on 4 images; returns (state before, probe, loss)."""
    samples = common.list_samples(synth_root, "train", labels=True)[:4]
    ds = common.SegDataset(samples, common.seg_train_transform(32))
    loader = DataLoader(ds, batch_size=4, sampler=common.SeededSampler(4, 0))
    probe = le.LinearProbe(model, "decoder", 5)
    if not frozen:
        probe.model.requires_grad_(True)
    before = {k: v.detach().clone() for k, v in probe.model.state_dict().items()}
    params = [p for p in probe.parameters() if p.requires_grad]
    step = common.TrainStep(torch.optim.SGD(params, lr=0.1), [probe], torch.device("cpu"), "none", advice="")
    probe.train()
    if not frozen:
        probe.model.train()  # what a forgotten freeze looks like: BatchNorm statistics drift
    for x, y, _ in loader:
        logits = torch.nn.functional.interpolate(probe(x), size=y.shape[-2:], mode="bilinear")
        loss = step(common.segmentation_loss(logits, y))
    return before, probe, loss


def test_sanity_check_fails_if_backbone_left_trainable(synth_root):
    torch.manual_seed(0)
    before, probe, loss = _epoch(common.SegModel("resnet18", 32), synth_root, frozen=True)
    le.check_frozen(probe.model, before)  # frozen: passes
    assert loss > 0 and probe.classifier.weight.grad is not None  # ...while the new layer did learn
    before, probe, _ = _epoch(common.SegModel("resnet18", 32), synth_root, frozen=False)
    with pytest.raises(RuntimeError, match="sanity check failed"):
        le.check_frozen(probe.model, before)
    model = common.SegModel("resnet18", 32).eval()  # a single touched weight is caught too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.backbone.layer1[0].conv1.weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(RuntimeError, match="backbone.layer1.0.conv1.weight"):
        le.check_frozen(model, before)


def test_scored_at_original_label_size(tmp_path):
    """Images of different sizes: the confusion matrix counts exactly the valid pixels of each original label."""
    root = tmp_path / "odd"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    valid = 0
    for i, (h, w) in enumerate([(37, 53), (61, 29)]):
        Image.new("RGB", (w, h), (i * 90, 40, 200)).save(root / "JPEGImages" / f"im{i}.jpg")
        lab = torch.zeros(h, w, dtype=torch.uint8)
        lab[: h // 2] = 2
        lab[0] = 255
        valid += int((lab != 255).sum())
        common.save_label_png(lab.numpy(), root / "SegmentationClass" / f"im{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("im0\nim1\n")
    probe = le.LinearProbe(common.SegModel("resnet18", 32), "decoder", 3)
    samples = common.list_samples(root, "val", labels=True)
    ev = common.evaluate_segmentation(probe, samples, 3, common.Reader(32, "bicubic", 2, 0, torch.device("cpu"),
                                                                       "none"), keep=2)
    assert ev["conf"].shape == (3, 3) and int(ev["conf"].sum()) == valid
    assert [tuple(p.shape) for _, _, p in ev["shown"]] == [(37, 53), (61, 29)]


def test_end_to_end_predict_and_resume(synth_root, tiny_root, pretrain_ck, tmp_path, capsys):
    out = tmp_path / "lin"
    own = tmp_path / "photos"
    own.mkdir()
    for name in ("val_0000.jpg", "val_0001.jpg"):
        shutil.copy(synth_root / "JPEGImages" / name, own / name)
    argv = ["--data-root", str(tiny_root), "--train-split", "train", "--checkpoint", str(pretrain_ck),
            "--size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out", str(out),
            "--n-figures", "3"]
    res = le.main(argv)
    printed = capsys.readouterr().out
    assert "sanity check passed" in printed and "mIoU" in printed
    saved = json.loads((out / "linear_eval.json").read_text())
    assert saved["miou"] == pytest.approx(res["miou"]) and set(saved["per_class_iou"]) == set(synthetic.CLASSES)
    assert saved["channels"] == 256 and len(saved["history"]) == 1
    assert (out / "linear_val.png").stat().st_size > 1000
    # a finished run, resumed with --predict: no training, the stored score, and the user's images segmented
    res2 = le.main(argv + ["--resume", "--predict", str(own)])
    printed = capsys.readouterr().out
    assert "resumed" in printed and "loss" not in printed and res2["miou"] == res["miou"]
    for stem in ("val_0000", "val_0001"):
        pred = common.read_mask(out / "predict" / f"{stem}.png")
        assert pred.shape == (64, 64) and int(pred.max()) < 5
        assert (out / "predict" / f"{stem}_overlay.png").is_file()


def test_backbone_features_baseline(tiny_root, tmp_path):
    res = le.main(["--data-root", str(tiny_root), "--train-split", "train", "--checkpoint", "random", "--arch",
                   "resnet18", "--features", "backbone", "--size", "32", "--epochs", "1", "--workers", "0",
                   "--out", str(tmp_path / "bb"), "--n-figures", "0"])
    assert res["channels"] == 512 and 0 <= res["miou"] <= 100


def test_bad_input_is_one_line(synth_root, pretrain_ck, tmp_path, capsys):
    base = ["--data-root", str(synth_root), "--train-split", "train", "--size", "32", "--workers", "0",
            "--out", str(tmp_path / "o")]
    one_line_error(le.main, base + ["--checkpoint", str(pretrain_ck), "--arch", "resnet50"], capsys,
                   "holds a resnet18 model but --arch says resnet50")
    wrong = tmp_path / "r34.pth"  # weights of another architecture than the args say
    common.save_checkpoint(wrong, "pretrain", model=common.SegModel("resnet34", 32).state_dict(),
                           args={"arch": "resnet18", "dim": 32})
    one_line_error(le.main, base + ["--checkpoint", str(wrong)], capsys, "do not fit")
    other = tmp_path / "linear.pth"  # a checkpoint of another kind
    common.save_checkpoint(other, "linear", model={}, args={})
    one_line_error(le.main, base + ["--checkpoint", str(other)], capsys, "'linear'")
    one_line_error(le.main, base + ["--checkpoint", str(tmp_path / "missing.pth")], capsys,
                   "missing.pth: file not found")
    (tmp_path / "random.bin").write_bytes(b"\x00\x01 not a checkpoint")
    one_line_error(le.main, base + ["--checkpoint", str(tmp_path / "random.bin")], capsys,
                   "random.bin: not a PyTorch checkpoint")
    nolab = tmp_path / "nolab"
    shutil.copytree(synth_root / "JPEGImages", nolab / "JPEGImages")
    shutil.copytree(synth_root / "ImageSets", nolab / "ImageSets")
    one_line_error(le.main, ["--data-root", str(nolab), "--checkpoint", "random", "--out", str(tmp_path / "o2")],
                   capsys, "has no label")
    assert not (tmp_path / "o2").exists()  # nothing written before the inputs are known to be good


def test_resume_after_a_kill_is_exact_and_divergence_keeps_the_last_good_classifier(tiny_root, pretrain_ck,
                                                                                  tmp_path, monkeypatch, capsys):
    argv = ["--data-root", str(tiny_root), "--checkpoint", str(pretrain_ck), "--size", "32", "--epochs", "2",
            "--batch-size", "4", "--workers", "0", "--lr", "0.01", "--n-figures", "0"]
    whole = le.main(argv + ["--out", str(tmp_path / "a")])
    with kill_after_first_checkpoint(monkeypatch):
        le.main(argv + ["--out", str(tmp_path / "b")])
    resumed = le.main(argv + ["--out", str(tmp_path / "b"), "--resume"])
    assert resumed["miou"] == whole["miou"] and resumed["confusion"] == whole["confusion"]
    one_line_error(le.main, argv + ["--out", str(tmp_path / "b")], capsys, "holds a run already")
    # lr 1e12: the guard stops the run, and the classifier it keeps is finite
    one_line_error(le.main, argv + ["--out", str(tmp_path / "c"), "--lr", "1e12"], capsys, "training diverged",
                   "--lr 1e+12")
    if (tmp_path / "c" / "linear.pth").exists():
        ck = common.load_checkpoint(tmp_path / "c" / "linear.pth", kind="linear")
        assert all(torch.isfinite(t).all() for t in ck["model"].values())
