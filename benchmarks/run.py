"""MedDiffFM benchmarks: one command, one table per benchmark (issue 7).

    python benchmarks/run.py [--quick] [--model PATH]

1. Bare network throughput: forward passes/s and voxel-steps/s of the ``paper`` and ``demo``
   networks at 32^3 / 64^3 (/ 128^3 with --large), peak memory.
2. Sampler efficiency: wall time of whole-volume noise estimation divided by (window batches x
   the bare forward time of one window batch, measured in the same run).
3. Work per result: network evaluations and PSNR when denoising the bundled sample (projection-
   domain low dose at 23 dB) with the paper's setting (every timestep from t_start) and ours;
   needs trained weights (--model, or the newest installed model).
4. Peak memory of denoising a 512 x 512 x 300 CT (synthetic content) with the ``demo`` network,
   measured in a child process.
5. Seams: synthesis at 50 % and 25 % window overlap (Gaussian blending) and, as the control that
   shows what seams look like, 0 % overlap with constant blending; the seam ratio is the mean
   absolute intensity step across window borders divided by the mean step elsewhere.

Nothing here is asserted: the numbers are for people. Results of a run are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffFMLib.diffusion.sliding_window import Conditions, WindowedNoisePredictor  # noqa: E402
from MedDiffFMLib.model import load_model, resolve_weights, untrained_model  # noqa: E402
from MedDiffFMLib.model.embeddings import window_coordinates  # noqa: E402


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def forward_inputs(size: int, batch: int) -> dict:
    shape = (size,) * 3
    window = tuple(slice(0, size) for _ in range(3))
    return dict(
        x=torch.randn(batch, 1, *shape),
        t=torch.full((batch,), 500),
        coordinates=window_coordinates(window, shape)[None].repeat(batch, 1, 1, 1, 1),
        region=torch.full((batch,), 3),
        anatomy=torch.full((batch, *shape), 119, dtype=torch.uint8),
    )


@torch.no_grad()
def time_forward(model: torch.nn.Module, size: int, batch: int, repeats: int) -> float:
    """Median seconds of one forward pass of ``batch`` windows of ``size``^3."""
    inputs = forward_inputs(size, batch)
    model(**inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_throughput(sizes: list[int], repeats: int) -> None:
    rows = []
    for name in ("demo", "paper"):
        model = untrained_model(name)
        for size in sizes:
            seconds = time_forward(model, size, 1, repeats)
            rows.append(
                [
                    name,
                    f"{size}^3",
                    f"{seconds:.3f}",
                    f"{1 / seconds:.2f}",
                    f"{size**3 / seconds / 1e6:.2f}",
                    f"{peak_rss_mb():.0f}",
                ]
            )
    table(
        "1. Bare network throughput (batch 1, no grad)",
        ["network", "window", "s / forward", "forwards / s", "Mvoxel-steps / s", "process peak RSS MB"],
        rows,
    )


def bench_sampler_efficiency(steps: int, repeats: int) -> None:
    rows = []
    for name, shape, batch in (("demo", (40, 96, 96), 4), ("demo", (64, 128, 128), 8)):
        model = untrained_model(name)
        predictor = WindowedNoisePredictor(
            model,
            Conditions(3),
            shape,
            model.config.patch_size,
            model.config.downsampling_factor,
            overlap=0.5,
            batch_size=batch,
        )
        x = torch.randn(shape)
        predictor(x, 500)
        start = time.perf_counter()
        for t in range(steps):
            predictor(x, 999 - t)
        total = time.perf_counter() - start
        batches = -(-len(predictor.windows) // batch) * steps
        bare = time_forward(model, model.config.patch_size, batch, repeats)
        rows.append(
            [
                name,
                "x".join(map(str, shape)),
                len(predictor.windows),
                batch,
                steps,
                f"{total:.2f}",
                f"{batches * bare:.2f}",
                f"{batches * bare / total:.3f}",
            ]
        )
    table(
        "2. Sampler efficiency (window batches x bare batch time / sampling time)",
        ["network", "volume", "windows", "batch", "steps", "sampling s", "network-only s", "efficiency"],
        rows,
    )


def bench_work_per_result(weights: Path | None) -> None:
    from MedDiffFMLib.lowdose import simulate
    from MedDiffFMLib.metrics import psnr
    from MedDiffFMLib.preprocessing import Window
    from MedDiffFMLib.tasks import Engine, denoise
    from MedDiffFMLib.volume import read_volume

    try:
        model = load_model(weights or resolve_weights())
    except Exception as error:  # noqa: BLE001 - reported in the table
        table("3. Work per result", ["note"], [[f"skipped: {error}"]])
        return
    sample = read_volume(ROOT / "Testing" / "Data" / "totalsegmentator_example" / "example_ct_sm.nii.gz")
    simulated = simulate(sample, target_psnr=23.0, seed=0)
    window = Window(40.0, 400.0)
    engine = Engine(model, device="auto", batch_size=8)
    baseline = psnr(simulated.reference.array, simulated.low_dose.array, window)
    rows = [["low-dose input", "-", "0", f"{baseline:.2f}", "-"]]
    t_start = denoise(simulated.low_dose, engine, "abdomen", steps=10, seed=0).t_start
    settings = (("paper: every timestep from t_start", t_start + 1), ("ours: 10 steps", 10), ("ours: 5 steps", 5))
    for label, steps in settings:
        start = time.perf_counter()
        result = denoise(simulated.low_dose, engine, "abdomen", steps=steps, seed=0)
        value = psnr(simulated.reference.array, result.volume.array, window)
        rows.append(
            [label, str(steps), str(result.network_evaluations), f"{value:.2f}", f"{time.perf_counter() - start:.1f}"]
        )
    table(
        f"3. Work per result: denoising the bundled sample (t_start {t_start}; PSNR in [-160, 240] HU vs the "
        "noise-free reference)",
        ["setting", "steps", "window evaluations", "PSNR dB", "s"],
        rows,
    )


def seam_ratio(volume: np.ndarray, predictor: WindowedNoisePredictor) -> float:
    """Mean absolute finite difference across window borders divided by that elsewhere (1 = no seams).

    Borders are the planes where a window starts or ends, along each axis, inside the volume.
    """
    ratios = []
    for axis in range(3):
        difference = np.abs(np.diff(volume.astype(np.float64), axis=axis))
        edges = {w[axis].start - 1 for w in predictor.windows} | {w[axis].stop - 1 for w in predictor.windows}
        edges = sorted(e for e in edges if 0 <= e < difference.shape[axis])
        if not edges:
            continue
        border = np.take(difference, edges, axis=axis).mean()
        inside = np.delete(difference, edges, axis=axis).mean()
        ratios.append(border / inside)
    return float(np.mean(ratios))


def bench_seams(weights: Path | None) -> None:
    from MedDiffFMLib.anatomy import from_totalsegmentator
    from MedDiffFMLib.tasks import Engine, synthesize
    from MedDiffFMLib.volume import read_volume

    try:
        model = load_model(weights or resolve_weights())
    except Exception as error:  # noqa: BLE001 - reported in the table
        table("5. Seams", ["note"], [[f"skipped: {error}"]])
        return
    data = ROOT / "Testing" / "Data" / "totalsegmentator_example"
    ct, seg = read_volume(data / "example_ct_sm.nii.gz"), read_volume(data / "example_seg.nii.gz")
    labels = seg.with_array(from_totalsegmentator(seg.array, ct.array))
    rows = []
    for overlap, blend in ((0.5, "gaussian"), (0.25, "gaussian"), (0.0, "constant")):
        engine = Engine(model, device="auto", overlap=overlap, blend=blend, batch_size=8)
        start = time.perf_counter()
        volume = synthesize(labels, "abdomen", engine, sampler="dpm++2m", steps=20, seed=0)
        seconds = time.perf_counter() - start
        predictor = engine.predictor(Conditions(3), volume.array.shape)
        inside = np.where(labels.array > 0, volume.array, np.nan)
        body = np.nan_to_num(inside, nan=float(np.nanmean(inside)))
        rows.append(
            [f"{overlap:.2f}", blend, len(predictor.windows), f"{seconds:.1f}", f"{seam_ratio(body, predictor):.3f}"]
        )
    table(
        "5. Seams: synthesis of the sample's anatomy (DPM-Solver++ 20 steps); gradient at window borders / elsewhere",
        ["overlap", "blend", "windows", "s", "seam ratio"],
        rows,
    )


MEMORY_CHILD = """
import resource, sys, time, numpy as np
sys.path.insert(0, {root!r})
from MedDiffFMLib.model import untrained_model
from MedDiffFMLib.tasks import Engine, denoise
from MedDiffFMLib.volume import Volume
rng = np.random.default_rng(0)
ct = np.full((300, 512, 512), -1000.0, dtype=np.float32)
yy, xx = np.mgrid[:512, :512]
ct[:, (yy - 256) ** 2 / 200**2 + (xx - 256) ** 2 / 160**2 < 1] = 40.0
ct += rng.normal(0, 20, ct.shape).astype(np.float32)
volume = Volume(ct, spacing=(0.7, 0.7, 1.0))
start = time.perf_counter()
result = denoise(volume, Engine(untrained_model("demo"), device="cpu", batch_size=8), "abdomen", sigma_n=0.1, steps=2)
print(f"{{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}} {{time.perf_counter() - start:.1f}} "
      f"{{result.network_evaluations}}")
"""


def bench_memory() -> None:
    output = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD.format(root=str(ROOT))], capture_output=True, text=True, check=True
    ).stdout.split()
    table(
        "4. Peak memory: denoising a 512 x 512 x 300 CT (0.7 x 0.7 x 1 mm, demo network at 3 mm, 2 steps, CPU)",
        ["peak RSS MB", "seconds", "window evaluations"],
        [output],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 32^3 only")
    parser.add_argument("--large", action="store_true", help="also 128^3 windows (about 30 s per paper forward on CPU)")
    parser.add_argument("--model", type=Path, help="trained weights for benchmark 3")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    repeats = 2 if args.quick else 5
    sizes = [32] if args.quick else [32, 64] + ([128] if args.large else [])
    bench_throughput(sizes, repeats)
    bench_sampler_efficiency(2 if args.quick else 3, repeats)
    bench_work_per_result(args.model)
    bench_seams(args.model)
    bench_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
