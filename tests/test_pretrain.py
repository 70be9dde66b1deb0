import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pretrain
from common import SegModel, UserError, list_samples, load_backbone_weights, load_checkpoint
from conftest import ROOT


def naive_loss(q, k, s_q, s_k, queue, T, weighting):
    """Algorithm 1 pixel by pixel, in float64."""
    q, k, queue = q.double(), k.double(), queue.double()
    N = q.shape[0]
    protos = []
    for n in range(N):
        acc = torch.zeros(q.shape[1], dtype=torch.float64)
        for y, x in zip(*torch.nonzero(s_k[n], as_tuple=True)):
            acc += k[n, :, y, x]
        protos.append(acc / acc.norm())
    protos = torch.stack(protos)
    losses, objs = [], []
    for n in range(N):
        for y, x in zip(*torch.nonzero(s_q[n], as_tuple=True)):
            v = q[n, :, y, x]
            logits = torch.cat([protos @ v, queue.T @ v]) / T
            losses.append(-logits[n] + torch.logsumexp(logits, 0))
            objs.append(n)
    losses, objs = torch.stack(losses), torch.tensor(objs)
    if weighting == "none":
        return losses.mean(), protos
    share = torch.bincount(objs, minlength=N).double() / len(objs)
    w = torch.tensor([1 / math.log(1.02 + share[o]) for o in objs], dtype=torch.float64)
    return (w * losses).sum() / w.sum(), protos


@pytest.mark.parametrize("weighting", ["enet", "none"])
def test_loss_equals_naive_loop(weighting):
    g = torch.Generator().manual_seed(0)
    N, D, H, W, K = 3, 8, 5, 6, 7
    q = F.normalize(torch.randn(N, D, H, W, generator=g), dim=1)
    k = F.normalize(torch.randn(N, D, H, W, generator=g), dim=1)
    s_q = torch.rand(N, H, W, generator=g) < torch.tensor([0.2, 0.5, 0.8]).view(N, 1, 1)  # unequal object sizes
    s_k = torch.rand(N, H, W, generator=g) < 0.5
    s_q[:, 0, 0] = s_k[:, 0, 0] = True
    queue = F.normalize(torch.randn(D, K, generator=g), dim=0)
    loss, p_k = pretrain.maskcontrast_loss(q, k, s_q, s_k, queue, 0.5, weighting)
    ref, protos = naive_loss(q, k, s_q, s_k, queue, 0.5, weighting)
    assert torch.allclose(loss.double(), ref, atol=1e-5), (loss, ref)
    assert torch.allclose(p_k.double(), protos, atol=1e-6)  # prototypes are the normalised means of the key mask
    assert torch.allclose(p_k.norm(dim=1), torch.ones(N), atol=1e-6)


def test_enet_weighting_changes_the_loss():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(2, 4, 6, 6, generator=g), dim=1)
    s = torch.zeros(2, 6, 6, dtype=torch.bool)
    s[0, :5], s[1, 0, :2] = True, True  # a big and a tiny object
    queue = F.normalize(torch.randn(4, 2, generator=g), dim=0)
    a, _ = pretrain.maskcontrast_loss(q, q, s, s, queue, 0.5, "enet")
    b, _ = pretrain.maskcontrast_loss(q, q, s, s, queue, 0.5, "none")
    assert not torch.isclose(a, b)


def test_balanced_bce_matches_definition():
    logits, t = torch.randn(2, 4, 4), torch.rand(2, 4, 4) > 0.7
    bce = F.binary_cross_entropy_with_logits(logits, t.float(), reduction="none")
    w = (~t).sum() / t.numel()
    want = (w * bce[t].sum() + (1 - w) * bce[~t].sum()) / t.numel()
    assert torch.isclose(pretrain.saliency_loss(logits, t), want)
    assert torch.isclose(pretrain.saliency_loss(logits, t, balanced=False), bce.mean())


def tiny_pair(queue_size=4, momentum=0.9):
    torch.manual_seed(0)
    return pretrain.MaskContrast(SegModel("resnet18", 8), queue_size=queue_size, momentum=momentum)


def test_key_network_gets_no_gradient_and_moves_by_momentum():
    m = tiny_pair()
    m.train()
    with torch.no_grad():  # make the two networks differ, so the momentum rule is visible
        for p in m.encoder_q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    q0 = [p.detach().clone() for p in m.encoder_q.parameters()]
    k0 = [p.detach().clone() for p in m.encoder_k.parameters()]
    x = torch.randn(2, 3, 32, 32)
    s = torch.zeros(2, 32, 32, dtype=torch.bool)
    s[:, 8:24, 8:24] = True
    loss, _ = m(x, s, x.flip(-1), s.flip(-1))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.encoder_k.parameters())
    assert all(p.grad is not None for p in m.encoder_q.parameters())
    for a, b, kk in zip(q0, k0, m.encoder_k.parameters()):
        assert torch.allclose(kk, 0.9 * b + 0.1 * a, atol=1e-7)


def test_queue_is_fifo():
    m = tiny_pair(queue_size=6)
    batches = [F.normalize(torch.randn(2, 8), dim=1) for _ in range(4)]
    for i, b in enumerate(batches[:3]):
        m.enqueue(b)
        assert int(m.queue_ptr) == (2 * (i + 1)) % 6
    assert torch.equal(m.queue.T, torch.cat(batches[:3]))
    m.enqueue(batches[3])  # the oldest batch goes first
    assert torch.equal(m.queue.T, torch.cat([batches[3], batches[1], batches[2]]))


def test_area_constraint_holds_for_every_pair(synth_root):
    samples = list_samples(synth_root, "train", saliency="oracle")[:24]
    ds = pretrain.ViewPairs(samples, 32, min_area=0.1, max_area=0.6)
    for i in range(len(ds)):
        xq, mq, xk, mk = ds[i]
        assert xq.shape == xk.shape == (3, 32, 32) and mq.shape == mk.shape == (32, 32)
        for m in (mq, mk):
            assert 0.1 < m.float().mean() < 0.6


def test_impossible_area_constraint_is_an_error_not_a_hang(synth_root):
    ds = pretrain.ViewPairs(list_samples(synth_root, "train", saliency="oracle")[:4], 32, min_area=0.999,
                            max_area=1.0, max_images=3)
    with pytest.raises(UserError, match="no view pair"):
        ds[0]


def args_for(root, out, *extra):
    return ["--data-root", str(root), "--saliency", "oracle", "--arch", "resnet18", "--dim", "8", "--size", "32",
            "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--lr", "0.05", "--momentum", "0.9",
            "--out", str(out), *extra]


def test_resume_reproduces_an_uninterrupted_run(synth_root, tmp_path):
    pretrain.main(args_for(synth_root, tmp_path / "a", "--epochs", "2"))
    pretrain.main(args_for(synth_root, tmp_path / "b", "--epochs", "1"))
    pretrain.main(args_for(synth_root, tmp_path / "b", "--epochs", "2", "--resume"))
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.pth"), load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    for key in ("model", "key_model"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), name
    assert torch.equal(a["queue"], b["queue"]) and a["step"] == b["step"] == 12
    assert (tmp_path / "a" / "results.json").exists() and (tmp_path / "a" / "views.png").exists()


def test_training_steps_lower_the_loss(synth_root):
    """A few SGD steps on one batch of synthetic views: both losses must fall (gradients reach what they should)."""
    torch.manual_seed(0)
    ds = pretrain.ViewPairs(list_samples(synth_root, "train", saliency="oracle")[:8], 32)
    xq, sq, xk, sk = (torch.stack(t) for t in zip(*[ds[i] for i in range(8)]))
    model = pretrain.MaskContrast(SegModel("resnet18", 8), queue_size=0, momentum=0.9)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    hist = []
    for _ in range(12):
        loss, parts = model(xq, sq, xk, sk)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append([parts["contrast"].item(), parts["saliency"].item()])
    first, last = torch.tensor(hist[0]), torch.tensor(hist[-3:]).mean(0)
    assert (last < first - torch.tensor([0.3, 0.03])).all(), hist


def run_cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, **kw)


def test_torchrun_two_processes_on_cpu(synth_root, tmp_path):
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", "pretrain.py",
                *args_for(synth_root, tmp_path, "--epochs", "1", "--device", "cpu"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ck["step"] == 6  # 48 images / global batch 8, each process taking 4 of every batch


def copy_root(src, dst, n=16):
    """A writable copy of the first n train images with their oracle masks."""
    ids = (src / "ImageSets/Segmentation/train.txt").read_text().split()[:n]
    for d in ("JPEGImages", "saliency_oracle", "ImageSets/Segmentation"):
        (dst / d).mkdir(parents=True)
    for i in ids:
        shutil.copy(src / "JPEGImages" / f"{i}.jpg", dst / "JPEGImages")
        shutil.copy(src / "saliency_oracle" / f"{i}.png", dst / "saliency_oracle")
    (dst / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids))
    return dst, ids


def test_bad_inputs_name_the_file(synth_root, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        pretrain.main(args_for(tmp_path / "nowhere", tmp_path / "o"))
    root, ids = copy_root(synth_root, tmp_path / "r")
    (root / "saliency_oracle" / f"{ids[0]}.png").unlink()
    with pytest.raises(UserError, match=f"{ids[0]}.jpg: no saliency mask"):
        pretrain.main(args_for(root, tmp_path / "o"))
    (root / "saliency_oracle" / "dropped.txt").write_text(ids[0] + "\n")  # mine_masks.py dropped it: fine
    samples = pretrain.pretrain_samples([root], "train", "oracle")
    assert len(samples) == len(ids) - 1
    Image.new("L", (10, 10)).save(root / "saliency_oracle" / f"{ids[1]}.png")
    with pytest.raises(UserError, match=f"{ids[1]}.png: mask is \\(10, 10\\)"):
        pretrain.main(args_for(root, tmp_path / "o"))
    Image.new("L", (64, 64)).save(root / "saliency_oracle" / f"{ids[1]}.png")  # empty: skipped, not an error
    assert len(pretrain.pretrain_samples([root], "train", "oracle")) == len(ids) - 2
    (root / "JPEGImages" / f"{ids[2]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=f"{ids[2]}.jpg: cannot read image"):
        pretrain.main(args_for(root, tmp_path / "o"))


def test_corrupt_jpeg_in_a_worker_is_one_line(synth_root, tmp_path):
    root, ids = copy_root(synth_root, tmp_path / "r")
    for i in ids:  # header intact, pixel data cut: only decoding in the DataLoader worker notices
        p = root / "JPEGImages" / f"{i}.jpg"
        p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
    r = run_cli("pretrain.py", *args_for(root, tmp_path / "o", "--workers", "1", "--epochs", "1"), timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and ".jpg: cannot decode image" in lines[-1]
    assert "Traceback" not in r.stderr


def test_wrong_checkpoints_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not fit resnet18"):
        torch.save(SegModel("resnet50", 8).backbone.state_dict(), tmp_path / "r50.pth")
        load_backbone_weights(SegModel("resnet18", 8).backbone, tmp_path / "r50.pth", "resnet18")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pth: not a readable"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pth")


def test_moco_checkpoint_loads(tmp_path):
    src = SegModel("resnet18", 8).backbone.state_dict()
    moco = {"state_dict": {**{f"module.encoder_q.{k}": v for k, v in src.items()},
                           "module.encoder_q.fc.0.weight": torch.zeros(2, 2),
                           **{f"module.encoder_k.{k}": v for k, v in src.items()}}}
    torch.save(moco, tmp_path / "moco.pth")
    net = SegModel("resnet18", 8).backbone
    load_backbone_weights(net, tmp_path / "moco.pth", "resnet18")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in src.items())
