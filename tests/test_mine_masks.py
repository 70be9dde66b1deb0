"""mine_masks.py: priors, post-processing bounds, metrics by hand, the three modes end to end, resume, bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import synthetic
import mine_masks as mm
from conftest import Killed, kill_after_first_checkpoint, one_line_error

TINY = ["--arch", "resnet18", "--size", "32", "--prior-size", "48", "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--grid", "2"]


def _auc(p, gt):
    """Probability that a random object pixel scores above a random background pixel."""
    p, gt = p.flatten(), gt.flatten()
    rank = p.argsort().argsort().double() + 1
    npos, nneg = gt.sum().double(), (~gt).sum().double()
    return float((rank[gt].sum() - npos * (npos + 1) / 2) / (npos * nneg))


@pytest.fixture(scope="module")
def synth_batch(synth_root):
    ss = common.list_samples(synth_root, "train", saliency="oracle")[:12]
    x = torch.stack([common.read_image(s.image) for s in ss]).float() / 255
    gt = torch.stack([common.read_mask(s.saliency) > 0 for s in ss])
    return x, gt


@pytest.mark.parametrize("name", list(mm.PRIORS))
def test_each_prior_ranks_the_planted_object_above_its_background(synth_batch, name):
    x, gt = synth_batch
    s = mm.PRIORS[name](x)
    assert s.shape == gt.shape and s.min() >= 0 and s.max() <= 1
    aucs = [_auc(s[i], gt[i]) for i in range(len(s))]
    assert np.mean(aucs) > 0.8, aucs
    assert all(s[i][gt[i]].mean() > s[i][~gt[i]].mean() for i in range(len(s)))


def test_minimum_barrier_distance_values():
    img = torch.full((1, 9, 9), 10, dtype=torch.uint8)
    img[0, 3:6, 3:6] = 200  # a bright plateau inside a flat dark frame: barrier 190 inside, 0 outside
    img[0, 4, 4] = 90  # a dip in the plateau: the path still climbs to 200, barrier 200 − 10
    d = mm.mbd_distance(img)
    expect = torch.zeros(9, 9, dtype=torch.uint8)
    expect[3:6, 3:6] = 190
    assert torch.equal(d[0], expect)
    assert mm.mbd_distance(torch.full((2, 5, 7), 77, dtype=torch.uint8)).sum() == 0


def test_postprocess_keeps_and_drops_exactly_at_the_one_percent_bounds():
    prob = np.zeros((100, 100), np.float32)  # 1 % = 100 pixels
    prob[0:10, 0:10] = 0.9  # 100 px: kept
    prob[50:59, 50:61] = 0.6  # 99 px: removed
    mask, share, why = mm.postprocess(prob)
    assert why is None and share == 0.01 and mask.sum() == 100 and not mask[50:59, 50:61].any()
    prob[0, 0] = 0.5  # the kept blob falls to 99 px: 0.5 itself is background (the release thresholds strictly)
    mask, share, why = mm.postprocess(prob)
    assert why is not None and "1%" in why and mask.sum() == 0
    # diagonal touching counts as one component (8-connectivity): 50 + 50 px = 100 px kept
    prob = np.zeros((100, 100), np.float32)
    prob[0:5, 0:10] = prob[5:10, 10:20] = 1
    assert mm.postprocess(prob)[0].sum() == 100
    assert mm.postprocess(np.zeros((10, 10)))[2].startswith("no pixel")
    # a ring of 48 px (under 1 %) around a hole: its filled contour (169 px) is over 1 %, so the ring stays
    prob = np.zeros((100, 100), np.float32)
    prob[0:10, 0:10] = 1  # 100 px, so that the image is kept
    prob[40:53, 40:53] = 1
    prob[41:52, 41:52] = 0
    prob[46, 46] = 1  # ... and a speck inside the hole, under 1 % itself, goes
    mask, _, why = mm.postprocess(prob)
    assert why is None and mask.sum() == 148 and mask[40, 40] and not mask[46, 46]


def test_metrics_equal_hand_computed_values():
    m = mm.SaliencyMeter()
    # image 1: round(255 p) = 255, 153 / 51, 0; ground truth = the left column
    m.add(torch.tensor([[1.0, 0.6], [0.2, 0.0]]), torch.tensor([[1, 0], [1, 0]]))
    # image 2: a perfect binary map, one object pixel in four
    m.add(torch.tensor([[0.0, 0.0], [0.0, 1.0]]), torch.tensor([[0, 0], [0, 1]]))
    r = m.result()
    assert r["images"] == 2
    assert r["mae"] == pytest.approx(((0 + 0.6 + 0.8 + 0) / 4 + 0) / 2)
    assert r["iou"] == pytest.approx((1 / 3 + 1) / 2)  # image 1: {(0,0), (0,1)} against {(0,0), (1,0)}

    # (P, R) per threshold k: image 1 (1/2, 1) at k=0, (2/3, 1) for k ≤ 51, (1/2, 1/2) for k ≤ 153, (1, 1/2) above;
    # image 2 (1/4, 1) at k=0, (1, 1) above. Averaged over images first, then F = 1.3 P R / (0.3 P + R).
    def f(p, r):
        return 1.3 * p * r / (0.3 * p + r)
    curve = [f(3 / 8, 1), f(5 / 6, 1), f(3 / 4, 3 / 4), f(1, 3 / 4)]
    assert r["max_f"] == pytest.approx(max(curve)) and max(curve) == pytest.approx(0.975 / 1.05)
    # which is not the mean of per-image max F (0.8125 and 1)
    assert r["max_f"] != pytest.approx((0.8125 + 1) / 2)


def _read_png(p):
    return np.array(Image.open(p))


def test_unsupervised_end_to_end_writes_masks_that_pretraining_can_load(synth_root, tmp_path, capsys):
    out_root, work = tmp_path / "masks", tmp_path / "work"
    args = ["--data-root", str(synth_root), "--split", "val", "--name", "mined", "--mask-root", str(out_root),
            "--out", str(work), "--rounds", "1", "--eval-masks", str(synth_root / "saliency_oracle")] + TINY
    mm.main(args)
    printed = capsys.readouterr().out
    for stage in ("prior_mbd", "prior_rbd", "priors", "round1", "final masks"):
        assert stage in printed
    d = common.saliency_dir(synth_root, "mined", out_root)
    summary = json.loads((d / "summary.json").read_text())
    dropped = (d / "dropped.txt").read_text().split()
    samples = common.list_samples(synth_root, "val", saliency="mined", mask_root=out_root)
    assert summary["images"] == len(samples) == summary["kept"] + summary["dropped"]
    assert summary["dropped"] == len(dropped) and set(summary["stages"]) >= {"prior_mbd", "priors", "round1"}
    kept = [s for s in samples if s.id not in dropped]
    assert len(kept) == summary["kept"] > 0
    assert sorted(p.stem for p in d.glob("*.png")) == sorted(s.id for s in kept)
    for s in kept:  # what pretrain.py reads: a 0/255 mask of the image's size with ≥ 1 % foreground
        m = common.read_mask(s.saliency)
        assert tuple(m.shape) == common.image_size(s.image)
        assert set(np.unique(m.numpy())) <= {0, 255} and (m > 0).float().mean() >= 0.01
    # pretrain.py takes exactly the kept images (dropped.txt excuses the others)
    pretrain = pytest.importorskip("pretrain")
    assert sorted(s.id for s in pretrain.pretrain_samples([synth_root], "val", "mined", out_root)) == \
        sorted(s.id for s in kept)
    assert (work / "grid.png").is_file() and (work / "round1.pth").is_file()
    ck = common.load_checkpoint(work / "round1.pth", kind="saliency")
    assert common.model_from_checkpoint(ck).saliency_head is not None

    # re-running with --resume reuses every stage and gives the same masks
    before = {p.name: p.read_bytes() for p in d.glob("*.png")}
    mm.main(args + ["--resume"])
    printed = capsys.readouterr().out
    assert "[priors] reused" in printed and "[round1] reused" in printed and "epoch 1/1" not in printed
    assert {p.name: p.read_bytes() for p in d.glob("*.png")} == before
    # the default --rounds 2 on top: the first round is reused, the second learns from it mixed with the priors
    round1 = (work / "round1.pth").read_bytes()
    two_rounds = list(args)
    two_rounds[args.index("--rounds") + 1] = "2"
    mm.main(two_rounds + ["--resume"])
    printed = capsys.readouterr().out
    assert "[round1] reused" in printed and "round 1 predictions mixed with the priors" in printed
    assert (work / "round1.pth").read_bytes() == round1 and (work / "round2.pth").is_file()
    assert "round2" in json.loads((d / "summary.json").read_text())["stages"]


def test_later_rounds_learn_from_the_predictions_mixed_with_the_priors(tmp_path):
    g = np.random.default_rng(0)
    target, prior = (g.integers(0, 256, (3, 8, 8), dtype=np.uint8) for _ in range(2))
    for name, a in (("target", target), ("prior", prior)):
        mm.MapFile(tmp_path / f"{name}.npy", a.shape).write(0, a)
    first = mm.PseudoLabels(tmp_path / "target.npy", 0.7, 0.3)
    later = mm.PseudoLabels(tmp_path / "target.npy", 0.7, 0.3, tmp_path / "prior.npy", weight=0.25)
    for i in range(3):
        for labels, m in ((first(i), target[i] / 255), (later(i), np.round(0.25 * prior[i] + 0.75 * target[i]) / 255)):
            want = np.where(m > 0.7, 1, np.where(m < 0.3, 0, common.IGNORE))  # object, background, ignored between
            assert np.array_equal(labels.numpy(), want)


def test_import_mode_resizes_any_map_and_drops_empty_ones(synth_root, tmp_path):
    ids = [s.id for s in common.list_samples(synth_root, "val")]
    maps = tmp_path / "maps"
    maps.mkdir()
    for k, i in enumerate(ids):
        a = np.zeros((20, 30), np.uint8)
        if k != 0:  # the first map is empty → dropped
            a[5:15, 10:20] = 255
        Image.fromarray(a).save(maps / f"{i}.png")
    mm.main(["--data-root", str(synth_root), "--split", "val", "--name", "imp", "--mask-root", str(tmp_path),
             "--out", str(tmp_path / "w"), "--import-maps", str(maps), "--grid", "0", "--workers", "0"])
    d = tmp_path / "saliency_imp"
    assert (d / "dropped.txt").read_text().split() == [ids[0]]
    m = _read_png(d / f"{ids[1]}.png")
    assert m.shape == (64, 64) and m.dtype == np.uint8
    # the 10×10 square of a 20×30 map covers rows 16..47 and columns ~21..42 of the 64×64 image
    assert m[32, 32] == 255 and m[5, 5] == 0 and abs((m > 0).mean() - 1 / 6) < 0.03


def test_supervised_mode_trains_on_labeled_folders(synth_root, tmp_path):
    imgs, masks = tmp_path / "train_images", tmp_path / "train_masks"
    imgs.mkdir(), masks.mkdir()
    for s in common.list_samples(synth_root, "train", saliency="oracle")[:8]:  # one step of 8
        (imgs / s.image.name).write_bytes(s.image.read_bytes())
        (masks / s.saliency.name).write_bytes(s.saliency.read_bytes())
    mm.main(["--data-root", str(synth_root), "--split", "val", "--name", "sup", "--mask-root", str(tmp_path),
             "--out", str(tmp_path / "w"), "--train-images", str(imgs), "--train-masks", str(masks), "--eval-masks",
             str(synth_root / "saliency_oracle")] + TINY)
    s = json.loads((tmp_path / "saliency_sup" / "summary.json").read_text())
    assert s["mode"] == "supervised" and "supervised" in s["stages"] and s["kept"] + s["dropped"] == 16


def test_resume_after_a_kill_gives_the_masks_of_an_uninterrupted_run(tiny_root, tmp_path, monkeypatch):
    def run(name, *extra):
        mm.main(["--data-root", str(tiny_root), "--split", "val", "--mask-root", str(tmp_path / name), "--out",
                 str(tmp_path / f"w_{name}"), "--rounds", "1", *TINY, "--epochs", "2", "--batch-size", "4",
                 "--prior-size", "32", "--mask-threshold", "0.3", *extra])
        maps = torch.from_numpy(np.load(tmp_path / f"w_{name}" / "maps_round1.npy"))  # what the network predicted
        return maps, {p.name: p.read_bytes() for p in (tmp_path / name / "saliency_unsup").glob("*.png")}

    whole = run("a")
    with kill_after_first_checkpoint(monkeypatch):
        run("b")
    assert common.load_checkpoint(tmp_path / "w_b" / "round1.pth")["epoch"] == 1
    maps, masks = run("b", "--resume")
    assert torch.equal(maps, whole[0]) and masks == whole[1] and len(masks) > 0


def test_every_mask_dropped_is_an_error_and_a_rerun_needs_resume(synth_root, tmp_path, capsys):
    maps = tmp_path / "maps"
    maps.mkdir()
    ids = [s.id for s in common.list_samples(synth_root, "val")]
    for i in ids:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(maps / f"{i}.png")
    argv = ["--data-root", str(synth_root), "--split", "val", "--name", "imp", "--mask-root", str(tmp_path),
            "--out", str(tmp_path / "w"), "--import-maps", str(maps), "--grid", "0", "--workers", "0"]
    one_line_error(mm.main, argv, capsys, "every one of the 16 images was dropped", "no mask was written")
    assert not list((tmp_path / "saliency_imp").glob("*.png")) and not (tmp_path / "saliency_imp/summary.json").exists()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(maps / f"{ids[0]}.png")
    mm.main(argv + ["--resume"])
    one_line_error(mm.main, argv, capsys, "holds a run already", "--resume")  # the finished run is kept


def test_bad_input_is_one_line_error(synth_root, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    one_line_error(mm.main, ["--data-root", str(bad), "--out", str(tmp_path / "w"), "--workers", "0"], capsys,
                   "broken.jpg: cannot decode image")  # (in a DataLoader worker: tests/test_pretrain.py)
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(mm.main, ["--data-root", str(empty), "--out", str(tmp_path / "w2")], capsys, "no images found")
    assert not (tmp_path / "w2").exists()  # the inputs are checked before anything is written
    gt = tmp_path / "gt"
    gt.mkdir()
    ids = [s.id for s in common.list_samples(synth_root, "val")]
    for i in ids:
        common.save_mask_png(np.zeros((32, 32)), gt / f"{i}.png")  # images are 64×64
    argv = ["--data-root", str(synth_root), "--split", "val", "--mask-root", str(tmp_path), "--out",
            str(tmp_path / "w3"), "--eval-masks", str(gt), "--workers", "0"]
    one_line_error(mm.main, argv, capsys, "ground truth is (32, 32) but image")
    (gt / f"{ids[3]}.png").unlink()
    one_line_error(mm.main, argv + ["--resume"], capsys, f"no ground-truth mask for 1 of 16 images, e.g. '{ids[3]}'")
    (tmp_path / "a_file").write_text("")  # an output folder that cannot be: refused before any image is read
    one_line_error(mm.main, ["--data-root", str(synth_root), "--out", str(tmp_path / "a_file")], capsys,
                   "a_file: cannot write there (a file is in the way)")
    one_line_error(mm.main, ["--data-root", str(synth_root), "--split", "val", "--mask-root", str(tmp_path / "m"),
                             "--out", str(tmp_path / "w4"), *TINY, "--rounds", "1", "--batch-size", "1"], capsys,
                   "a batch needs at least 2 images (BatchNorm)")


@pytest.mark.parametrize("flags,says", [
    (["--train-images", "x"], "--train-images and --train-masks go together"),
    (["--import-maps", "m", "--train-images", "x", "--train-masks", "y"], "different modes: pick one"),
    (["--priors", "mbd,nope"], "--priors: unknown ['nope']"),
    (["--fg-thresh", "0.3", "--bg-thresh", "0.6"], "need 0 <= --bg-thresh <= --fg-thresh <= 1"),
    (["--proposals", "hierarchical", "--import-maps", "m"], "uses no saliency: drop --import-maps"),
])
def test_contradictory_flags_are_refused_before_any_work(flags, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mm.get_args(["--data-root", str(tmp_path)] + flags)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_missing_folders_and_clashing_ids_are_one_line_errors(tiny_root, tmp_path, capsys):
    base = ["--data-root", str(tiny_root), "--split", "val", "--mask-root", str(tmp_path / "m"), "--workers", "0"]
    one_line_error(mm.main, base + ["--out", str(tmp_path / "w1"), "--eval-masks", str(tmp_path / "nope")], capsys,
                   "nope: no such folder (ground-truth mask)")
    (tmp_path / "empty").mkdir()
    one_line_error(mm.main, base + ["--out", str(tmp_path / "w2"), "--import-maps", str(tmp_path / "empty")], capsys,
                   "empty: no image files in it (saliency map)")
    for d in ("a", "b"):  # two folders with an image of the same name, whose masks would share one file
        (tmp_path / d).mkdir()
        Image.new("RGB", (16, 16)).save(tmp_path / d / "same.jpg")
    argv = ["--data-root", str(tmp_path / "a"), str(tmp_path / "b"), "--mask-root", str(tmp_path / "m"), "--out",
            str(tmp_path / "w3")]
    one_line_error(mm.main, argv, capsys, "id 'same' also names", "mine them under different --mask-root or --name")


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror():
    """predict_saliency runs each batch and its mirror image in one pass: the map must be the mean of the two
    separate predictions (the mirror's flipped back), resized, as uint8."""
    torch.manual_seed(0)
    model = common.SegModel("resnet18").eval()
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    got = mm.predict_saliency(model, images, 32, 2, torch.device("cpu"), "bf16", 24)
    x = common.eval_transform(32)(images)
    with torch.no_grad():
        p = (torch.sigmoid(model(x)[1]) + torch.sigmoid(model(x.flip(-1))[1]).flip(-1)) / 2
    want = torch.nn.functional.interpolate(p[:, None], size=(24, 24), mode="bilinear", align_corners=False)[:, 0]
    assert (got.float() - (want * 255).round()).abs().max() <= 1
    assert got.float().std() > 0  # a real map, not a constant


def test_components_proposals_write_one_object_per_blob(synth_root, tmp_path):
    """Import mode, a map with two separated blobs (and a speck under the area rule): two objects, ids 1 and 2."""
    ids = [s.id for s in common.list_samples(synth_root, "val")]
    maps = tmp_path / "maps"
    maps.mkdir()
    for i in ids:
        a = np.zeros((64, 64), np.uint8)
        a[4:20, 4:20], a[40:60, 30:60], a[62, 0] = 255, 200, 255
        Image.fromarray(a).save(maps / f"{i}.png")
    mm.main(["--data-root", str(synth_root), "--split", "val", "--name", "c", "--mask-root", str(tmp_path),
             "--out", str(tmp_path / "w"), "--import-maps", str(maps), "--proposals", "components", "--grid", "0",
             "--workers", "0"])
    objects = common.read_objects(tmp_path / "saliency_c" / f"{ids[0]}.png")
    assert sorted(objects.unique().tolist()) == [0, 1, 2]
    assert (objects[4:20, 4:20] == 1).all() and (objects[40:60, 30:60] == 2).all() and objects[62, 0] == 0
    summary = json.loads((tmp_path / "saliency_c" / "summary.json").read_text())
    assert summary["proposals"] == "components" and summary["objects_per_image"]["histogram"] == {"2": 16}


def test_merge_regions_joins_similar_neighbours_and_drops_regions_too_large():
    """16 superpixels of 2×2 pixels: the left half in two close colours (one region, 50 % of the image), the top
    right in a third (12.5 %), the rest in a fourth (37.5 %); with max_region 0.4 the left half is background."""
    label = np.arange(16).reshape(4, 4).repeat(2, 0).repeat(2, 1)
    lab = np.zeros((16, 3))
    lab[[0, 1, 4, 5]] = [50, 10, 10]
    lab[[8, 9, 12, 13]] = [52, 12, 9]
    lab[[2, 3]] = [20, -40, 30]
    lab[[6, 7, 10, 11, 14, 15]] = [90, 0, 0]
    ids = mm.merge_regions(label, lab, np.full(16, 4), merge_below=10, max_region=0.4)
    assert (ids[:, :4] == 0).all()
    top_right, rest = np.unique(ids[:2, 4:]), np.unique(ids[2:, 4:])
    assert len(top_right) == len(rest) == 1 and sorted([top_right[0], rest[0]]) == [1, 2]


def test_hierarchical_proposals_write_non_overlapping_regions(tmp_path):
    root = synthetic.make_synthetic_voc(tmp_path / "m", n_train=4, n_val=0, size=64, seed=2, multi=True)
    mm.main(["--data-root", str(root), "--name", "h", "--out", str(tmp_path / "w"), "--proposals", "hierarchical",
             "--prior-size", "64", "--grid", "2", "--workers", "0"])
    for f in sorted((root / "saliency_h").glob("*.png")):
        objects = common.read_objects(f).numpy()
        present = np.unique(objects[objects > 0])
        assert present.tolist() == list(range(1, len(present) + 1)) and len(present) >= 1  # ids 1…M, one per pixel
        share = np.bincount(objects.ravel())[1:] / objects.size
        assert (share >= 0.01).all() and (share <= 0.5 + 1e-9).all()  # the area rule and --max-region
    assert json.loads((root / "saliency_h" / "summary.json").read_text())["proposals"] == "hierarchical"


def test_a_run_killed_mid_stage_resumes_after_its_last_chunk(tiny_root, tmp_path, monkeypatch):
    """Chunks of 3 images: the priors stage dies in its third chunk; --resume computes only the chunks left and
    writes the masks of an uninterrupted run."""
    monkeypatch.setattr(mm, "CHUNK", 3)
    argv = ["--data-root", str(tiny_root), "--rounds", "0", "--prior-size", "32", "--grid", "0", "--workers", "0"]

    def run(name, *extra):
        mm.main(argv + ["--mask-root", str(tmp_path / name), "--out", str(tmp_path / f"w_{name}"), *extra])
        return {p.name: p.read_bytes() for p in (tmp_path / name / "saliency_unsup").glob("*.png")}

    whole = run("a")
    real, calls, dying = mm.PRIORS["mbd"], [], [True]

    def dies_in_chunk_3(x):
        calls.append(len(x))
        if len(calls) == 3 and dying and dying.pop():
            raise Killed
        return real(x)

    monkeypatch.setitem(mm.PRIORS, "mbd", dies_in_chunk_3)
    with pytest.raises(Killed):
        run("b")
    assert np.load(tmp_path / "w_b" / "priors.done.npy").tolist() == [True, True] + [False] * 5  # 20 images
    calls.clear()
    assert run("b", "--resume") == whole and len(whole) > 0
    assert len(calls) == 5  # the five chunks left, not the two done


def _mine_rank(rank, argv, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    mm.main(argv)


def test_two_processes_write_the_masks_of_one(tiny_root, tmp_path, monkeypatch):
    """What `torchrun --nproc_per_node 2 mine_masks.py` starts (gloo on the CPU), forked from this process: each
    process mines every other chunk; the masks equal one process's. With a network round the two train it with DDP
    (per-process BatchNorm statistics, as the release's GPUs: not bitwise one process's network)."""
    monkeypatch.setattr(mm, "CHUNK", 3)
    base = ["--data-root", str(tiny_root), "--prior-size", "32", "--grid", "2", "--workers", "0", "--device", "cpu"]

    def masks(name):
        return {p.name: p.read_bytes() for p in (tmp_path / name / "saliency_unsup").glob("*.png")}

    one = base + ["--rounds", "0", "--mask-root", str(tmp_path / "one"), "--out", str(tmp_path / "w_one")]
    mm.main(one)
    two = base + ["--rounds", "0", "--mask-root", str(tmp_path / "two"), "--out", str(tmp_path / "w_two")]
    torch.multiprocessing.start_processes(_mine_rank, args=(two, 29541), nprocs=2, start_method="fork")
    assert masks("two") == masks("one") and len(masks("one")) > 0
    summary = json.loads((tmp_path / "two" / "saliency_unsup" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["kept"] + summary["dropped"] == 20
    net = base + ["--rounds", "1", *TINY[:4], "--epochs", "1", "--batch-size", "4", "--mask-threshold", "0.3",
                  "--mask-root", str(tmp_path / "net"), "--out", str(tmp_path / "w_net")]
    torch.multiprocessing.start_processes(_mine_rank, args=(net, 29542), nprocs=2, start_method="fork")
    assert common.load_checkpoint(tmp_path / "w_net" / "round1.pth")["epoch"] == 1
    assert np.load(tmp_path / "w_net" / "round1.done.npy").all()
