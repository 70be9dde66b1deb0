r"""The GPU questions, answered by one command on a machine that has this project's files and nothing else (no network,
no ../shared): it generates its own synthetic data.
  (a) the five scripts end to end, in order, with their default flags but for sizes (every CUDA path runs once:
      bf16 autocast, channels_last, pinned memory, the batched priors, GPU K-Means, the CRF), and the mined masks'
      max-F;
  (b) tools/bench_pretrain.py at resnet50, 224², batch 64, bf16, 15 workers, on VOC-sized synthetic images: images/s,
      peak memory, data-wait share, MFU and the profiler's top operators (OUT/bench_eager/profile.txt); again with
      --loss-res feature and with --amp fp16; --data: view pairs/s per loader core, and of the colour
      augmentation on the GPU;
  (c) K-Means of 1,449 × 32-d prototypes, 5 seeds, 21 and 500 clusters (kmeans_eval.kmeans, PCA-whitened first);
  (d) the priors and the saliency network's prediction (resnet50, 224², flip TTA) in images/s;
  (e) the pretraining step again with --compile (last: compiling takes the longest).
Writes OUT/gpu_check.json after every part (a run stopped early keeps what it measured) and prints one table with the
targets.
  python tools/gpu_check.py                 # OUT=gpu_check_out
  python tools/gpu_check.py --parts b e     # only these parts (a rerun of what failed)
  python tools/gpu_check.py --cpu           # the same path at toy sizes on a CPU (the tests run this)
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import bench_pretrain  # noqa: E402
import common  # noqa: E402
import finetune  # noqa: E402
import kmeans_eval  # noqa: E402
import linear_eval  # noqa: E402
import mine_masks  # noqa: E402
import pretrain  # noqa: E402
import synthetic  # noqa: E402


def stage(res, out, name, main, argv, device):
    """Run one script's main() in this process; a failure is recorded and the check goes on with the next. The
    results so far are written after each stage."""
    t = time.time()
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    try:
        return main(argv + ["--device", device, *(["--workers", "0"] if device == "cpu" else [])])
    except (Exception, SystemExit) as e:  # everything: one failed stage must not cost the rest of a GPU lease
        res.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
        print(f"!!! {name} failed: {type(e).__name__}: {e}", flush=True)
    finally:
        res.setdefault("seconds", {})[name] = round(time.time() - t, 1)
        common.write_json(out / "gpu_check.json", res)


def table(res, cpu):
    rows = []
    for name in ("eager", "compile", "loss_res_feature", "fp16"):
        b = res.get(f"pretrain_{name}")
        if b and name == "eager":
            rows += [("pretrain step, bf16 (images/s)", b["images_per_s"], ">= 1000"),
                     ("  the step alone, no loader (images/s)", b.get("step_only_images_per_s", 0), ""),
                     ("  peak memory (GiB)", b["peak_memory_gib"], ""),
                     ("  data wait (%)", 100 * b["data_wait_share"], "< 5"),
                     ("  MFU (%)", 100 * (b.get("mfu") or 0), "~25, goal 40")]
        elif b:
            rows.append((f"pretrain step, {name} (images/s)", b["images_per_s"], ""))
    if "data_pipeline" in res:
        rows += [("loader: view pairs/s per core", res["data_pipeline"]["view_pairs_per_s_per_core"], ">= 200"),
                 ("colour augmentation on the device (pairs/s)", res["data_pipeline"]["device_color_pairs_per_s"], "")]
    rows += [(f"K-Means {k}, 5 seeds (s)", res[f"kmeans_{k}_seconds"], "< 5" if k == 21 else "")
             for k in ([21, 50] if cpu else [21, 500]) if f"kmeans_{k}_seconds" in res]
    rows += [(f"prior {n}, batch {b} (images/s)", res[f"prior_{n}_img_per_s" + ("" if b == 32 else f"_batch{b}")],
              ">= 200") for n in mine_masks.PRIORS for b in (32, 256) if f"prior_{n}_img_per_s" in res]
    if "saliency_predict_img_per_s" in res:
        rows.append(("saliency network, flip TTA (images/s)", res["saliency_predict_img_per_s"], ">= 500"))
    if "mined_max_f" in res:
        rows.append(("mined masks max-F (priors / final)",
                     f"{res['mined_prior_max_f']:.3f} / {res['mined_max_f']:.3f}", ""))
    if "lc_miou" in res and "kmeans_miou" in res:
        rows.append(("LC / LC+CRF / K-Means mIoU (toy)",
                     f"{res['lc_miou']:.1f} / {res['lc_crf_miou']:.1f} / {res['kmeans_miou']:.1f}", ""))
    rows += [(f"FAILED: {k}", v[:60], "") for k, v in res.get("failed", {}).items()]
    return rows


def part_a(res, out, S, device):
    """The default sequence of the five scripts on synthetic data (their outputs go to OUT/runs/)."""
    cpu = device == "cpu"
    data = synthetic.make_synthetic_voc(out / "data", n_train=S["train"], n_val=S["val"], size=S["img"], seed=0)
    sizes = ["--arch", S["arch"], "--size", str(S["net"])]
    # (the CPU toy mines with the priors alone: a network trained for a few CPU steps predicts no object yet)
    stage(res, out, "mine_masks", mine_masks.main,
          ["--data-root", str(data), *sizes, "--prior-size", str(S["net"]), "--batch-size", str(S["batch"]),
           "--eval-masks", str(data / "saliency_oracle"), *(["--rounds", "0"] if cpu else [])], device)
    if (out / "runs/mine_masks/summary.json").is_file():
        summary = json.loads((out / "runs/mine_masks/summary.json").read_text())
        res["mined_max_f"] = summary["stages"]["final_masks"]["max_f"]
        res["mined_prior_max_f"] = summary["stages"]["priors"]["max_f"]
    else:  # go on with the oracle masks, so that the later stages still run
        shutil.copytree(data / "saliency_oracle", data / "saliency_unsup", dirs_exist_ok=True)
    stage(res, out, "pretrain", pretrain.main, ["--data-root", str(data), *sizes, "--batch-size", str(S["batch"]),
                                                *(["--epochs", "1"] if cpu else [])], device)  # GPU: 60 epochs
    ck = "runs/pretrain/checkpoint.pth"
    r = stage(res, out, "linear_eval", linear_eval.main,
              ["--data-root", str(data), "--checkpoint", ck, "--size", str(S["net"]), "--epochs", "1",
               "--batch-size", str(S["batch"]), "--crf"], device)
    if r:
        res["lc_miou"], res["lc_crf_miou"] = r["miou"], r["miou_crf"]
    # (the CPU toy's three pretraining steps have not taught the saliency head yet: K-Means takes the mined masks)
    r = stage(res, out, "kmeans_eval", kmeans_eval.main,
              ["--data-root", str(data), "--checkpoint", ck, "--size", str(S["net"]),
               *(["--foreground", "masks"] if cpu else [])], device)
    if r:
        res["kmeans_miou"] = r["clusters"][str(len(synthetic.CLASSES))]["miou_mean"]
    stage(res, out, "finetune", finetune.main, ["--data-root", str(data), "--checkpoint", ck, *sizes, "--iters",
                                                str(S["iters"]), "--splits", "1"], device)


def voc_sized(out, cpu):
    """256 synthetic images of 448² (about the pixels of VOC's 500×375), listed 8 times in the train split: an epoch
    of 32 batches, as on a real dataset (4 batches an epoch would measure the loader's restart, not its speed)."""
    big = out / "voc_sized"
    if not (big / "ImageSets").is_dir():
        synthetic.make_synthetic_voc(big, n_train=16 if cpu else 256, n_val=1, size=64 if cpu else 448, seed=1)
        split = big / "ImageSets" / "Segmentation" / "train.txt"
        split.write_text("\n".join(common.read_ids(split) * 8) + "\n")
    return big


def pipeline_args(out, cpu):
    return ["--data-root", str(voc_sized(out, cpu)), "--saliency", "oracle"] + (
        ["--arch", "resnet18", "--size", "32", "--batch-size", "8"] if cpu else
        ["--arch", "resnet50", "--size", "224", "--batch-size", "64", "--workers", "15"])


def part_b(res, out, device):
    """The pretraining step on VOC-sized images (eager with the profiler, stride-8 loss, fp16) and the loader."""
    cpu = device == "cpu"
    bench = pipeline_args(out, cpu) + ["--steps", "1" if cpu else "30"]
    runs = [("eager", ["--profile"]), ("loss_res_feature", ["--loss-res", "feature"]), ("fp16", ["--amp", "fp16"])]
    for name, extra in runs[:1] if cpu else runs:  # CPU: fp16 is a CUDA path, the stride-8 loss is tested apart
        if stage(res, out, f"benchmark_{name}", bench_pretrain.main, bench + extra + ["--out", f"bench_{name}"],
                 device):
            res[f"pretrain_{name}"] = json.loads((out / f"bench_{name}" / "benchmark.json").read_text())
    if stage(res, out, "benchmark_data", bench_pretrain.main,
             pipeline_args(out, cpu) + ["--data", "32" if cpu else "300", "--out", "bench_data"], device):
        res["data_pipeline"] = json.loads((out / "bench_data" / "benchmark_data.json").read_text())


def timed(f, reps, cuda):
    """Seconds per call of f() after one warm-up call."""
    f()
    if cuda:
        torch.cuda.synchronize()
    t = time.time()
    for _ in range(reps):
        f()
    if cuda:
        torch.cuda.synchronize()
    return (time.time() - t) / reps


def part_c(res, device):
    """K-Means as kmeans_eval runs it: 1,449 prototypes (VOC val), PCA-whitened, 5 seeds × 10 restarts."""
    cpu, dev = device == "cpu", torch.device(device)
    x = torch.randn(200 if cpu else 1449, 32, generator=torch.Generator().manual_seed(0))
    x = kmeans_eval.pca_whiten(torch.nn.functional.normalize(x, dim=1).to(dev), 32)
    for k in ([21, 50] if cpu else [21, 500]):
        t = time.time()
        for seed in range(1234, 1239):
            kmeans_eval.kmeans(x, k - 1, seed)
        if not cpu:
            torch.cuda.synchronize()
        res[f"kmeans_{k}_seconds"] = time.time() - t


def part_d(res, out, S, device):
    """The priors (batches of 32 and of 256 images) and the saliency network's prediction at 224² (toy: 48²), and the
    profiler's top operators of each (OUT/profile_mining.txt)."""
    cpu, dev = device == "cpu", torch.device(device)
    files = list(dict.fromkeys(s.image for s in common.list_samples(voc_sized(out, cpu), "train")))  # each once
    images = next(iter(mine_masks.chunk_images(files[:256], 48 if cpu else 224, [(0, 0, min(256, len(files)))],
                                               0 if cpu else 8)))
    x = images.to(dev).float() / 255
    profiles = []
    for name, prior in mine_masks.PRIORS.items():
        for batch in (32, 256):
            sec = timed(lambda: prior(x[:batch]), 1 if cpu else 2, not cpu)  # noqa: B023 (called at once)
            res[f"prior_{name}_img_per_s" + ("" if batch == 32 else f"_batch{batch}")] = min(batch, len(x)) / sec
        profiles.append((f"prior {name}, 32 images", lambda prior=prior: prior(x[:32])))
    net = common.SegModel(S["arch"]).to(dev)
    predict = lambda: mine_masks.predict_saliency(net, images, images.shape[-1], 64, dev, "bf16", 32)  # noqa: E731
    res["saliency_predict_img_per_s"] = len(images) / timed(predict, 1 if cpu else 3, not cpu)
    profiles.append(("saliency network, flip TTA, 256 images in batches of 64", predict))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([] if cpu else [torch.profiler.ProfilerActivity.CUDA])
    with open(out / "profile_mining.txt", "w") as f:
        for title, fn in profiles:
            with torch.profiler.profile(activities=activities) as prof:
                fn()
                if not cpu:
                    torch.cuda.synchronize()
            sort = "self_cpu_time_total" if cpu else "self_device_time_total"
            f.write(f"== {title}\n{prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60)}\n")


def part_e(res, out, device):
    """torch.compile of both networks: minutes of compiling on a first run, so last (CPU: skipped)."""
    bench = pipeline_args(out, False) + ["--steps", "30", "--compile", "--out", "bench_compile"]
    if stage(res, out, "benchmark_compile", bench_pretrain.main, bench, device):
        res["pretrain_compile"] = json.loads((out / "bench_compile" / "benchmark.json").read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--cpu", action="store_true", help="toy sizes on the CPU")
    p.add_argument("--out", default="gpu_check_out", help="data, runs and gpu_check.json")
    p.add_argument("--parts", nargs="+", default=list("abcde"), choices=list("abcde"), help="the parts to run")
    args = p.parse_args(argv)
    cpu, out = args.cpu, Path(args.out).resolve()
    device = "cpu" if cpu else "cuda"
    if not cpu and not torch.cuda.is_available():
        sys.exit("gpu_check.py: torch sees no CUDA device; run it with --cpu for the CPU path")
    common.prepare_out(out, resume=False, marks=["gpu_check.json"])
    res, t_start = {"device": "cpu" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__}, time.time()
    # sizes: (images train/val, image size, network input, arch, batch, fine-tuning iterations)
    S = dict(train=16, val=8, img=48, net=32, arch="resnet18", batch=8, iters=1) if cpu else \
        dict(train=96, val=32, img=128, net=96, arch="resnet50", batch=32, iters=20)
    cwd = os.getcwd()
    os.chdir(out)  # the scripts write to runs/ under the current folder
    try:
        if "a" in args.parts:
            part_a(res, out, S, device)
        if "b" in args.parts:
            part_b(res, out, device)
        if "c" in args.parts:
            part_c(res, device)
        if "d" in args.parts:
            part_d(res, out, S, device)
        common.write_json(out / "gpu_check.json", res)
        if "e" in args.parts and not cpu:
            part_e(res, out, device)
    finally:
        os.chdir(cwd)

    res["total_seconds"] = round(time.time() - t_start, 1)
    common.write_json(out / "gpu_check.json", res)
    print(f"\ngpu_check on {res['device']} (torch {res['torch']}), {res['total_seconds']} s → "
          f"{out / 'gpu_check.json'}")
    common.print_table(table(res, cpu), ["measure", "value", "target"])
    return res


if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)
