"""No stale result: every evaluation records which network it scored (common.fingerprint) and, when the checkpoint
file behind a stored result changed, recomputes (K-Means prototypes) or refuses in one line naming both networks
(a linear classifier, a fine-tuning run) — never prints the old network's number."""
import json
import shutil

import torch

import common
import finetune
import kmeans_eval as ke
import linear_eval as le
from conftest import kill_after_first_checkpoint, one_line_error


def retrain(path):
    """The same file, other weights: as if pretrain.py had trained on into the same folder."""
    ck = torch.load(path, weights_only=True)
    ck["model"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in ck["model"].items()}
    common.save_checkpoint(path, ck.pop("kind"), **ck)


def test_fingerprint_is_the_weights():
    a = common.SegModel("resnet18").state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert common.fingerprint(a) == common.fingerprint(b)
    b["head.bias"][0] += 1e-6
    assert common.fingerprint(a) != common.fingerprint(b)


def test_linear_eval_refuses_a_changed_checkpoint(tiny_root, pretrain_ck, tmp_path, capsys):
    ck = tmp_path / "checkpoint.pth"
    shutil.copy(pretrain_ck, ck)
    argv = ["--data-root", str(tiny_root), "--train-split", "train", "--checkpoint", str(ck), "--size", "32",
            "--epochs", "1", "--workers", "0", "--n-figures", "0", "--out", str(tmp_path / "lc")]
    res = le.main(argv)
    assert res["weights"] == common.fingerprint(common.load_checkpoint(ck)["model"])  # the frozen network
    assert le.main(argv + ["--resume"])["miou"] == res["miou"]  # the same network: the stored score
    old = res["weights"]
    retrain(ck)
    new = common.fingerprint(common.model_from_checkpoint(common.load_checkpoint(ck)).state_dict())
    one_line_error(le.main, argv + ["--resume"], capsys, f"linear.pth: was made with weights {old}, not {new}")


def test_kmeans_eval_recomputes_prototypes_of_a_changed_checkpoint(tiny_root, pretrain_ck, tmp_path, capsys):
    ck = tmp_path / "checkpoint.pth"
    shutil.copy(pretrain_ck, ck)
    argv = ["--data-root", str(tiny_root), "--checkpoint", str(ck), "--size", "32", "--workers", "0", "--n-seeds",
            "1", "--restarts", "1", "--retrieval-split", "none", "--n-figures", "0", "--out", str(tmp_path / "km")]
    first = ke.main(argv)
    retrain(ck)
    again = ke.main(argv + ["--resume"])
    printed = capsys.readouterr().out
    assert "computing them again" in printed and "prototypes reused" not in printed
    assert again["weights"] != first["weights"]
    stored = torch.load(tmp_path / "km" / "prototypes.pt", weights_only=True)
    assert stored["config"]["weights"] == again["weights"]
    assert json.loads((tmp_path / "km" / "kmeans_eval.json").read_text())["weights"] == again["weights"]


def test_finetune_refuses_finished_and_unfinished_runs_of_a_changed_checkpoint(synth_root, pretrain_ck, tmp_path,
                                                                             monkeypatch, capsys):
    ck = tmp_path / "checkpoint.pth"
    shutil.copy(pretrain_ck, ck)
    argv = ["--data-root", str(synth_root), "--arch", "resnet18", "--size", "32", "--classes", "5", "--batch-size",
            "2", "--workers", "0", "--checkpoint", str(ck), "--splits", "1", "--fraction", "1.0", "--iters", "2",
            "--save-every", "1", "--n-figures", "0"]
    done = argv + ["--out", str(tmp_path / "done")]
    finetune.main(done)
    result = json.loads((tmp_path / "done" / "maskcontrast" / "1_0" / "result.json").read_text())
    assert len(result["init_weights"]) == 16
    finetune.main(done + ["--resume"])  # the same network: skipped, its result stands
    assert "finished earlier, skipped" in capsys.readouterr().out
    with kill_after_first_checkpoint(monkeypatch):  # an unfinished run of the old network
        finetune.main(argv + ["--out", str(tmp_path / "half")])
    retrain(ck)
    one_line_error(finetune.main, done + ["--resume"], capsys, "result.json: was fine-tuned from network "
                   f"{result['init_weights']}", "now gives network")
    one_line_error(finetune.main, argv + ["--out", str(tmp_path / "half"), "--resume"], capsys,
                   f"checkpoint.pth: was made with init_weights {result['init_weights']}, not ")
