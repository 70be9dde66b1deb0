import contextlib
import functools
import importlib
import io
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
SHARED = ROOT.parent / "shared" / "data"
SCRIPTS = ("mine_masks", "pretrain", "linear_eval", "kmeans_eval", "finetune")  # the five stages

torch.set_num_threads(int(__import__("os").environ.get("TEST_THREADS", "1")))


@functools.cache
def help_text(script):
    """The script's --help as a user sees it, whitespace runs joined (the wrapping depends on the terminal)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(script).get_args(["--help"])
    return " ".join(out.getvalue().split())


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic VOC-layout dataset (64×64 images), shared read-only by the tests of a session."""
    from synthetic import make_synthetic_voc
    return make_synthetic_voc(tmp_path_factory.mktemp("synth"), n_train=48, n_val=16, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """12 train and 8 val images of 32×32: end-to-end runs of the evaluation scripts stay within seconds."""
    from synthetic import make_synthetic_voc
    return make_synthetic_voc(tmp_path_factory.mktemp("tiny"), n_train=12, n_val=8, size=32, seed=1)


@pytest.fixture(scope="session")
def pretrain_ck(tmp_path_factory):
    """A resnet18 'pretrain' checkpoint as pretrain.py writes it. Its BatchNorm statistics are not the defaults (so
    'kept' and 'never touched' differ) and its saliency head calls every pixel salient (the decoder ends in a ReLU)."""
    from common import SegModel, save_checkpoint
    torch.manual_seed(0)
    model = SegModel("resnet18", 32, saliency_head=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        model.saliency_head.weight.fill_(1.0)
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pth"
    save_checkpoint(path, "pretrain", model=model.state_dict(), args={"arch": "resnet18", "dim": 32})
    return path


class Killed(Exception):
    """What kill_after_first_checkpoint raises: the job "dies" right after writing its first checkpoint."""


@contextlib.contextmanager
def kill_after_first_checkpoint(monkeypatch):
    """Inside the block, the first common.save_checkpoint writes its file and then kills the run (raises Killed,
    which the block expects); after it, checkpoints are written normally again."""
    import common
    real_save = common.save_checkpoint

    def save_then_die(path, kind, **state):
        real_save(path, kind, **state)
        raise Killed

    monkeypatch.setattr(common, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        yield
    monkeypatch.setattr(common, "save_checkpoint", real_save)


def run_cli(main, argv, capsys):
    """Run a script's main() as its command line does; returns (exit code, stderr)."""
    from common import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    return e.value.code, capsys.readouterr().err


def one_line_error(main, argv, capsys, *expect):
    """main(argv) stops with exit 2 and one line on stderr (after any progress bar) that holds every string of
    `expect`, and no traceback."""
    code, err = run_cli(main, argv, capsys)
    errors = [line for line in err.replace("\r", "\n").split("\n") if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    for e in expect:
        assert e in errors[0], (e, errors[0])
    return errors[0]
