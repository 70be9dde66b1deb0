"""The five stages in sequence with their default flags (only sizes given), as tools/gpu_check.py --cpu runs them, and
the label checks every evaluation script makes before it trains."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

import common
import finetune
import kmeans_eval
import linear_eval
from conftest import ROOT, SCRIPTS, help_text, one_line_error


def test_gpu_check_cpu_path_runs_the_default_sequence(tmp_path, monkeypatch, capsys):
    """tools/gpu_check.py --cpu, in this process (a fresh interpreter would import torch again)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check
    monkeypatch.chdir(tmp_path)
    ret = gpu_check.main(["--cpu", "--out", str(tmp_path / "g")])
    printed = capsys.readouterr().out
    assert not ret.get("failed"), printed[-3000:]
    assert (tmp_path / "g" / "bench_eager" / "profile.txt").read_text().count("\n") > 10  # the profiler's table
    res = json.loads((tmp_path / "g" / "gpu_check.json").read_text())
    runs = tmp_path / "g" / "runs"
    # the default sequence: mine_masks → saliency_unsup, which pretrain reads; the evaluations next to the checkpoint
    assert (tmp_path / "g" / "data" / "saliency_unsup" / "summary.json").is_file()
    for f in ("pretrain/checkpoint.pth", "pretrain/linear_decoder/linear_eval.json",
              "pretrain/kmeans_head/kmeans_eval.json", "finetune/results.json"):
        assert (runs / f).is_file(), f
    assert set(json.loads((runs / "finetune/results.json").read_text())["table"]["maskcontrast"]) == \
        {"0.01", "0.02", "0.05", "0.125", "1"}
    assert res["pretrain_eager"]["images_per_s"] > 0 and res["pretrain_eager"]["gflop_per_image"] > 0
    assert res["kmeans_21_seconds"] > 0 and res["saliency_predict_img_per_s"] > 0 and 0 < res["mined_max_f"] <= 1
    assert "measure" in printed and "pretrain step, bf16" in printed


def bad_label_root(tmp_path, bad):
    """A VOC-layout root with 4 train and 2 val images whose val labels are `bad` (uint8 arrays or PIL images)."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / d).mkdir(parents=True)
    ids = {"train": [f"t{i}" for i in range(4)], "val": [f"v{i}" for i in range(2)]}
    for split, names in ids.items():
        for k, i in enumerate(names):
            Image.new("RGB", (16, 16), (40 * k, 90, 160)).save(tmp_path / "JPEGImages" / f"{i}.jpg")
            y = np.zeros((16, 16), np.uint8)
            y[4:12, 4:12] = 1 + k % 2
            lab = bad if split == "val" else y
            if isinstance(lab, Image.Image):
                lab.save(tmp_path / "SegmentationClass" / f"{i}.png")
            else:
                common.save_label_png(lab, tmp_path / "SegmentationClass" / f"{i}.png")
        (tmp_path / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names))
    return tmp_path


LABELLED = {"linear_eval": linear_eval.main, "kmeans_eval": kmeans_eval.main, "finetune": finetune.main}
BAD = {"all ignore": (np.full((16, 16), 255, np.uint8), "every label pixel is 255"),
       "RGB": (Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)),
               "a RGB label, not class indices")}


@pytest.mark.parametrize("script", LABELLED)
@pytest.mark.parametrize("case", BAD)
def test_bad_labels_stop_every_evaluation_before_it_trains(script, case, tmp_path, capsys):
    bad, message = BAD[case]
    root = bad_label_root(tmp_path / "r", bad)
    one_line_error(LABELLED[script], ["--data-root", str(root), "--checkpoint", "random", "--arch", "resnet18",
                                       "--workers", "0", "--out", str(tmp_path / "o")], capsys, message)
    assert not (tmp_path / "o").exists()


def test_one_meaning_per_flag(capsys):
    """--momentum is SGD's in every script that has it; the key network's EMA is --key-momentum; no bare
    --threshold: each threshold says what it thresholds, and out-of-range values are refused."""
    helps = {name: help_text(name) for name in SCRIPTS}
    for name, text in helps.items():
        assert "--threshold " not in text, name
        if "--momentum MOMENTUM" in text:
            assert "--momentum MOMENTUM SGD momentum" in text, name
    assert "--key-momentum KEY_MOMENTUM m: the key network's EMA" in helps["pretrain"]
    import pretrain
    args = pretrain.get_args(["--data-root", "x", "--key-momentum", "0.99", "--momentum", "0.5"])
    assert (args.key_momentum, args.momentum) == (0.99, 0.5)
    ck = ["--checkpoint", "random"]
    for name, bad in [("pretrain", ["--key-momentum", "1.5"]), ("mine_masks", ["--mask-threshold", "2"]),
                      ("kmeans_eval", [*ck, "--logit-threshold", "nan"]), ("linear_eval", [*ck, "--momentum", "-1"])]:
        with pytest.raises(SystemExit):
            __import__(name).get_args(["--data-root", "x", *bad])
        err = capsys.readouterr().err
        assert f"argument {bad[-2]}: " in err and ("must be" in err or "not a finite" in err), err
