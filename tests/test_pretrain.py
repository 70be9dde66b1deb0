"""pretrain.py: Algorithm 1's loss against a per-pixel loop, the momentum key network and queue, the view pairs, exact
resume, worker-count independence, DDP, the frozen layers, divergence and bad input."""
import gc
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import pretrain
from common import SegModel, UserError, list_samples, load_backbone_weights, load_checkpoint
from conftest import one_line_error


def naive_loss(q, k, s_q, s_k, queue, T, weighting):
    """Algorithm 1 over objects, pixel by pixel, in float64: a prototype per (image, object id) present in the key
    view; each query pixel of such an object targets it against every other prototype and the queue."""
    q, k, queue = q.double(), k.double(), queue.double()
    s_q, s_k = s_q.long(), s_k.long()
    N = q.shape[0]
    protos, index = [], {}
    for n in range(N):
        for j in sorted(set(s_k[n].flatten().tolist()) - {0}):
            acc = torch.zeros(q.shape[1], dtype=torch.float64)
            for y, x in zip(*torch.nonzero(s_k[n] == j, as_tuple=True)):
                acc += k[n, :, y, x]
            index[(n, j)] = len(protos)
            protos.append(acc / acc.norm())
    protos = torch.stack(protos)
    losses, objs = [], []
    for n in range(N):
        for y, x in zip(*torch.nonzero(s_q[n], as_tuple=True)):
            target = index.get((n, int(s_q[n, y, x])))
            if target is None:  # its object is not in the key view
                continue
            v = q[n, :, y, x]
            logits = torch.cat([protos @ v, queue.T @ v]) / T
            losses.append(-logits[target] + torch.logsumexp(logits, 0))
            objs.append(target)
    losses, objs = torch.stack(losses), torch.tensor(objs)
    if weighting == "none":
        return losses.mean(), protos
    share = torch.bincount(objs, minlength=len(protos)).double() / len(objs)
    w = torch.tensor([1 / math.log(1.02 + share[o]) for o in objs], dtype=torch.float64)
    return (w * losses).sum() / w.sum(), protos


def loss_inputs(seed, N=3, D=8, H=5, W=6, K=7):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(N, D, H, W, generator=g), dim=1)
    k = F.normalize(torch.randn(N, D, H, W, generator=g), dim=1)
    queue = F.normalize(torch.randn(D, K, generator=g), dim=0)
    return q, k, queue, g


@pytest.mark.parametrize("weighting", ["enet", "none"])
def test_loss_equals_naive_loop(weighting):
    q, k, queue, g = loss_inputs(0)
    N, _, H, W = q.shape
    s_q = torch.rand(N, H, W, generator=g) < torch.tensor([0.2, 0.5, 0.8]).view(N, 1, 1)  # unequal object sizes
    s_k = torch.rand(N, H, W, generator=g) < 0.5
    s_q[:, 0, 0] = s_k[:, 0, 0] = True
    loss, p_k = pretrain.maskcontrast_loss(q, k, s_q, s_k, queue, 0.5, weighting)
    ref, protos = naive_loss(q, k, s_q, s_k, queue, 0.5, weighting)
    assert torch.allclose(loss.double(), ref, atol=1e-5), (loss, ref)
    assert torch.allclose(p_k.double(), protos, atol=1e-6)  # prototypes are the normalised means of the key mask
    assert torch.allclose(p_k.norm(dim=1), torch.ones(N), atol=1e-6)
    if weighting == "enet":  # the weights matter: the plain mean differs
        assert not torch.isclose(loss, pretrain.maskcontrast_loss(q, k, s_q, s_k, queue, 0.5, "none")[0])


@pytest.mark.parametrize("weighting", ["enet", "none"])
def test_loss_over_several_objects_equals_naive_loop(weighting):
    """Up to 3 objects per image; object 3 of image 0 is missing from the key view (its query pixels have no target),
    object 2 of image 1 only in the key view (a prototype, a negative for all, nobody's target)."""
    q, k, queue, g = loss_inputs(1)
    N, _, H, W = q.shape
    s_q = torch.randint(0, 4, (N, H, W), generator=g)
    s_k = torch.randint(0, 4, (N, H, W), generator=g)
    s_k[0][s_k[0] == 3] = 1
    s_q[1][s_q[1] == 2] = 0
    s_q[2] = (s_q[2] > 0).long()  # image 2: one object
    s_k[2] = (s_k[2] > 0).long()
    loss, p_k = pretrain.maskcontrast_loss(q, k, s_q.to(torch.uint8), s_k.to(torch.uint8), queue, 0.5, weighting)
    ref, protos = naive_loss(q, k, s_q, s_k, queue, 0.5, weighting)
    assert len(p_k) == 2 + 3 + 1 and torch.allclose(p_k.double(), protos, atol=1e-6)
    assert torch.allclose(loss.double(), ref, atol=1e-5), (loss, ref)


def test_one_object_per_image_is_todays_loss_to_the_bit():
    """The one-object form as it was before objects (kept here as the reference): bool and 0/1 id masks agree with
    it exactly, prototypes and loss."""
    def one_object_loss(q, k, s_q, s_k, queue, temperature=0.5):
        N, D, H, W = q.shape
        p_k = F.normalize(torch.einsum("ndhw,nhw->nd", k, s_k.to(k.dtype)), dim=1)
        q = q.permute(0, 2, 3, 1).reshape(N * H * W, D)
        logits = torch.cat([q @ p_k.T, q @ queue], dim=1) / temperature
        s_r = torch.where(s_q, torch.arange(N).view(N, 1, 1), -1).reshape(N * H * W)
        share = s_q.sum((1, 2)) / s_q.sum()
        w = 1 / torch.log(1.02 + F.pad(share.to(logits.dtype), (0, queue.shape[1])))
        return F.cross_entropy(logits, s_r, weight=w, ignore_index=-1), p_k

    q, k, queue, g = loss_inputs(2, N=4, D=32, H=16, W=16, K=64)
    s_q = torch.rand(4, 16, 16, generator=g) < 0.4
    s_k = torch.rand(4, 16, 16, generator=g) < 0.6
    want, want_p = one_object_loss(q, k, s_q, s_k, queue)
    for a, b in ((s_q, s_k), (s_q.to(torch.uint8), s_k.to(torch.uint8))):
        loss, p_k = pretrain.maskcontrast_loss(q, k, a, b, queue)
        assert torch.equal(loss, want) and torch.equal(p_k, want_p)


def test_balanced_bce_matches_definition():
    logits, t = torch.randn(2, 4, 4), torch.rand(2, 4, 4) > 0.7
    bce = F.binary_cross_entropy_with_logits(logits, t.float(), reduction="none")
    w = (~t).sum() / t.numel()
    want = (w * bce[t].sum() + (1 - w) * bce[~t].sum()) / t.numel()
    assert torch.isclose(pretrain.saliency_loss(logits, t), want)
    assert torch.isclose(pretrain.saliency_loss(logits, t, balanced=False), bce.mean())


def tiny_pair(queue_size=4, momentum=0.9, **kw):
    torch.manual_seed(0)
    return pretrain.mask_contrast(SegModel("resnet18", 8),
                                  pretrain.Contrast(queue_size=queue_size, momentum=momentum, **kw))


def test_key_network_gets_no_gradient_and_moves_by_momentum():
    m = tiny_pair()
    m.train()
    with torch.no_grad():  # make the two networks differ, so the momentum rule is visible
        for p in m.f_q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    q0 = [p.detach().clone() for p in m.f_q.parameters()]
    k0 = [p.detach().clone() for p in m.f_k.parameters()]
    x = torch.randn(2, 3, 32, 32)
    s = torch.zeros(2, 32, 32, dtype=torch.bool)
    s[:, 8:24, 8:24] = True
    loss, _ = m(x, s, x.flip(-1), s.flip(-1))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.f_k.parameters())
    assert all(p.grad is not None for p in m.f_q.parameters())
    for a, b, kk in zip(q0, k0, m.f_k.parameters()):
        assert torch.allclose(kk, 0.9 * b + 0.1 * a, atol=1e-7)


def test_majority_pool_is_each_cells_vote():
    s = torch.randint(0, 4, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    got = pretrain.majority_pool(s, (8, 8))
    for n in range(2):
        for i in range(8):
            for j in range(8):
                counts = torch.bincount(s[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4].flatten(), minlength=4).tolist()
                assert got[n, i, j] == counts.index(max(counts))  # a tie goes to the lower id, background first


def test_loss_at_feature_resolution_is_the_loss_of_the_pooled_masks():
    """--loss-res feature: Algorithm 1 on the stride-8 embeddings, each cell taking its majority object."""
    m = tiny_pair(loss_res="feature").eval()  # eval: the two computations below see the same BatchNorm
    x_q, x_k = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    s_q, s_k = torch.zeros(2, 32, 32, dtype=torch.long), torch.zeros(2, 32, 32, dtype=torch.long)
    s_q[:, 4:20, 4:28], s_k[:, 8:28, 2:22] = 1, 1
    s_q[1, 20:30, 0:16], s_k[1, 0:8, 24:32] = 2, 2  # image 1 holds a second object
    queue = m.queue.clone()
    with torch.no_grad():
        q, aux = m.f_q(x_q, upsample=False)
        k = m.f_k(x_k, upsample=False).out  # = f_q: the momentum update before the keys changes nothing yet
        p_q, p_k = pretrain.majority_pool(s_q, (4, 4)), pretrain.majority_pool(s_k, (4, 4))
        want = pretrain.maskcontrast_loss(F.normalize(q, dim=1), F.normalize(k, dim=1), p_q, p_k, queue)[0] + \
            pretrain.saliency_loss(aux, p_q)
        loss, _ = m(x_q, s_q, x_k, s_k)
    assert torch.isclose(loss, want, atol=1e-6) and m.queue_ptr == 3  # 3 objects in the key views


def test_queue_is_fifo():
    m = tiny_pair(queue_size=6)
    batches = [F.normalize(torch.randn(2, 8), dim=1) for _ in range(4)]
    for i, b in enumerate(batches[:3]):
        m.enqueue(b)
        assert int(m.queue_ptr) == (2 * (i + 1)) % 6
    assert torch.equal(m.queue.T, torch.cat(batches[:3]))
    m.enqueue(batches[3])  # the oldest batch goes first
    assert torch.equal(m.queue.T, torch.cat([batches[3], batches[1], batches[2]]))


def test_frozen_layers_keep_weights_and_statistics_in_both_networks():
    m = tiny_pair(freeze=["conv1", "bn1", "layer1"])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.f_q.parameters() if p.requires_grad], lr=0.5)
    x, s = torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    s[:, 4:20, 4:20] = True
    m.train()
    for _ in range(2):
        opt.zero_grad()
        m(x, s, x, s)[0].backward()
        opt.step()
    frozen = ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.")
    for name, t in m.state_dict().items():
        inner = name.split(".", 1)[1] if name.startswith(("f_q.", "f_k.")) else name
        if inner.startswith(frozen) and name.startswith("f_q."):  # the query's frozen layers are exactly as loaded
            assert torch.equal(t, before[name]), name
    assert not torch.equal(m.f_q.backbone.layer2[0].conv1.weight, before["f_q.backbone.layer2.0.conv1.weight"])
    assert torch.equal(m.f_k.backbone.bn1.running_mean, before["f_k.backbone.bn1.running_mean"])
    assert not m.f_q.backbone.layer1.training and m.f_q.backbone.layer2.training


def test_view_pairs_hold_the_object_and_do_not_depend_on_the_process(synth_root):
    samples = list_samples(synth_root, "train", saliency="oracle")[:12]
    ds = pretrain.ViewPairs(samples, 32, min_area=0.1, max_area=0.6)
    for i in range(len(ds)):
        x_q, s_q, c_q, x_k, s_k, c_k = ds[(i, 1000 + i)]
        assert x_q.dtype == torch.uint8 and x_q.shape == x_k.shape == (3, 32, 32) and c_q.shape == (9,)
        for m in (s_q, s_k):
            assert 0.1 < m.float().mean() < 0.6
    torch.manual_seed(123)  # the caller's RNG state neither changes an item nor is changed by one
    a = ds[(3, 7)]
    state = torch.get_rng_state()
    b = ds[(3, 7)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and torch.equal(state, torch.get_rng_state())
    bad = pretrain.ViewPairs(samples[:4], 32, min_area=0.999, max_area=1.0, max_images=3)
    with pytest.raises(UserError, match="no view pair"):  # an impossible constraint is an error, not a hang
        bad[(0, 0)]


def args_for(root, out, *extra):
    return ["--data-root", str(root), "--saliency", "oracle", "--arch", "resnet18", "--dim", "8", "--size", "32",
            "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--lr", "0.05", "--key-momentum", "0.9",
            "--out", str(out), *extra]


def same_run(a, b):
    a, b = load_checkpoint(a / "checkpoint.pth"), load_checkpoint(b / "checkpoint.pth")
    for key in ("model", "key_model"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), name
    assert torch.equal(a["queue"], b["queue"]) and a["epoch"] == b["epoch"]


@pytest.fixture(scope="module")
def small_root(synth_root, tmp_path_factory):
    """16 train images with their oracle masks, writable: two steps of 8 an epoch."""
    return copy_root(synth_root, tmp_path_factory.mktemp("small"), n=16)[0]


def test_resume_and_worker_count_reproduce_an_uninterrupted_run(small_root, tmp_path):
    pretrain.main(args_for(small_root, tmp_path / "a", "--epochs", "2"))
    pretrain.main(args_for(small_root, tmp_path / "b", "--epochs", "1"))
    # resumed, and with two loader workers: what a sample draws depends on its seed, not on the process drawing it
    pretrain.main(args_for(small_root, tmp_path / "b", "--epochs", "2", "--resume", "--workers", "2"))
    same_run(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "results.json").exists() and (tmp_path / "a" / "views.png").exists()


def test_training_steps_lower_the_loss(synth_root):
    """A few SGD steps on one batch of synthetic views: both losses must fall (gradients reach what they should)."""
    torch.manual_seed(0)
    ds = pretrain.ViewPairs(list_samples(synth_root, "train", saliency="oracle")[:4], 32)
    batch = [torch.stack(t) for t in zip(*[ds[(i, i)] for i in range(4)])]
    x_q, s_q, x_k, s_k = pretrain.to_device_views(batch, torch.device("cpu"), channels_last=False)
    model = pretrain.MaskContrast(SegModel("resnet18", 8), pretrain.Contrast(queue_size=0, momentum=0.9))
    opt = torch.optim.SGD(model.f_q.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    hist = []
    for _ in range(12):
        loss, parts = model(x_q, s_q, x_k, s_k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append([parts["contrast"].item(), parts["saliency"].item()])
    first, last = torch.tensor(hist[0]), torch.tensor(hist[-3:]).mean(0)
    assert (last < first - torch.tensor([0.3, 0.03])).all(), hist


def _rank(rank, argv, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    pretrain.main(argv)


def test_two_ddp_processes_on_cpu(small_root, tmp_path):
    """What `torchrun --nproc_per_node 2` starts — two processes with its environment, gloo on the CPU — forked from
    this one (a fresh interpreter per process would import torch again): the key shuffle, the queue fed by both."""
    argv = args_for(small_root, tmp_path, "--epochs", "1", "--device", "cpu")
    torch.multiprocessing.start_processes(_rank, args=(argv, 29531), nprocs=2, start_method="fork")
    assert load_checkpoint(tmp_path / "checkpoint.pth")["history"][-1]["step"] == 2  # 16 images / global batch 8


def _ddp_checks(setup):
    """In each of two processes, on pretrain.py's set-up: the key shuffle undone, the queue fed by both, a DDP step."""
    ddp, world = setup["model"], setup["world"]
    model = ddp.module

    class PerImage(torch.nn.Module):  # a key network that treats each image alone: a strided view of it
        def forward(self, x, upsample=False):
            return common.SegOutput(x[:, :, ::8, ::8], None)

    f_k, model.f_k = model.f_k, PerImage()
    x_k = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(world.rank))  # a batch per process
    torch.manual_seed(1)  # a shuffle that is not its own inverse (seed 0's is), so that undoing it is seen to matter
    keys_error = float((model.encode_keys(x_k) - x_k[:, :, ::8, ::8]).abs().max())
    model.f_k = f_k
    D = model.queue.shape[0]
    p_k = torch.randn(world.rank + 1, D, generator=torch.Generator().manual_seed(world.rank))  # 1 and 2 prototypes
    model.enqueue(F.normalize(p_k, dim=1))
    queue_head = model.queue[:, :3].T.clone()
    x_q, s_q, x_k, s_k = pretrain.to_device_views(next(iter(setup["loader"])), world.device, False)
    model.train()
    loss, _ = ddp(x_q, s_q, x_k, s_k)
    setup["step"](loss)
    weights = [common.fingerprint(dict(net.named_parameters())) for net in (model.f_q, model.f_k)]
    return {"keys_error": keys_error, "queue_head": queue_head, "weights": weights,
            "queue": common.fingerprint({"q": model.queue}), "loss": float(loss)}


def _ddp_checks_rank(rank, argv, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.save(pretrain.main(argv, hook=_ddp_checks), f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_undoes_the_key_shuffle_shares_the_queue_and_keeps_the_processes_equal(small_root, tmp_path):
    argv = args_for(small_root, tmp_path / "run", "--device", "cpu")
    torch.multiprocessing.start_processes(_ddp_checks_rank, args=(argv, 29537, str(tmp_path)), nprocs=2,
                                          start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["keys_error"] < 1e-6 and r1["keys_error"] < 1e-6  # each process got its own images' keys back
    D = r0["queue_head"].shape[1]
    p_k = [F.normalize(torch.randn(r + 1, D, generator=torch.Generator().manual_seed(r)), dim=1) for r in (0, 1)]
    assert torch.allclose(r0["queue_head"], torch.cat(p_k)) and torch.equal(r0["queue_head"], r1["queue_head"])
    # DDP averaged the gradients: after the step both hold the same query and key networks and queue
    assert r0["weights"] == r1["weights"] and r0["queue"] == r1["queue"] and math.isfinite(r0["loss"])


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


def test_bad_inputs_name_the_file(synth_root, tmp_path, capsys):
    one_line_error(pretrain.main, args_for(tmp_path / "nowhere", tmp_path / "o"), capsys, "no such folder")
    root, ids = copy_root(synth_root, tmp_path / "r")
    (root / "saliency_oracle" / f"{ids[0]}.png").unlink()
    one_line_error(pretrain.main, args_for(root, tmp_path / "o"), capsys, f"{ids[0]}.jpg: no saliency mask")
    (root / "saliency_oracle" / "dropped.txt").write_text(ids[0] + "\n")  # mine_masks.py dropped it: fine
    assert len(pretrain.pretrain_samples([root], "train", "oracle")) == len(ids) - 1
    Image.new("L", (10, 10)).save(root / "saliency_oracle" / f"{ids[1]}.png")
    one_line_error(pretrain.main, args_for(root, tmp_path / "o"), capsys, f"{ids[1]}.png: mask is (10, 10) but image")
    Image.new("L", (64, 64)).save(root / "saliency_oracle" / f"{ids[1]}.png")  # empty: skipped, not an error,
    samples = pretrain.pretrain_samples([root], "train", "oracle")  # by the loader (start-up opens no mask)
    empty = next(s for s in samples if s.id == ids[1])
    assert len(samples) == len(ids) - 1
    with pytest.raises(UserError, match="no view pair"):
        pretrain.ViewPairs([empty], 32)[(0, 0)]
    for seed in range(4):  # drawn again and again, the empty one is always swapped for the other image
        _, s_q, _, _, s_k, _ = pretrain.ViewPairs([empty, samples[-1]], 32)[(0, seed)]
        assert s_q.any() and s_k.any()
    (root / "JPEGImages" / f"{ids[2]}.jpg").write_bytes(b"not a jpeg")
    one_line_error(pretrain.main, args_for(root, tmp_path / "o3"), capsys, f"{ids[2]}.jpg: cannot decode image")
    (root / "JPEGImages" / f"{ids[2]}.jpg").unlink()  # listed in the split, but gone: the image is named, not a mask
    one_line_error(pretrain.main, args_for(root, tmp_path / "o2"), capsys, f"{ids[2]}.jpg: image not found")
    one_line_error(pretrain.main, args_for(synth_root, tmp_path / "o", "--batch-size", "1"), capsys,
                   "at least 2 images each")
    one_line_error(pretrain.main, args_for(copy_root(synth_root, tmp_path / "one", n=1)[0], tmp_path / "o"), capsys,
                   "1 images is fewer than one batch")
    with pytest.raises(SystemExit):
        pretrain.get_args(["--data-root", "x", "--epochs", "0"])
    with pytest.raises(SystemExit):
        pretrain.get_args(["--data-root", "x", "--freeze", "layer1,stem"])
    # before any mining: the command to run first is named
    one_line_error(pretrain.main, args_for(synth_root, tmp_path / "o4", "--saliency", "none"), capsys,
                   "saliency_none: no saliency masks", "python mine_masks.py --data-root")
    one_line_error(pretrain.main, args_for(synth_root, tmp_path / "o5", "--queue-size", "12"), capsys,
                   "--queue-size 12 must be a multiple of the global batch 8")


def test_divergence_stops_with_one_line_and_keeps_the_last_checkpoint_good(small_root, tmp_path, capsys):
    one_line_error(pretrain.main, args_for(small_root, tmp_path / "a", "--epochs", "3", "--lr", "1e6"), capsys,
                   "training diverged by epoch 1", "--lr 1e+06")
    assert not (tmp_path / "a" / "checkpoint.pth").exists()  # nothing non-finite reached the disk
    pretrain.main(args_for(small_root, tmp_path / "b", "--epochs", "1"))
    ck = tmp_path / "b" / "checkpoint.pth"
    stamp = ck.stat().st_mtime_ns  # a finished run is not overwritten by a new one...
    one_line_error(pretrain.main, args_for(small_root, tmp_path / "b", "--epochs", "1"), capsys, "holds a run already",
                   "--resume")
    assert ck.stat().st_mtime_ns == stamp
    one_line_error(pretrain.main, args_for(small_root, tmp_path / "b", "--epochs", "3", "--lr", "1e6", "--resume"),
                   capsys, "training diverged by epoch 2", f"the last checkpoint, {ck}, is from before")
    kept = load_checkpoint(ck)
    assert kept["epoch"] == 1 and all(torch.isfinite(t).all() for t in kept["model"].values())


def test_corrupt_jpeg_in_a_worker_is_one_line(synth_root, tmp_path, capsys, monkeypatch):
    # the failed worker is joined when the error is collected, with this timeout (5 s by default): shorter here
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    root, ids = copy_root(synth_root, tmp_path / "r", n=8)
    for i in ids:  # header intact, pixel data cut: only decoding in the DataLoader worker notices
        p = root / "JPEGImages" / f"{i}.jpg"
        p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
    one_line_error(pretrain.main, args_for(root, tmp_path / "o", "--workers", "1", "--epochs", "1"), capsys,
                   ".jpg: cannot decode image")
    gc.collect()


def test_backbone_files_load_and_wrong_ones_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not fit resnet18"):
        torch.save(SegModel("resnet50", 8).backbone.state_dict(), tmp_path / "r50.pth")
        load_backbone_weights(SegModel("resnet18", 8).backbone, tmp_path / "r50.pth", "resnet18")
    src = SegModel("resnet18", 8).backbone.state_dict()
    moco = {"state_dict": {**{f"module.encoder_q.{k}": v for k, v in src.items()},
                           "module.encoder_q.fc.0.weight": torch.zeros(2, 2),
                           **{f"module.encoder_k.{k}": v for k, v in src.items()}}}
    torch.save(moco, tmp_path / "moco.pth")
    net = SegModel("resnet18", 8).backbone
    load_backbone_weights(net, tmp_path / "moco.pth", "resnet18")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in src.items())


def test_color_params_ride_with_the_views_and_jitter_is_validated(synth_root, capsys):
    ds = pretrain.ViewPairs(list_samples(synth_root, "train", saliency="oracle")[:2], 32, jitter=(0, 0, 0, 0))
    _, _, c_q, _, _, c_k = ds[(0, 5)]
    assert torch.equal(c_q[:4], torch.tensor([1.0, 1, 1, 0])) and torch.equal(c_k[:4], c_q[:4])
    with pytest.raises(SystemExit):
        pretrain.get_args(["--data-root", "x", "--color-jitter", "0.4", "0.4", "0.4", "0.7"])
    assert "hue" in capsys.readouterr().err


def test_batch_parts_contrast_each_part_with_its_own_prototypes():
    """--batch-parts 2 is the release's 2 GPUs on one: each half of the batch is contrasted with its own half's
    prototypes (and the queue), and the loss is the mean over the halves."""
    m = tiny_pair(queue_size=4, parts=2).eval()  # eval: BatchNorm's running statistics, so the halves are comparable
    g = torch.Generator().manual_seed(0)
    x_q, x_k = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    s = torch.rand(4, 32, 32, generator=g) < 0.4
    queue = m.queue.clone()
    with torch.no_grad():
        loss, parts = m(x_q, s, x_k, s)
        q, aux = m.f_q(x_q)
        k = F.interpolate(m.f_k(x_k, upsample=False)[0], size=(32, 32), mode="bilinear", align_corners=False)
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    halves = [pretrain.maskcontrast_loss(q[i:i + 2], k[i:i + 2], s[i:i + 2], s[i:i + 2], queue)[0] for i in (0, 2)]
    assert torch.isclose(parts["contrast"], torch.stack(halves).mean(), atol=1e-5)
    assert not torch.isclose(parts["contrast"], pretrain.maskcontrast_loss(q, k, s, s, queue)[0], atol=1e-3)
    assert torch.isclose(parts["saliency"], torch.stack([pretrain.saliency_loss(aux[i:i + 2], s[i:i + 2])
                                                         for i in (0, 2)]).mean(), atol=1e-6)


def _gather_rank(rank, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    p_k = torch.full((2 + rank, 4), float(rank))  # rank 0 holds 2 objects, rank 1 holds 3
    torch.save(pretrain.gather_prototypes(p_k), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_ranks_with_different_object_counts_gather_every_prototype(tmp_path):
    torch.multiprocessing.start_processes(_gather_rank, args=(29533, str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got, torch.tensor([0.0] * 2 + [1.0] * 3)[:, None].expand(5, 4))


def test_enqueue_keeps_the_newest_when_more_objects_than_the_queue():
    model = pretrain.MaskContrast(SegModel("resnet18", 4), pretrain.Contrast(queue_size=4))
    model.queue_ptr.fill_(3)
    model.enqueue(torch.arange(6.0)[:, None].expand(6, 4))  # 6 prototypes for a queue of 4: the last 4 stay
    assert sorted(model.queue[0].tolist()) == [2.0, 3.0, 4.0, 5.0] and int(model.queue_ptr) == (3 + 4) % 4


def test_view_pairs_of_object_masks(tmp_path):
    """Two objects (ids 1, 2; also as a 0/255 one-object mask): views keep the ids; a pair must share an object."""
    root = tmp_path / "r"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "saliency_unsup").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    Image.new("RGB", (40, 40), (120, 80, 40)).save(root / "JPEGImages" / "a.jpg")
    ids = np.zeros((40, 40), np.uint8)
    ids[2:18, 2:18], ids[22:38, 22:38] = 1, 2
    common.save_objects_png(ids, root / "saliency_unsup" / "a.png")
    assert torch.equal(common.read_objects(root / "saliency_unsup" / "a.png"), torch.from_numpy(ids))
    samples = pretrain.pretrain_samples([root], None, "unsup")
    ds = pretrain.ViewPairs(samples, 16)
    for seed in range(8):
        _, s_q, _, _, s_k, _ = ds[(0, seed)]
        assert s_q.dtype == torch.uint8 and set(s_q.unique().tolist()) <= {0, 1, 2}
        shared = set(s_q.unique().tolist()) & set(s_k.unique().tolist()) - {0}
        assert shared and ds.min_area < (s_q > 0).float().mean() < ds.max_area
    common.save_mask_png(ids > 0, root / "saliency_unsup" / "a.png")  # today's 0/255 mask: one object
    assert set(common.read_objects(root / "saliency_unsup" / "a.png").unique().tolist()) == {0, 1}
    grey = (ids > 0).astype(np.uint8) * 255
    grey[17, 2:18] = 128  # an anti-aliased edge: not an id map
    Image.fromarray(grey).save(root / "saliency_unsup" / "a.png")
    with pytest.raises(UserError, match="holds 255 beside other values"):  # found where the loader reads it
        pretrain.ViewPairs(pretrain.pretrain_samples([root], None, "unsup"), 16)[(0, 0)]
