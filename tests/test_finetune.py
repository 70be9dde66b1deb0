"""finetune.py: labeled subsets, learning-rate groups, frozen BatchNorm, resume and a tiny end-to-end table."""
import json
import math

import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import finetune
from conftest import kill_after_first_checkpoint

FRACTIONS = [0.01, 0.02, 0.05, 0.125, 0.5, 1.0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, two threads made these tiny convolutions
    ~40x slower (threads waiting on each other), one keeps the module at a few seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bn_buffers(state):
    return {k: v.clone() for k, v in state.items() if "running_" in k or "num_batches_tracked" in k}


# ----------------------------------------------------------------------------------------------------------------------
# labeled subsets

@pytest.mark.parametrize("n", [48, 100, 1464])
def test_subsets_sizes_nesting_disjointness(tmp_path, n):
    ids = [f"im{i:05d}" for i in range(n)]
    sub = finetune.labeled_subsets(ids, FRACTIONS, 3, seed=0, folder=tmp_path)
    for (f, s), chosen in sub.items():
        assert len(chosen) == max(1, math.floor(f * n + 0.5)) >= 1  # rounded half up, never empty
        assert len(set(chosen)) == len(chosen) and set(chosen) <= set(ids)
        # what was returned is what was written
        assert (tmp_path / f"{f:g}_{s}.txt").read_text().split() == chosen
    for s in range(3):  # nested: a larger fraction only adds labels
        for small, large in zip(FRACTIONS, FRACTIONS[1:]):
            assert set(sub[(small, s)]) <= set(sub[(large, s)])
    for f in FRACTIONS:  # disjoint across splits wherever the size allows it
        sets = [set(sub[(f, s)]) for s in range(3)]
        if len(sub[(f, 0)]) <= n // 3:
            assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), f
    assert sub[(1.0, 0)] != sub[(1.0, 1)] and set(sub[(1.0, 0)]) == set(ids)  # same images, another order


def test_subsets_reproducible_and_reused(tmp_path):
    ids = [f"im{i:04d}" for i in range(200)]
    a = finetune.labeled_subsets(ids, [0.05], 3, seed=0, folder=tmp_path / "a")
    b = finetune.labeled_subsets(ids, [0.05], 3, seed=0, folder=tmp_path / "b")
    c = finetune.labeled_subsets(ids, [0.05], 3, seed=1, folder=tmp_path / "c")
    assert a == b and a != c
    # a list already on disk wins over the seed (shared splits); a list naming foreign ids is refused
    (tmp_path / "a" / "0.05_1.txt").write_text("im0001\nim0002\n")
    assert finetune.labeled_subsets(ids, [0.05], 3, seed=0, folder=tmp_path / "a")[(0.05, 1)] == ["im0001", "im0002"]
    (tmp_path / "a" / "0.05_2.txt").write_text("im0001\nval_9999\n")
    with pytest.raises(common.UserError, match="val_9999"):
        finetune.labeled_subsets(ids, [0.05], 3, seed=0, folder=tmp_path / "a")
    (tmp_path / "a" / "0.05_2.txt").write_text("im0001\nim0001\n")  # one image twice would weigh it double
    with pytest.raises(common.UserError, match="0.05_2.txt: lists an id twice"):
        finetune.labeled_subsets(ids, [0.05], 3, seed=0, folder=tmp_path / "a")


# ----------------------------------------------------------------------------------------------------------------------
# recipe: learning-rate groups and frozen BatchNorm

def test_recipe_and_lr_groups(pretrain_ck):
    mc, rnd = finetune.resolve_inits([str(pretrain_ck), "random"], None, "resnet18")
    assert (mc.name, mc.kind, rnd.name) == ("maskcontrast", "maskcontrast", "random")

    def rec(init, fraction, which="maskcontrast"):  # the paper's lrs
        r = finetune.recipe(init, fraction, 0.004, 0.001, 0.1, 0.02, which)
        return r.lr, r.head_lr, r.freeze_bn

    assert rec(mc, 0.01) == rec(mc, 0.02) == (0.001, 0.1, True)
    assert rec(mc, 0.05) == (0.004, 0.004, False)
    assert rec(rnd, 0.01) == (0.004, 0.004, False)  # the baseline keeps 0.004 everywhere
    assert rec(rnd, 0.01, "all") == (0.001, 0.1, True) and rec(mc, 0.01, "none") == (0.004, 0.004, False)

    model, _ = finetune.build_model(mc, "resnet18", 5)
    opt = torch.optim.SGD(finetune.param_groups(model, 0.001, 0.1), lr=0.001)
    by_param = {id(q): g["lr"] for g in opt.param_groups for q in g["params"]}
    assert len(by_param) == sum(len(g["params"]) for g in opt.param_groups)  # no parameter in two groups
    for name, q in model.named_parameters():
        assert by_param[id(q)] == (0.1 if name.startswith("head.") else 0.001), name
    assert {id(q) for q in model.parameters()} == set(by_param)


def test_frozen_bn_keeps_statistics():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))

    def step(freeze):
        model = common.SegModel("resnet18", 5, saliency_head=False)
        before, w0 = bn_buffers(model.state_dict()), model.backbone.bn1.weight.detach().clone()
        finetune.train_mode(model, freeze)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        nn.functional.cross_entropy(model(x)[0], y).backward()
        opt.step()
        after = bn_buffers(model.state_dict())
        return model, [k for k in before if not torch.equal(before[k], after[k])], w0

    model, changed, w0 = step(True)
    assert changed == []
    assert not torch.equal(model.backbone.bn1.weight, w0)  # affine weights still learn
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert any(m.training for m in model.modules() if isinstance(m, nn.Dropout))  # the rest is in training mode
    _, changed, _ = step(False)
    assert len(changed) > 10  # the same step in ordinary training mode moves them


# ----------------------------------------------------------------------------------------------------------------------
# end to end: the table, the figure, frozen BN in a real run, checkpoints, resume

def run(synth_root, out, *extra):
    return finetune.main(["--data-root", str(synth_root), "--arch", "resnet18", "--size", "32", "--classes", "5",
                          "--batch-size", "2", "--workers", "0", "--out", str(out), *extra])


def final_weights(out, name, tag):
    return common.load_checkpoint(out / name / tag / "checkpoint.pth", kind="finetune")["model"]


def test_end_to_end_table_figure_and_resume(tiny_root, pretrain_ck, tmp_path, capsys, monkeypatch):
    real_evaluate, modes = common.evaluate_segmentation, []

    def evaluate(predict, *a, **k):  # the fine-tuned network is scored in eval mode (no dropout, BatchNorm's stats)
        modes.append(predict.func.__self__.training)
        return real_evaluate(predict, *a, **k)

    monkeypatch.setattr(common, "evaluate_segmentation", evaluate)
    out = tmp_path / "ft"
    common_flags = ["--checkpoint", str(pretrain_ck), "random", "--splits", "1", "--iters", "2", "--n-figures", "3"]
    table = run(tiny_root, out, *common_flags, "--fraction", "0.02", "1.0")
    printed = capsys.readouterr().out
    assert "2% (1)" in printed and "100% (12)" in printed and "maskcontrast" in printed
    assert modes == [False] * 4
    assert set(table) == {"maskcontrast", "random"} and set(table["random"]) == {"0.02", "1"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"]["maskcontrast"]["0.02"]["n_labeled"] == [1]
    assert 0 <= saved["table"]["random"]["1"]["mean"] <= 100
    # Fig. 5: 3 rows of image | ground truth | maskcontrast | random, tiles of 160 px and 2 px padding
    with Image.open(out / "finetune_0.02.png") as im:
        assert im.size == (4 * 160 + 5 * 2, 3 * 160 + 4 * 2)

    # the low-data MaskContrast run kept the pretrained BatchNorm statistics; the 100 % run moved them
    pre = bn_buffers(common.load_checkpoint(pretrain_ck)["model"])
    low = common.load_checkpoint(out / "maskcontrast" / "0.02_0" / "checkpoint.pth", kind="finetune")
    full = common.load_checkpoint(out / "maskcontrast" / "1_0" / "checkpoint.pth", kind="finetune")
    assert (low["run"]["lr"], low["run"]["head_lr"], low["run"]["freeze_bn"]) == (0.001, 0.1, True)
    assert all(torch.equal(low["model"][k], v) for k, v in pre.items())
    assert not torch.equal(full["model"]["backbone.bn1.running_mean"], pre["backbone.bn1.running_mean"])
    # a finished run's checkpoint rebuilds as a 5-class SegModel without saliency head
    rebuilt = common.model_from_checkpoint(low)
    assert rebuilt.head.out_channels == 5 and rebuilt.saliency_head is None

    with pytest.raises(common.UserError, match="holds a run already"):  # a new run does not overwrite it
        run(tiny_root, out, *common_flags, "--fraction", "0.02")
    # --resume: the finished runs are skipped (results untouched), only the new fraction trains
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")}
    flags = [f for f in common_flags if f != str(pretrain_ck)]  # the random init alone
    run(tiny_root, out, *flags, "--fraction", "0.02", "0.05", "1.0", "--resume")
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 2
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert (out / "random" / "0.05_0" / "result.json").exists()
    assert set(json.loads((out / "results.json").read_text())["table"]["random"]) == {"0.02", "0.05", "1"}


def test_resume_continues_an_interrupted_run_exactly(tiny_root, tmp_path, capsys, monkeypatch):
    flags = ["--checkpoint", "random", "--splits", "1", "--fraction", "1.0", "--iters", "3", "--save-every", "1"]
    run(tiny_root, tmp_path / "whole", *flags)
    out = tmp_path / "ft"
    with kill_after_first_checkpoint(monkeypatch):
        run(tiny_root, out, *flags)
    ck = common.load_checkpoint(out / "random" / "1_0" / "checkpoint.pth")
    assert ck["step"] == 1 and "optimizer" in ck and not (out / "random" / "1_0" / "result.json").exists()
    run(tiny_root, out, *flags, "--resume")
    assert "checkpoint.pth at step 1\n" in capsys.readouterr().out
    assert json.loads((out / "random" / "1_0" / "result.json").read_text())["iters"] == 3
    a, b = final_weights(tmp_path / "whole", "random", "1_0"), final_weights(out, "random", "1_0")
    assert all(torch.equal(a[k], b[k]) for k in a)  # data order, augmentation and dropout came back


def test_too_few_classes_is_a_user_error(synth_root, tmp_path):
    with pytest.raises(common.UserError, match="--classes"):
        run(synth_root, tmp_path / "ft", "--classes", "3", "--iters", "1", "--checkpoint", "random")


def test_bad_inits_are_user_errors(pretrain_ck, tmp_path):
    with pytest.raises(common.UserError, match="missing.pth: file not found"):
        finetune.resolve_inits([str(tmp_path / "missing.pth")], None, "resnet18")
    with pytest.raises(common.UserError, match="--arch resnet18"):
        finetune.resolve_inits([str(pretrain_ck)], None, "resnet50")
    with pytest.raises(common.UserError, match="--names"):
        finetune.resolve_inits(["random", "random"], None, "resnet18")
    with pytest.raises(common.UserError, match="--names gives 1 names for 2 --checkpoint values"):
        finetune.resolve_inits(["random", "imagenet"], ["only_one"], "resnet18")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="junk.pth: not a PyTorch checkpoint"):
        finetune.resolve_inits([str(junk)], None, "resnet18")
