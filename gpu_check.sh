#!/usr/bin/env bash
# The GPU questions, answered by one command on a machine that has this project's files and nothing else (no network,
# no ../shared): it generates its own synthetic data. About 8 minutes on one H100/H200.
#   (a) the five scripts end to end, in order, with their default flags but for sizes (every CUDA path runs once:
#       bf16 autocast, channels_last, pinned memory, the batched priors, GPU K-Means, the CRF), and the mined masks'
#       max-F;
#   (b) pretrain.py --benchmark at resnet50, 224², batch 64, bf16, 15 workers, on VOC-sized synthetic images: images/s,
#       peak memory, data-wait share, MFU; again with --compile, with --loss-res feature and with --amp fp16; and
#       --benchmark-data: view pairs/s per loader core, and of the colour augmentation on the GPU;
#   (c) K-Means of 1,449 × 32-d prototypes, 5 seeds, 21 and 500 clusters (kmeans_eval.kmeans, PCA-whitened first);
#   (d) the priors and the saliency network's prediction (resnet50, 224², flip TTA) in images/s.
# Writes OUT/gpu_check.json and prints one table with the targets.
#   bash gpu_check.sh                 # OUT=gpu_check_out
#   bash gpu_check.sh --cpu           # the same path at toy sizes on a CPU (the tests run this)
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
exec python3 - "$@" <<'EOF'
import argparse, json, os, shutil, sys, time
from pathlib import Path

import torch

sys.path.insert(0, os.getcwd())
import common, finetune, kmeans_eval, linear_eval, mine_masks, pretrain

p = argparse.ArgumentParser()
p.add_argument("--cpu", action="store_true", help="toy sizes on the CPU")
p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
cpu = p.parse_args().cpu
out = Path(p.parse_args().out).resolve()
device = "cpu" if cpu else "cuda"
if not cpu and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device; run it with --cpu for the CPU path")
common.prepare_out(out, resume=False, marks=["gpu_check.json"])
res, t_start = {"device": "cpu" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__}, time.time()
# sizes: (images train/val, image size, network input, arch, epochs, batch)
S = dict(train=16, val=8, img=48, net=32, arch="resnet18", batch=8, iters=1) if cpu else \
    dict(train=96, val=32, img=128, net=96, arch="resnet50", batch=32, iters=20)


def stage(name, main, argv):
    """Run one script's main() in this process; a failure is recorded and the check goes on with the next."""
    t = time.time()
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    try:
        return main(argv + ["--device", device, *(["--workers", "0"] if cpu else [])])
    except (Exception, SystemExit) as e:  # everything: one failed stage must not cost the rest of a GPU lease
        res.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
        print(f"!!! {name} failed: {type(e).__name__}: {e}", flush=True)
    finally:
        res.setdefault("seconds", {})[name] = round(time.time() - t, 1)


# (a) the default sequence of the five scripts on synthetic data, in a folder of its own (their outputs go to runs/)
data = common.make_synthetic_voc(out / "data", n_train=S["train"], n_val=S["val"], size=S["img"], seed=0)
os.chdir(out)
sizes = ["--arch", S["arch"], "--size", str(S["net"])]
# (the CPU toy mines with the priors alone: a network trained for a few CPU steps predicts no object yet)
stage("mine_masks", mine_masks.main, ["--data-root", str(data), *sizes, "--prior-size", str(S["net"]),
                                      "--batch-size", str(S["batch"]), "--eval-masks", str(data / "saliency_oracle"),
                                      *(["--rounds", "0"] if cpu else [])])
if (out / "runs/mine_masks/summary.json").is_file():
    summary = json.loads((out / "runs/mine_masks/summary.json").read_text())
    res["mined_max_f"] = summary["stages"]["final_masks"]["max_f"]
    res["mined_prior_max_f"] = summary["stages"]["priors"]["max_f"]
else:  # go on with the oracle masks, so that the later stages still run
    shutil.copytree(data / "saliency_oracle", data / "saliency_unsup", dirs_exist_ok=True)
stage("pretrain", pretrain.main, ["--data-root", str(data), *sizes, "--batch-size", str(S["batch"]),
                                  *(["--epochs", "1"] if cpu else [])])  # on the GPU the default 60 epochs: seconds
ck = "runs/pretrain/checkpoint.pth"
r = stage("linear_eval", linear_eval.main, ["--data-root", str(data), "--checkpoint", ck, "--size", str(S["net"]),
                                            "--epochs", "1", "--batch-size", str(S["batch"]), "--crf"])
if r:
    res["lc_miou"], res["lc_crf_miou"] = r["miou"], r["miou_crf"]
# (the CPU toy's three pretraining steps have not taught the saliency head yet: K-Means takes the mined masks there)
r = stage("kmeans_eval", kmeans_eval.main, ["--data-root", str(data), "--checkpoint", ck, "--size", str(S["net"]),
                                            *(["--foreground", "masks"] if cpu else [])])
if r:
    res["kmeans_miou"] = r["clusters"][str(len(common.SYNTH_CLASSES))]["miou_mean"]
stage("finetune", finetune.main, ["--data-root", str(data), "--checkpoint", ck, *sizes, "--iters", str(S["iters"]),
                                  "--splits", "1"])

# (b) the pretraining step on VOC-sized images (448², about the pixels of VOC's 500×375)
big = common.make_synthetic_voc(out / "voc_sized", n_train=16 if cpu else 256, n_val=1, size=64 if cpu else 448,
                                seed=1)
pipeline = ["--data-root", str(big), "--saliency", "oracle"] + (
    ["--arch", "resnet18", "--size", "32", "--batch-size", "8"] if cpu else
    ["--arch", "resnet50", "--size", "224", "--batch-size", "64", "--workers", "15"])
bench = pipeline + ["--benchmark", "1" if cpu else "30"]
for name, extra in [("eager", []), ("compile", ["--compile"]), ("loss_res_feature", ["--loss-res", "feature"]),
                    ("fp16", ["--amp", "fp16"])]:
    if cpu and name != "eager":
        continue  # on a CPU: compiling takes minutes, fp16 is a CUDA path, and the stride-8 loss is tested elsewhere
    if stage(f"benchmark_{name}", pretrain.main, bench + extra + ["--out", f"bench_{name}"]):
        res[f"pretrain_{name}"] = json.loads((out / f"bench_{name}" / "benchmark.json").read_text())

if stage("benchmark_data", pretrain.main, pipeline + ["--benchmark-data", "32" if cpu else "300", "--out",
                                                     "bench_data"]):
    res["data_pipeline"] = json.loads((out / "bench_data" / "benchmark_data.json").read_text())

# (c) K-Means as kmeans_eval runs it: 1,449 prototypes (VOC val), PCA-whitened, 5 seeds × 10 restarts
dev = torch.device(device)
x = torch.nn.functional.normalize(torch.randn(200 if cpu else 1449, 32, generator=torch.Generator().manual_seed(0)),
                                  dim=1).to(dev)
x = kmeans_eval.pca_whiten(x, 32)
for k in ([21, 50] if cpu else [21, 500]):
    t = time.time()
    for seed in range(1234, 1239):
        kmeans_eval.kmeans(x, k - 1, seed)
    if not cpu:
        torch.cuda.synchronize()
    res[f"kmeans_{k}_seconds"] = time.time() - t

# (d) the priors and the saliency network's prediction, 224² (toy: 48²)
images = mine_masks.load_resized([s.image for s in common.list_samples(big, "train")], 48 if cpu else 224,
                                 1 if cpu else 8)[0]
for name, prior in mine_masks.PRIORS.items():
    prior(images[:4].to(dev).float() / 255)  # warm-up
    t = time.time()
    for i in range(0, len(images), 32):
        prior(images[i:i + 32].to(dev).float() / 255)
    if not cpu:
        torch.cuda.synchronize()
    res[f"prior_{name}_img_per_s"] = len(images) / (time.time() - t)
net = common.SegModel(S["arch"]).to(dev)
mine_masks.predict_saliency(net, images[:8], images.shape[-1], 8, dev, "bf16", 32)  # warm-up
reps = 1 if cpu else 4
t = time.time()
for _ in range(reps):
    mine_masks.predict_saliency(net, images, images.shape[-1], 64, dev, "bf16", 32)
res["saliency_predict_img_per_s"] = reps * len(images) / (time.time() - t)

# the table
res["total_seconds"] = round(time.time() - t_start, 1)
common.write_json(out / "gpu_check.json", res)
rows = []
for name in ("eager", "compile", "loss_res_feature", "fp16"):
    b = res.get(f"pretrain_{name}")
    if b and name == "eager":
        rows += [("pretrain step, bf16 (images/s)", b["images_per_s"], ">= 1000"),
                 ("  peak memory (GiB)", b["peak_memory_gib"], ""),
                 ("  data wait (%)", 100 * b["data_wait_share"], "< 5"),
                 ("  MFU (%)", 100 * (b.get("mfu") or 0), "~25, goal 40")]
    elif b:
        rows.append((f"pretrain step, {name} (images/s)", b["images_per_s"], ""))
if "data_pipeline" in res:
    rows += [("loader: view pairs/s per core", res["data_pipeline"]["view_pairs_per_s_per_core"], ">= 200"),
             ("colour augmentation on the device (pairs/s)", res["data_pipeline"]["device_color_pairs_per_s"], "")]
rows += [(f"K-Means {k}, 5 seeds (s)", res[f"kmeans_{k}_seconds"], "< 5" if k == 21 else "")
         for k in ([21, 50] if cpu else [21, 500])]
rows += [(f"prior {n} (images/s)", res[f"prior_{n}_img_per_s"], ">= 200") for n in mine_masks.PRIORS]
rows.append(("saliency network, flip TTA (images/s)", res["saliency_predict_img_per_s"], ">= 500"))
if "mined_max_f" in res:
    rows.append(("mined masks max-F (priors / final)", f"{res['mined_prior_max_f']:.3f} / {res['mined_max_f']:.3f}",
                 ""))
if "lc_miou" in res and "kmeans_miou" in res:
    rows.append(("LC / LC+CRF / K-Means mIoU (toy)", f"{res['lc_miou']:.1f} / {res['lc_crf_miou']:.1f} / "
                                                    f"{res['kmeans_miou']:.1f}", ""))
rows += [(f"FAILED: {k}", v[:60], "") for k, v in res.get("failed", {}).items()]
print(f"\ngpu_check on {res['device']} (torch {res['torch']}), {res['total_seconds']} s → {out / 'gpu_check.json'}")
common.print_table(rows, ["measure", "value", "target"])
sys.exit(1 if res.get("failed") else 0)
EOF
