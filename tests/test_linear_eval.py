"""linear_eval.py: the frozen-network sanity check, scoring at the label's own size, end to end, bad input."""
import json
import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import common
import linear_eval as le
from conftest import run_cli


def _one_epoch(model, synth_root, frozen):
    args = le.get_args(["--data-root", str(synth_root), "--amp", "none"])
    samples = common.list_samples(synth_root, "train", labels=True)[:4]
    loader = DataLoader(common.SegDataset(samples, common.seg_train_transform(32)), batch_size=4)
    if frozen:
        common.freeze(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clf = torch.nn.Conv2d(256, 5, 1)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1)
    loss = le.train_one_epoch(model.features, clf, loader, opt, common.make_scaler(torch.device("cpu"), "none"),
                              args, torch.device("cpu"), 5, samples)
    return before, clf, loss


def test_sanity_check_fails_if_backbone_left_trainable(synth_root):
    torch.manual_seed(0)
    model = common.SegModel("resnet18", 32)
    w0 = torch.nn.Conv2d(256, 5, 1).weight.clone()
    before, clf, loss = _one_epoch(model, synth_root, frozen=True)
    le.check_frozen(model, before)  # frozen: passes
    assert loss > 0 and not torch.equal(clf.weight, w0)  # ...while the new layer did learn
    model = common.SegModel("resnet18", 32)  # left trainable (train mode): BatchNorm statistics drift
    before, _, _ = _one_epoch(model, synth_root, frozen=False)
    with pytest.raises(RuntimeError, match="sanity check failed"):
        le.check_frozen(model, before)
    common.freeze(model)  # a single touched weight is caught too
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
    args = le.get_args(["--data-root", str(root), "--size", "32", "--workers", "0", "--amp", "none"])
    model = common.freeze(common.SegModel("resnet18", 32))
    samples = common.list_samples(root, "val", labels=True)
    conf, shown = le.evaluate(model.features, torch.nn.Conv2d(256, 3, 1), samples, args, torch.device("cpu"), 3, 2,
                              keep=2)
    assert conf.shape == (3, 3) and int(conf.sum()) == valid
    assert [tuple(p.shape) for _, _, p in shown] == [(37, 53), (61, 29)]


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
    assert saved["miou"] == pytest.approx(res["miou"]) and set(saved["per_class_iou"]) == set(common.SYNTH_CLASSES)
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
    code, err = run_cli(le.main, base + ["--checkpoint", str(pretrain_ck), "--arch", "resnet50"], capsys)
    assert code == 2 and "resnet18" in err and len(err.strip().splitlines()) == 1
    wrong = tmp_path / "r34.pth"  # weights of another architecture than the args say
    common.save_checkpoint(wrong, kind="pretrain", model=common.SegModel("resnet34", 32).state_dict(),
                           args={"arch": "resnet18", "dim": 32}, saliency_head=True)
    code, err = run_cli(le.main, base + ["--checkpoint", str(wrong)], capsys)
    assert code == 2 and "do not fit" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "linear.pth"  # a checkpoint of another kind
    common.save_checkpoint(other, kind="linear", model={}, args={})
    code, err = run_cli(le.main, base + ["--checkpoint", str(other)], capsys)
    assert code == 2 and "'linear'" in err and len(err.strip().splitlines()) == 1
    code, err = run_cli(le.main, base + ["--backbone-init", str(tmp_path / "missing.pth"), "--arch", "resnet18"],
                        capsys)
    assert code == 2 and "missing.pth" in err and len(err.strip().splitlines()) == 1
    nolab = tmp_path / "nolab"
    shutil.copytree(synth_root / "JPEGImages", nolab / "JPEGImages")
    shutil.copytree(synth_root / "ImageSets", nolab / "ImageSets")
    code, err = run_cli(le.main, ["--data-root", str(nolab), "--train-split", "train", "--out", str(tmp_path / "o")],
                        capsys)
    assert code == 2 and "no label" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
