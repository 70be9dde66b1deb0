r"""The release's evaluation details against ours, measured on one fixed network (issue: "the release's evaluation
details"): the image resize (OpenCV-style bicubic vs antialiased bilinear), the K-Means foreground at the label's size
(thresholded then nearest vs bilinear logits then thresholded), and the scoring precision (fp32 vs bf16 autocast).
One linear classifier is trained once and scored under each setting (--resume re-scores a finished run whose
scoring settings changed); K-Means runs once per setting. On a CPU, bf16 is CPU autocast standing in for CUDA's.
  python tools/compare_eval_details.py --data-root ../shared/data/voc_mini --checkpoint runs/pretrain/checkpoint.pth
Writes OUT/compare_eval_details.json and prints one table.
"""
import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import kmeans_eval  # noqa: E402
import linear_eval  # noqa: E402


def cpu_autocast(device, amp):
    """common.autocast, with bf16 autocast on the CPU too (the scripts keep the CPU in fp32)."""
    if device.type == "cpu" and amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return real_autocast(device, amp) if device.type == "cuda" else contextlib.nullcontext()


real_autocast = common.autocast


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--checkpoint", required=True, help="a pretrain.py checkpoint (head and saliency head trained)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--lc-epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/compare_eval_details")
    a = p.parse_args(argv)
    out = Path(a.out)
    common.prepare_out(out, resume=False, marks=["compare_eval_details.json"])
    common.autocast = cpu_autocast
    base = ["--data-root", a.data_root, "--checkpoint", a.checkpoint, "--size", str(a.size), "--workers",
            str(a.workers), "--n-figures", "0"]
    lc = base + ["--train-split", "train", "--epochs", str(a.lc_epochs), "--lr-step", str(a.lc_epochs),
                 "--out", str(out / "lc")]
    res = {}
    res["lc release (bicubic, fp32)"] = linear_eval.main(lc)["miou"]
    res["lc bilinear resize"] = linear_eval.main(lc + ["--resume", "--resize", "bilinear"])["miou"]
    res["lc bf16 scoring"] = linear_eval.main(lc + ["--resume", "--amp", "bf16"])["miou"]
    km = base + ["--retrieval-split", "none", "--clusters", "21"]
    settings = [("release (bicubic, nearest foreground, fp32)", []), ("bilinear resize", ["--resize", "bilinear"]),
                ("bilinear foreground", ["--fg-resize", "bilinear"]), ("bf16", ["--amp", "bf16"])]
    for name, extra in settings:
        r = kmeans_eval.main(km + extra + ["--out", str(out / f"km_{len(res)}")])["clusters"]["21"]
        res[f"kmeans {name}"] = r["miou_mean"]
    common.write_json(out / "compare_eval_details.json", {"miou": res, "args": vars(a)})
    common.print_table([(k, v) for k, v in res.items()], ["setting", "mIoU %"])
    return res


if __name__ == "__main__":
    common.run_main(main)
