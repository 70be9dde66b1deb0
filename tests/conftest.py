import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A tiny synthetic VOC-layout dataset (64×64 images), shared read-only by the tests of a session."""
    from common import make_synthetic_voc
    return make_synthetic_voc(tmp_path_factory.mktemp("synth"), n_train=48, n_val=16, size=64, seed=0)
