"""GPU figures in one short run (issue 15.4): network throughput, sampler share, whole-CT denoising.

    python benchmarks/gpu.py [--budget-s 420] [--model PATH] [--smoke]

1. Network throughput of the ``base1mm`` and ``paper`` networks (no grad): windows/s and
   megavoxels/s at 32^3 and 64^3 for batch sizes 1, 4 and 16, in float32 and bfloat16 autocast
   (channels-last-3D weights), and ``torch.compile`` at the largest batch; peak memory. Ratios are
   to float32 batch 1 of the same network and size, measured in the same run.
2. Whole CT: denoising a synthetic 512 x 512 x 300 CT (0.7 x 0.7 x 1 mm, soft tissue in a body
   outline) with the 1 mm model at the CLI's defaults and at 4 steps: seconds, windows, network
   evaluations, the share of the time spent inside network calls, peak memory.

Measurements stop starting once ``--budget-s`` has passed, so the run fits a short device loan;
each table says what was skipped. ``--smoke`` shrinks everything so the script can be checked on a
CPU. Nothing is asserted; the numbers go into benchmarks/README.md with the date and the machine.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffFMLib.device import select_device  # noqa: E402
from MedDiffFMLib.model import load_model, untrained_model  # noqa: E402
from MedDiffFMLib.model.embeddings import window_coordinates  # noqa: E402
from MedDiffFMLib.tasks import Engine, denoise  # noqa: E402
from MedDiffFMLib.volume import Volume  # noqa: E402

ONE_MM_MODEL = ROOT / "models" / "meddiff-fm-1mm-0.3.safetensors"


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    @property
    def left(self) -> bool:
        return time.monotonic() < self.deadline


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def inputs(model, size: int, batch: int, device: torch.device) -> tuple:
    coordinates = window_coordinates([slice(0, size)] * 3, [size] * 3)[None].expand(batch, -1, -1, -1, -1)
    return (
        torch.randn(batch, 1, size, size, size, device=device),
        torch.full((batch,), 500, device=device),
        coordinates.to(device),
        torch.full((batch,), 2, device=device),
        torch.zeros(batch, size, size, size, dtype=torch.long, device=device),
    )


def time_network(network, arguments: tuple, device: torch.device, bf16: bool, repeats: int) -> float:
    """Seconds per call (after two warm-up calls)."""
    context = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), context:
        for _ in range(2):
            network(*arguments)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            network(*arguments)
        synchronize(device)
    return (time.perf_counter() - started) / repeats


def bench_throughput(device: torch.device, budget: Budget, smoke: bool) -> None:
    sizes, batches, repeats = ((16,), (1, 2), 1) if smoke else ((32, 64), (1, 4, 16), 5)
    presets = ("tiny",) if smoke else ("base1mm", "paper")
    print("\n### 1. Network throughput (no grad)\n")
    print("| network | window | batch | precision | compile | windows/s | Mvoxel/s | vs fp32 batch 1 | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        model = untrained_model(preset).to(device).eval()
        channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
        for size in sizes:
            baseline = None
            settings = [(b, p, False) for b in batches for p in ("fp32", "bf16")] + [(batches[-1], "bf16", True)]
            for batch, precision, compiled in settings:
                if not budget.left:
                    print(f"| {preset} | {size}^3 | {batch} | {precision} | {compiled} | skipped: time budget spent |")
                    continue
                network = channels_last if precision == "bf16" else model
                if compiled:
                    network = torch.compile(network)
                reset_peak(device)
                try:
                    seconds = time_network(
                        network, inputs(model, size, batch, device), device, precision == "bf16", repeats
                    )
                except torch.OutOfMemoryError:
                    print(f"| {preset} | {size}^3 | {batch} | {precision} | {compiled} | out of memory |")
                    continue
                rate = batch / seconds
                baseline = baseline or rate
                print(
                    f"| {preset} | {size}^3 | {batch} | {precision} | {compiled} | {rate:.1f} | "
                    f"{rate * size**3 / 1e6:.1f} | {rate / baseline:.2f}x | {peak_mb(device)} |",
                    flush=True,
                )


def synthetic_ct(smoke: bool) -> Volume:
    shape = (12, 64, 64) if smoke else (300, 512, 512)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) / (0.42 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.46 * shape[2])) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + np.random.default_rng(0).normal(0, 25, shape) * body
    return Volume(np.broadcast_to(hu, shape).astype(np.float32), spacing=(0.7, 0.7, 1.0))


def bench_whole_ct(device: torch.device, budget: Budget, weights: Path | None, smoke: bool) -> None:
    print("\n### 2. Whole CT: denoising 512 x 512 x 300 (0.7 x 0.7 x 1 mm), synthetic content\n")
    print("| model | steps | batch | seconds | windows evaluated | share in network | peak MB |")
    print("|---|---|---|---|---|---|---|")
    if smoke:
        model, name = untrained_model("tiny"), "untrained tiny"
    elif weights and weights.exists():
        model, name = load_model(weights), weights.name
    else:
        model, name = untrained_model("base1mm"), "untrained base1mm (same cost as trained)"
    ct = synthetic_ct(smoke)
    for steps, batch in ((10, 16), (4, 16)) if not smoke else ((1, 2),):
        if not budget.left:
            print(f"| {name} | {steps} | {batch} | skipped: time budget spent |")
            continue
        engine = Engine(model, device=device, batch_size=batch, overlap=0.25)
        inside = [0.0]
        network = engine.network

        def timed(*arguments, _network=network, _inside=inside, **options):
            synchronize(device)
            started = time.perf_counter()
            result = _network(*arguments, **options)
            synchronize(device)
            _inside[0] += time.perf_counter() - started
            return result

        engine.network = timed
        reset_peak(device)
        started = time.perf_counter()
        result = denoise(ct, engine, "abdomen", sigma_n=0.05, steps=steps)
        seconds = time.perf_counter() - started
        print(
            f"| {name} | {steps} | {batch} | {seconds:.1f} | {result.network_evaluations} | "
            f"{inside[0] / seconds:.0%} | {peak_mb(device)} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting measurements after this")
    parser.add_argument("--model", type=Path, default=ONE_MM_MODEL, help="1 mm weights for the whole-CT run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"{time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}")
    budget = Budget(args.budget_s)
    bench_throughput(device, budget, args.smoke)
    bench_whole_ct(device, budget, args.model, args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
