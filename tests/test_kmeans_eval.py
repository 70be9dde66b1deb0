"""kmeans_eval.py: cluster matching, mIoU, K-Means/PCA, the histogram shortcut, end to end, bad input."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import kmeans_eval as ke
from conftest import one_line_error


def match_clusters(pred, gt, n_clusters, n_classes):
    """Cluster → class map from cluster ids and labels of one shape (255 ignored), as kmeans_eval scores them."""
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long()
    keep = gt != common.IGNORE
    conf = torch.bincount(pred[keep] * n_classes + gt[keep], minlength=n_clusters * n_classes)
    return ke.match_from_confusion(conf.reshape(n_clusters, n_classes))


def test_match_clusters_recovers_a_permutation():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 6, (40, 50), generator=g)
    gt[:5] = 255  # ignored pixels must not matter
    perm = torch.randperm(6, generator=g)
    pred = perm[gt.clamp(max=5)]
    mapping = match_clusters(pred, gt, 6, 6)
    assert mapping.dtype == torch.long and mapping.shape == (6,)
    assert torch.equal(mapping[perm], torch.arange(6))
    # with 10 % of the pixels flipped at random the one-to-one assignment still holds
    noisy = torch.where(torch.rand(gt.shape, generator=g) < 0.1, torch.randint(0, 6, gt.shape, generator=g), pred)
    assert torch.equal(match_clusters(noisy, gt, 6, 6)[perm], torch.arange(6))


def test_match_clusters_majority_vote():
    # 5 clusters, 3 classes: each cluster's pixels split unevenly between classes
    counts = {0: {0: 10, 1: 3}, 1: {1: 7, 2: 6}, 2: {2: 9}, 3: {0: 2, 2: 5}, 4: {1: 4, 0: 1, 255: 50}}
    pred, gt = [], []
    for c, d in counts.items():
        for k, n in d.items():
            pred += [c] * n
            gt += [k] * n
    mapping = match_clusters(torch.tensor(pred), torch.tensor(gt), 5, 3)
    assert mapping.tolist() == [0, 1, 2, 2, 1]  # many-to-one: clusters 2 and 3 both become class 2
    # Hungarian (square) must not pick class 1 twice even if two clusters prefer it
    conf = torch.tensor([[0, 9, 1], [0, 8, 0], [7, 0, 0]])
    assert ke.match_from_confusion(conf).tolist() == [2, 1, 0]


def test_miou_hand_computed_and_absent_classes():
    # 4 classes; class 3 in neither prediction nor ground truth → left out of the mean (VOC)
    gt = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 3])
    conf = common.confusion_matrix(pred, gt, 4)
    miou, iou = common.miou_from_confusion(conf)
    # class 0: tp 2, fp 1, fn 1 → 2/4; class 1: tp 2, fp 1 → 2/3; class 2: tp 2, fn 1 → 2/3
    assert iou[:3].tolist() == pytest.approx([50.0, 200 / 3, 200 / 3])
    assert math.isnan(iou[3])
    assert miou == pytest.approx((50 + 400 / 3) / 3)
    # a class present in the ground truth but never predicted counts as 0, not as absent
    conf2 = common.confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]), 3)
    m2, iou2 = common.miou_from_confusion(conf2)
    assert iou2[1] == 0 and math.isnan(iou2[2]) and m2 == pytest.approx(25.0)


def test_histogram_scoring_equals_pixel_scoring():
    """The script scores from per-image class histograms; it must equal painting the pixels and counting them."""
    g = torch.Generator().manual_seed(1)
    n_img, n_classes, n_total = 12, 5, 5
    labels = [torch.randint(0, n_classes, (int(torch.randint(8, 20, (1,), generator=g)), 13), generator=g)
              for _ in range(n_img)]
    for y in labels:
        y[0] = 255
    fgs = [torch.rand(y.shape, generator=g) < 0.4 for y in labels]
    ids = torch.randint(1, n_total, (n_img,), generator=g)
    ids[3] = 0  # an image without foreground
    fgs[3][:] = False
    fg_hist = torch.stack([torch.bincount(y[f & (y != 255)], minlength=n_classes) for y, f in zip(labels, fgs)])
    bg_hist = torch.stack([torch.bincount(y[~f & (y != 255)], minlength=n_classes) for y, f in zip(labels, fgs)])
    conf_ids = ke.cluster_confusion(ids, fg_hist, bg_hist, n_total)
    mapping = ke.match_from_confusion(conf_ids)
    miou, iou = ke.score(conf_ids, mapping, n_classes)

    pred_ids = [torch.where(f, i, torch.zeros_like(y)) for y, f, i in zip(labels, fgs, ids)]
    flat_pred, flat_gt = torch.cat([p.flatten() for p in pred_ids]), torch.cat([y.flatten() for y in labels])
    assert torch.equal(match_clusters(flat_pred, flat_gt, n_total, n_classes), mapping)
    conf = common.confusion_matrix(mapping[flat_pred], flat_gt, n_classes)
    m_ref, iou_ref = common.miou_from_confusion(conf)
    assert miou == pytest.approx(m_ref) and torch.allclose(iou, iou_ref, equal_nan=True)


def test_kmeans_finds_planted_clusters_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g) * 6
    truth = torch.arange(6).repeat_interleave(50)
    x = centres[truth] + torch.randn(300, 16, generator=g)
    assign, c, inertia = ke.kmeans(x, 6, seed=3, restarts=4)
    # each planted blob is one cluster and no two blobs share one
    for b in range(6):
        assert len(assign[truth == b].unique()) == 1
    assert len(assign.unique()) == 6
    assert inertia == pytest.approx(float(((x - centres[truth]) ** 2).sum()), rel=0.1)
    again = ke.kmeans(x, 6, seed=3, restarts=4)
    assert torch.equal(again[0], assign) and torch.equal(again[1], c)
    # 300 random points, 20 clusters: different seeds generally differ, the same seed never does
    y = torch.randn(300, 8, generator=g)
    a1, a2 = ke.kmeans(y, 20, seed=1, restarts=1)[0], ke.kmeans(y, 20, seed=1, restarts=1)[0]
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, ke.kmeans(y, 20, seed=2, restarts=1)[0])


def test_pca_whitening():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 40, generator=g) @ torch.randn(40, 40, generator=g) + 3
    z = ke.pca_whiten(x.double(), 32)
    assert z.shape == (500, 32)
    cov = z.T @ z / (len(z) - 1)
    assert torch.allclose(cov, torch.eye(32, dtype=cov.dtype), atol=1e-6)
    # rank-deficient input: no exploding directions
    low = torch.randn(100, 3, generator=g) @ torch.randn(3, 32, generator=g)
    assert ke.pca_whiten(low.double(), 32).shape[1] == 3


def test_end_to_end_with_retrieval_and_the_overclustering_warning(tiny_root, pretrain_ck, tmp_path, capsys):
    out = tmp_path / "km"
    argv = ["--data-root", str(tiny_root), "--checkpoint", str(pretrain_ck), "--size", "32", "--workers", "0",
            "--n-seeds", "2", "--restarts", "2", "--clusters", "5", "7", "20", "--out", str(out), "--n-figures", "3"]
    res = ke.main(argv)
    printed = capsys.readouterr().out
    assert "K-Means 5" in printed and "retrieval" in printed
    saved = json.loads((out / "kmeans_eval.json").read_text())
    assert saved["clusters"]["5"]["matching"] == "hungarian" and saved["clusters"]["7"]["matching"] == "majority"
    assert "skipped" in saved["clusters"]["20"]  # 19 clusters for 8 prototypes: reported, not crashed
    assert len(saved["clusters"]["5"]["miou_per_seed"]) == 2
    assert 0 <= saved["clusters"]["5"]["miou_mean"] <= 100
    assert saved["with_foreground"] == 8  # every pixel is salient
    # 6 clusters for 8 prototypes: majority voting is nearly a labelling, and it says so; Hungarian matching is not
    assert "upper bound" in saved["clusters"]["7"]["warning"] and "warning" not in saved["clusters"]["5"]
    assert "warning: 6 clusters for 8 prototypes" in printed
    assert "5 classes" in saved["retrieval"] and res["retrieval"]["5 classes"]["bank_size"] == 12
    for png in ("kmeans_val.png", "retrieval.png"):
        assert (out / png).stat().st_size > 1000
    one_line_error(ke.main, argv, capsys, "holds a run already", "--resume")  # the finished run is kept
    # --resume reuses the prototypes and gives the same numbers
    again = ke.main(argv + ["--resume"])
    assert "prototypes reused" in capsys.readouterr().out
    assert json.dumps(again["clusters"]) == json.dumps(res["clusters"])  # NaN (an absent class) equals itself here


def test_baseline_with_mask_folder_and_dropped_images(tiny_root, tmp_path, capsys):
    """A model without saliency head reads mined masks; images mine_masks.py dropped count as no foreground, a mask
    missing for any other reason is an error."""
    masks = tmp_path / "mined" / "saliency_m"
    shutil.copytree(tiny_root / "saliency_oracle", masks)
    (masks / "val_0002.png").unlink()
    argv = ["--data-root", str(tiny_root), "--classes", "5", "--checkpoint", "random", "--arch", "resnet18",
            "--features", "backbone", "--saliency", "m", "--mask-root", str(tmp_path / "mined"), "--size", "32",
            "--workers", "0", "--n-seeds", "1", "--out", str(tmp_path / "o"), "--n-figures", "0",
            "--absent-classes", "skip"]
    one_line_error(ke.main, argv, capsys, "val_0002.png")
    (masks / "dropped.txt").write_text("val_0002\n")
    res = ke.main(argv + ["--resume"])
    assert res["with_foreground"] == 7 and res["clusters"]["5"]["miou_mean"] > 0
    assert "RANDOM-WEIGHTS BASELINE" in res["model"]
    again = ke.main([a if a != str(tmp_path / "o") else str(tmp_path / "o2") for a in argv])
    assert json.dumps(again["clusters"]) == json.dumps(res["clusters"])  # the same random network at every run
    # oracle foreground: background is exact wherever the dropped image has no object pixels
    assert res["clusters"]["5"]["per_class_iou_mean"]["background"] > 90


def test_bad_input_is_one_line(synth_root, pretrain_ck, tmp_path, capsys):
    base = ["--data-root", str(synth_root), "--size", "32", "--workers", "0", "--out", str(tmp_path / "o")]
    # no saliency head and no masks where mine_masks.py writes them by default
    rnd = ["--checkpoint", "random", "--arch", "resnet18"]
    one_line_error(ke.main, base + rnd + ["--features", "backbone"], capsys, "saliency_unsup: no masks",
                   "mine_masks.py")
    one_line_error(ke.main, base + rnd + ["--features", "backbone", "--foreground", "head", "--resume"], capsys,
                   "has no saliency head")
    # a layer the network never trained: a baseline's head, the saliency network's embedding head
    for features in ("head", "decoder"):
        one_line_error(ke.main, base + rnd + ["--features", features], capsys, f"--features {features}: random never "
                       "trained that layer", "use --features backbone --output-stride 16")
    # checkpoint of another architecture: --arch disagrees, or weights that do not fit the arch it names
    one_line_error(ke.main, base + ["--checkpoint", str(pretrain_ck), "--arch", "resnet50", "--resume"], capsys,
                   "holds a resnet18 model")
    wrong = tmp_path / "wrong.pth"
    common.save_checkpoint(wrong, "pretrain", model=common.SegModel("resnet34", 16).state_dict(),
                           args={"arch": "resnet18", "dim": 32})
    one_line_error(ke.main, base + ["--checkpoint", str(wrong), "--resume"], capsys, "do not fit")
    # a val split without labels: refused before anything is written
    nolab = tmp_path / "nolab"
    shutil.copytree(synth_root / "JPEGImages", nolab / "JPEGImages")
    shutil.copytree(synth_root / "ImageSets", nolab / "ImageSets")
    argv = ["--data-root", str(nolab), "--checkpoint", str(pretrain_ck), "--out", str(tmp_path / "o2")]
    one_line_error(ke.main, argv, capsys, "has no label")
    assert not (tmp_path / "o2").exists()


class ColourNet(torch.nn.Module):
    """A stand-in network whose 'backbone' features are the normalised image itself, at stride 1."""
    arch = "colour"

    def layer_features(self, x, layer):
        return x


def test_pixel_kmeans_of_perfect_features_recovers_permuted_labels(tmp_path):
    """Each class painted in its own colour, the labels a permutation of the colours: clustering the pixels and
    matching with Hungarian (background included) must score 100."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)]
    perm = [2, 0, 3, 1]  # colour i carries class perm[i]
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / d).mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    for n in range(4):
        colour = torch.randint(0, 4, (4, 4), generator=rng).repeat_interleave(6, 0).repeat_interleave(6, 1)
        img = torch.tensor(colours, dtype=torch.uint8)[colour]
        Image.fromarray(img.numpy()).save(tmp_path / "JPEGImages" / f"v{n}.png")
        common.save_label_png(torch.tensor(perm)[colour].numpy().astype("uint8"),
                              tmp_path / "SegmentationClass" / f"v{n}.png")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("\n".join(f"v{n}" for n in range(4)))
    samples = common.list_samples(tmp_path, "val", labels=True)
    reader = common.Reader(24, "bicubic", 2, 0, torch.device("cpu"), "none")
    runs, shown, n_fit = ke.pixel_kmeans(ColourNet(), samples, reader, "backbone", [4, 6],
                                         ke.Clustering([0, 1], fit_pixels=50), 4, keep=2)
    assert n_fit == 200 and len(shown) == 2
    for k in (4, 6):  # Hungarian with as many clusters as classes; majority vote when overclustering
        assert [r["miou"] for r in runs[k]] == [100.0, 100.0]
    i, y, pred = shown[0]
    assert torch.equal(pred, y)


def test_pixel_kmeans_of_a_baseline_backbone_at_stride_16(tiny_root, tmp_path, capsys):
    out = tmp_path / "px"
    res = ke.main(["--data-root", str(tiny_root), "--checkpoint", "random", "--arch", "resnet18", "--features",
                   "backbone", "--output-stride", "16", "--cluster", "pixels", "--clusters", "5", "8", "--size", "64",
                   "--n-seeds", "2", "--restarts", "1", "--fit-pixels", "10", "--workers", "0", "--out", str(out)])
    assert res["cluster"] == "pixels" and res["output_stride"] == 16 and len(res["weights"]) == 16
    assert res["fit_pixels"] == 8 * 10 and len(res["clusters"]["5"]["miou_per_seed"]) == 2
    assert res["clusters"]["8"]["matching"] == "majority" and 0 <= res["clusters"]["5"]["miou_mean"] <= 100
    assert json.loads((out / "kmeans_eval.json").read_text())["weights"] == res["weights"]
    assert (out / "kmeans_val.png").is_file()


def test_components_give_each_object_its_own_prototype(tmp_path):
    """Two objects of different classes per image, each class its own colour, features = colour: one prototype per
    component clusters and matches perfectly (100); one per image mixes the two classes and cannot."""
    colours = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "saliency_m"):
        (tmp_path / d).mkdir(parents=True)
    names = []
    for n, (a, b) in enumerate([(1, 2), (2, 3), (3, 1), (1, 3), (2, 1), (3, 2)]):
        label = torch.zeros(24, 24, dtype=torch.uint8)
        label[2:10, 2:10], label[14:22, 12:22] = a, b
        img = torch.full((24, 24, 3), 128, dtype=torch.uint8)
        for c, rgb in colours.items():
            img[label == c] = torch.tensor(rgb, dtype=torch.uint8)
        Image.fromarray(img.numpy()).save(tmp_path / "JPEGImages" / f"v{n}.png")
        common.save_label_png(label.numpy(), tmp_path / "SegmentationClass" / f"v{n}.png")
        common.save_mask_png(label.numpy() > 0, tmp_path / "saliency_m" / f"v{n}.png")
        names.append(f"v{n}")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("\n".join(names))
    samples = common.list_samples(tmp_path, "val", labels=True)
    for s in samples:
        s.saliency = tmp_path / "saliency_m" / f"{s.id}.png"
    reader = common.Reader(24, "bicubic", 3, 0, torch.device("cpu"), "none")
    miou = {}
    for objects in ("image", "components"):
        q = ke.extract_prototypes(ColourNet(), samples, reader, "backbone", ke.Objects(mode=objects), 4, keep=1)
        assert len(q["protos"]) == (6 if objects == "image" else 12) and q["bg_hist"].shape == (6, 4)
        runs = ke.run_clustering(q["protos"], torch.ones(len(q["protos"]), dtype=torch.bool), q, 4,
                                 ke.Clustering([0], restarts=5, iters=100), 4)
        miou[objects] = runs[0]["miou"]
        assert set(q["shown"][0][2].unique().tolist()) == ({0, 1} if objects == "image" else {0, 1, 2})
    assert miou["components"] == 100.0 and miou["image"] < 80
    for n, s in enumerate(samples):  # the same objects as a mask of ids (mine_masks.py's format) read the same
        label = common.read_label(s.label).numpy()
        common.save_objects_png((label > 0) * (1 + (np.arange(24)[None, :] >= 12)), s.saliency)
    q = ke.extract_prototypes(ColourNet(), samples, reader, "backbone", ke.Objects(mode="components"), 4)
    assert len(q["protos"]) == 12 and set(common.read_objects(samples[0].saliency).unique().tolist()) == {0, 1, 2}


class RedIsSalient(torch.nn.Module):
    """A stand-in network with a saliency head: the logit is the input's (normalised) red channel, the embedding its
    three channels; both at the input size, as SegModel's upsampled outputs."""

    def forward(self, x):
        return common.SegOutput(x, 4 * x[:, 0])


@pytest.mark.parametrize("resize", ["nearest", "bilinear"])
def test_head_foreground_is_brought_to_each_labels_size_as_fg_resize_says(tmp_path, resize):
    """--fg-resize nearest (as released): the logit thresholded at the input size, then resized nearest to the label;
    bilinear: the logit resized bilinearly to the label, then thresholded. The pixels counted as object are those."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / d).mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for n in range(2):  # 30×20 images of smooth red blobs, scored at 24²
        red = torch.nn.functional.interpolate(torch.rand(1, 1, 5, 4, generator=g), size=(30, 20), mode="bilinear")
        img = torch.cat([red, torch.zeros_like(red), torch.zeros_like(red)], 1)[0].permute(1, 2, 0)
        Image.fromarray((img * 255).byte().numpy()).save(tmp_path / "JPEGImages" / f"v{n}.png")
        common.save_label_png(torch.randint(0, 3, (30, 20), generator=g).numpy().astype("uint8"),
                              tmp_path / "SegmentationClass" / f"v{n}.png")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("v0\nv1")
    samples = common.list_samples(tmp_path, "val", labels=True)
    reader = common.Reader(24, "bicubic", 2, 0, torch.device("cpu"), "none")
    q = ke.extract_prototypes(RedIsSalient(), samples, reader, "head", ke.Objects(resize=resize), 3)
    for n, s in enumerate(samples):
        logit = RedIsSalient()(common.eval_transform(24)(common.read_image(s.image))[None]).saliency[None]
        if resize == "bilinear":
            fg = torch.nn.functional.interpolate(logit, size=(30, 20), mode="bilinear", align_corners=False) > 0.5
        else:
            fg = torch.nn.functional.interpolate((logit > 0.5).float(), size=(30, 20), mode="nearest") > 0
        y = common.read_label(s.label).long()
        assert 0 < fg.sum() < fg.numel()
        assert torch.equal(q["fg_hist"][n], torch.bincount(y[fg[0, 0]], minlength=3))
        assert torch.equal(q["bg_hist"][n], torch.bincount(y[~fg[0, 0]], minlength=3))
