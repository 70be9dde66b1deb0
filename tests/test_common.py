import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import common
from common import UserError


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_model_has_output_stride_8_and_two_heads(arch):
    m = common.SegModel(arch, dim=32).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert m.features(x).shape == (1, 256, 8, 6)
        emb, sal = m(x)
        small, _ = m(x, upsample=False)
    assert emb.shape == (1, 32, 64, 48) and sal.shape == (1, 64, 48) and small.shape == (1, 32, 8, 6)


def test_synthetic_data_is_not_solved_by_colour(synth_root):
    """Nearest class-mean colour of a pixel must not tell the class: hues are random; shape and texture are not."""
    samples = [s for split in ("train", "val") for s in common.list_samples(synth_root, split, labels=True)]
    pix, lab = [], []
    for s in samples:
        img, y = common.read_image(s.image), common.read_mask(s.label)
        fg = y > 0
        pix.append(img[:, fg].T.float())
        lab.append(y[fg].long())
    pix, lab = torch.cat(pix), torch.cat(lab)
    means = torch.stack([pix[lab == c].mean(0) for c in range(1, 5)])
    acc = ((torch.cdist(pix, means).argmin(1) + 1) == lab).float().mean()
    assert acc < 0.4, acc  # chance is 0.25
    assert set(lab.unique().tolist()) == {1, 2, 3, 4}


def test_synthetic_data_is_seeded(tmp_path):
    a = common.make_synthetic_voc(tmp_path / "a", n_train=3, n_val=1, size=32, seed=5)
    b = common.make_synthetic_voc(tmp_path / "b", n_train=3, n_val=1, size=32, seed=5)
    for sa, sb in zip(common.list_samples(a, "train", labels=True), common.list_samples(b, "train", labels=True)):
        assert torch.equal(common.read_mask(sa.label), common.read_mask(sb.label))
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
    counts = common.assemble_voc_trainaug(voc, sbd)
    assert counts == {"trainaug": 4, "val": 2}
    assert (voc / "ImageSets/Segmentation/trainaug.txt").read_text().split() == ids[:4]
    samples = common.list_samples(voc, "trainaug", labels=True)
    labels = {s.id: common.read_mask(s.label) for s in samples}
    assert labels[ids[1]].unique().tolist() == [1]  # VOC's own label wins over SBD's
    assert labels[ids[2]].unique().tolist() == [7] and labels[ids[2]].shape == (10, 20)
    assert not (voc / "SegmentationClassAug" / f"{ids[4]}.png").exists()


def test_trainaug_assembly_refuses_a_mismatched_label(tmp_path):
    voc, sbd, ids = fake_voc_and_sbd(tmp_path)
    scipy.io.savemat(sbd / "cls" / f"{ids[3]}.mat", {"GTcls": {"Segmentation": np.zeros((5, 5), np.uint8)}})
    with pytest.raises(UserError, match=f"{ids[3]}.mat: label is"):
        common.assemble_voc_trainaug(voc, sbd)


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(common.torchvision.datasets, "VOCSegmentation", offline)
    with pytest.raises(UserError, match="downloading PASCAL VOC 2012 / SBD .* failed"):
        common.download_voc(tmp_path)


def test_download_flag_points_data_root_at_the_voc_folder(tmp_path, monkeypatch):
    import argparse
    monkeypatch.setattr(common, "download_voc", lambda root: root + "/VOCdevkit/VOC2012")
    single, several = argparse.Namespace(download=True, data_root="d"), argparse.Namespace(download=True,
                                                                                            data_root=["d", "x"])
    common.resolve_download(single)
    common.resolve_download(several)
    assert single.data_root == "d/VOCdevkit/VOC2012" and several.data_root == ["d/VOCdevkit/VOC2012", "x"]


@pytest.mark.parametrize("script", ["mine_masks", "pretrain", "linear_eval", "kmeans_eval", "finetune"])
def test_help_shows_every_default(script, monkeypatch):
    """Every flag that takes a value names its default in --help, and the docstring's commands keep their `\\`."""
    import argparse
    import importlib
    built = []

    def keep(self, *a, **k):  # the parser get_args builds, without parsing anything
        built.append(self)
        raise SystemExit

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep)
    with pytest.raises(SystemExit):
        importlib.import_module(script).get_args([])
    parser = built[0]
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and not action.required:
            line = parser._get_formatter()._format_action(action)
            assert "(default:" in line, f"{script} {action.option_strings[0]}: no default in --help"
    assert " \\\n" in parser.format_help()
