r"""The speed of pretrain.py's training step on the real pipeline (paper-sized: resnet50, 224², batch 64 by default):
images/s with the loader and of the step alone, peak memory, the share of the time spent waiting for data, the MFU
(FLOPs counted by torch's FlopCounterMode), and with --profile the profiler's top operators; with --data N, the data
pipeline alone (view pairs/s per loader core, and of the colour augmentation on the device). Every other flag is
pretrain.py's, and sets up exactly what it would train.
  python tools/bench_pretrain.py --steps 50 --profile --data-root VOC            # OUT/benchmark.json, profile.txt
  python tools/bench_pretrain.py --data 500 --data-root VOC                      # OUT/benchmark_data.json
"""
import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import pretrain  # noqa: E402


def step_flops(model, batch, step, compiled):
    """FLOPs of one training step (query forward and backward, key forward), counted by torch's FlopCounterMode in
    eager mode; None for a compiled model on a torch that cannot run it eagerly (< 2.6)."""
    if compiled and not hasattr(torch.compiler, "set_stance"):
        step(model(*batch)[0])
        return None
    eager = torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
    with eager, FlopCounterMode(display=False) as counter:
        step(model(*batch)[0])
    return counter.get_total_flops()


def endless(loader, sampler):
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def benchmark(setup, steps, peak_tflops, profile=None, warmup=5):
    """Time `steps` training steps after `warmup`: images/s, peak memory, the share of the time spent waiting for the
    loader (each step synchronised, so that waiting is measured against finished GPU work), the MFU, and the images/s
    of the step alone (no loader: the last batch again). With a `profile` path, 5 more steps run under torch.profiler
    and its table of the top 30 operators by device (CPU) time goes there: what limits the step."""
    model, loader, sampler, step, world = (setup[k] for k in ("model", "loader", "sampler", "step", "world"))
    channels_last, amp, compiled = setup["channels_last"], setup["args"].amp, setup["args"].compile
    device, cuda = world.device, world.device.type == "cuda"
    warmup = min(warmup, steps)
    batches = endless(loader, sampler)
    model.train()
    flops = None
    wait = 0.0
    for i in tqdm(range(warmup + steps), desc="benchmark", disable=not world.is_main):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            wait, start = 0.0, time.perf_counter()
        t = time.perf_counter()
        batch = pretrain.to_device_views(next(batches), device, channels_last)
        wait += time.perf_counter() - t
        with common.autocast(device, amp):
            if i == 0:
                flops = step_flops(model, batch, step, compiled)
            else:
                step(model(*batch)[0])
        if cuda:
            torch.cuda.synchronize()
    total = time.perf_counter() - start
    images = steps * len(batch[0]) * world.size
    # the step alone, on the last batch again: the GPU's ceiling for this step, whatever the loader does
    step_start = time.perf_counter()
    for _ in range(min(steps, 10)):
        with common.autocast(device, amp):
            step(model(*batch)[0])
    if cuda:
        torch.cuda.synchronize()
    step_only = min(steps, 10) * len(batch[0]) * world.size / (time.perf_counter() - step_start)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "steps": steps, "images_per_s": images / total,
           "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else
                               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20),
           "data_wait_share": wait / total, "step_only_images_per_s": step_only,
           "gflop_per_image": flops / len(batch[0]) / 1e9 if flops else None}
    if flops:
        res["tflop_per_s"] = res["gflop_per_image"] * res["images_per_s"] / 1e3
        res["mfu"] = res["tflop_per_s"] / peak_tflops if peak_tflops else None
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                batch = pretrain.to_device_views(next(batches), device, channels_last)
                with common.autocast(device, amp):
                    step(model(*batch)[0])
            if cuda:
                torch.cuda.synchronize()
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        Path(profile).write_text(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))
    common.print_table([[res["device"], res["images_per_s"], res["step_only_images_per_s"], res["peak_memory_gib"],
                         100 * res["data_wait_share"], res.get("tflop_per_s") or "-",
                         100 * res["mfu"] if res.get("mfu") else "-"]],
                       ["device", "images/s", "step alone", "peak GiB" + (" (GPU)" if cuda else " (RSS)"),
                        "data wait %", "TFLOP/s", "MFU %"])
    return res


def benchmark_data(dataset, n, batch_size, device):
    """The data pipeline alone: `n` view pairs drawn in this process on one thread (a loader worker's share: decode,
    crop, flip, area check, colour parameters), then the batched colour augmentation of `batch_size` pairs on the
    device. Returns view pairs/s for each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    items = [dataset[(i % len(dataset), i)] for i in tqdm(range(n), desc="view pairs", leave=False)]
    per_core = n / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    batch = [torch.stack(t) for t in zip(*(items * (batch_size // len(items) + 1))[:batch_size])]
    for i in range(6):  # one warm-up, then five timed
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        pretrain.to_device_views(batch, device, channels_last=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    res = {"view_pairs_per_s_per_core": per_core,
           "device_color_pairs_per_s": 5 * batch_size / (time.perf_counter() - start), "device": str(device)}
    common.print_table([[res["view_pairs_per_s_per_core"], res["device_color_pairs_per_s"], res["device"]]],
                       ["loader: view pairs/s per core", "colour on the device: pairs/s", "device"])
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--steps", type=common.positive_int, default=30, help="training steps timed after 5 of warm-up")
    p.add_argument("--data", type=common.nonnegative_int, default=0, metavar="N",
                   help="time the data pipeline alone on N view pairs instead")
    p.add_argument("--profile", action="store_true", help="profile 5 more steps: OUT/profile.txt")
    p.add_argument("--peak-tflops", type=common.positive_float, default=790.0, help="the GPU's bf16 matmul peak for "
                   "the MFU (790: what an 8192³ bf16 matmul reached on an H200)")
    a, rest = p.parse_known_args(argv)
    rest = rest + (["--out", "runs/bench_pretrain"] if "--out" not in rest else [])

    def run(setup):
        out = Path(setup["args"].out)
        if a.data:
            res = benchmark_data(setup["dataset"], a.data, setup["loader"].batch_size, setup["world"].device)
            common.write_json(out / "benchmark_data.json", {**res, "args": vars(setup["args"])})
            return res
        res = benchmark(setup, a.steps, a.peak_tflops, out / "profile.txt" if a.profile else None)
        if setup["world"].is_main:
            common.write_json(out / "benchmark.json", {**res, "args": vars(setup["args"])})
        return res

    return pretrain.main(rest, hook=run)


if __name__ == "__main__":
    common.run_main(main)
