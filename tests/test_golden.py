"""The release's own outputs on fixed inputs (tests/golden, computed by its code at commit dfd5fa0): the loss, the
model's structure, the mask post-processing, the K-Means and retrieval scoring. Each test fails if the function it
pins changes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import kmeans_eval
import mine_masks
import pretrain

GOLDEN = Path(__file__).parent / "golden"


def golden(name):
    return json.loads((GOLDEN / f"{name}.json").read_text())


def bits(rows):
    """'0'/'1' strings, one per row → bool tensor."""
    return torch.tensor([[c == "1" for c in r] for r in rows])


@pytest.mark.parametrize("case", golden("loss")["cases"], ids=lambda c: c["name"])
def test_loss_prototypes_bce_and_queue_equal_the_release(case):
    inp, rel = case["inputs"], case["release"]
    q, k = (torch.tensor(inp[n], dtype=torch.float32).double() for n in ("q", "k"))
    queue = torch.tensor(inp["queue"], dtype=torch.float32).double()
    s_q, s_k = torch.stack([bits(m) for m in inp["s_q"]]), torch.stack([bits(m) for m in inp["s_k"]])
    loss, p_k = pretrain.maskcontrast_loss(F.normalize(q, dim=1), F.normalize(k, dim=1), s_q, s_k, queue, 0.5, "enet")
    assert abs(loss.item() - rel["contrastive_loss"]) < 1e-6
    assert torch.allclose(p_k, torch.tensor(rel["p_k"], dtype=torch.float64), atol=1e-8)
    aux = torch.tensor(inp["saliency_logits"], dtype=torch.float32).double()
    assert abs(pretrain.saliency_loss(aux, s_q).item() - rel["saliency_loss"]) < 1e-8
    # the queue after one enqueue: the prototypes overwrite columns ptr..ptr+N-1 (modulo K)
    model = pretrain.MaskContrast(common.SegModel("resnet18", case["D"]), pretrain.Contrast(queue_size=case["K"]))
    model = model.double()
    model.queue.copy_(queue)
    model.queue_ptr.fill_(inp["queue_ptr"])
    model.enqueue(p_k)
    assert torch.allclose(model.queue, torch.tensor(rel["queue_after"], dtype=torch.float64), atol=1e-8)
    assert int(model.queue_ptr) == rel["queue_ptr_after"]


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_model_structure_equals_the_release(arch):
    ref = golden("model_structure")["models"][arch]
    model = common.SegModel(arch, 32, saliency_head=True)
    rename = {"classification_head.weight": "saliency_head.weight"}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {rename.get(n, n): tuple(shape) for n, shape, _ in ref["state_dict"]}
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == ref["n_parameters"]
    convs = dict(model.named_modules())
    for name, cin, cout, kernel, stride, dilation, padding, bias in ref["conv2d"]:
        m = convs[{"classification_head": "saliency_head"}.get(name, name)]
        assert (m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride), list(m.dilation),
                list(m.padding), m.bias is not None) == (cin, cout, kernel, stride, dilation, padding, bias), name


@pytest.mark.parametrize("case", golden("postprocess")["maps"], ids=lambda c: c["name"])
def test_postprocess_equals_the_release(case):
    mask, share, reason = mine_masks.postprocess(np.array(case["map"], dtype=np.float64) / 255.0)
    assert (reason is None) == case["release"]["kept"]
    if case["release"]["kept"]:
        assert np.array_equal(mask, bits(case["release"]["mask"]).numpy())


def kmeans_histograms(images, n_classes=21):
    code = ".abcdefghijklmnopqrst"
    fg_hist, bg_hist = [], []
    for im in images:
        y = torch.tensor([[255 if c == "#" else code.index(c) for c in row] for row in im["gt"]])
        fg = bits(im["foreground"])
        valid = y != 255
        fg_hist.append(torch.bincount(y[fg & valid], minlength=n_classes))
        bg_hist.append(torch.bincount(y[~fg & valid], minlength=n_classes))
    return torch.stack(fg_hist), torch.stack(bg_hist)


def test_kmeans_scoring_equals_the_release():
    km = golden("kmeans_eval")["kmeans"]
    rel = km["release"]
    fg_hist, bg_hist = kmeans_histograms(km["images"])
    ids = torch.tensor([im["cluster_id"] for im in km["images"]])
    conf = kmeans_eval.cluster_confusion(ids, fg_hist, bg_hist, 21)
    assert conf.tolist() == rel["cluster_class_confusion"]
    mapping = kmeans_eval.match_from_confusion(conf)
    determined = torch.tensor(rel["mapping_determined"])
    assert torch.equal(mapping[determined], torch.tensor(rel["hungarian_mapping"])[determined])
    miou, iou = kmeans_eval.score(conf, mapping, 21, absent="zero")
    assert torch.allclose(iou.nan_to_num(0) / 100, torch.tensor(rel["per_class_iou"], dtype=torch.float64),
                          atol=1e-9)
    assert miou / 100 == pytest.approx(rel["miou"], abs=1e-9)  # the release's rule: absent classes count 0
    assert kmeans_eval.score(conf, mapping, 21)[0] / 100 == pytest.approx(rel["miou_absent_left_out"], abs=1e-9)


@pytest.mark.parametrize("variant", ["21_classes", "7_classes"])
def test_retrieval_equals_the_release(variant):
    g = golden("kmeans_eval")
    r, km = g["retrieval"], g["kmeans"]
    rel = r["variants"][variant]["release"]
    classes = None if variant == "21_classes" else [g["classes"].index(c) for c in r["variants"][variant]
                                                    ["scored_classes"]]
    fg_b, _ = kmeans_histograms(r["bank"])
    bank = {"protos": torch.tensor([b["prototype"] for b in r["bank"]], dtype=torch.float32), "fg_hist": fg_b,
            "has_fg": torch.stack([bits(b["foreground"]).any() for b in r["bank"]])}
    fg_q, bg_q = kmeans_histograms(km["images"])
    query = {"protos": torch.tensor(r["query_prototypes"], dtype=torch.float32), "fg_hist": fg_q, "bg_hist": bg_q,
             "has_fg": torch.stack([bits(im["foreground"]).any() for im in km["images"]])}
    out = kmeans_eval.retrieval(bank, query, 21, classes, absent="zero")
    assert out["labels"].tolist() == rel["bank_labels"]  # the majority-vote tie goes to the larger class, as there
    assert out["pred"].tolist() == rel["predicted_class_per_query"]
    assert out["miou"] / 100 == pytest.approx(rel["miou"], abs=1e-9)
