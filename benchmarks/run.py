"""MedDiffFM benchmarks: one command, one table per benchmark (issue 7).

    python benchmarks/run.py [--quick] [--large] [--no-compile] [--only 1 2 ...] [--model PATH]

1. Bare network throughput: forward passes/s and voxel-steps/s of the ``paper`` and ``demo``
   networks at 32^3 / 64^3 (/ 128^3 with --large) on the current device, for the contiguous and
   the channels-last-3D weight layout and for channels-last + ``torch.compile``, each as a ratio
   to the contiguous eager network measured in the same run; peak memory.
2. Sampler efficiency: a whole-volume sampling run (strided DDIM through the windowed noise
   predictor, as synthesis runs it) versus the bare forward time of the same window batches,
   measured just before and after it in the same run; also the share of the run spent inside
   network calls, timed during the run itself.
3. Work per result: network evaluations and PSNR when denoising the bundled sample (projection-
   domain low dose at 23 dB) with the paper's setting (every timestep from t_start) and ours;
   needs trained weights (--model, or the newest installed or shipped model).
4. Peak memory of denoising a 512 x 512 x 300 CT (synthetic content) with the ``demo`` network,
   measured in a child process.
5. Seams: synthesis at 50 % and 25 % window overlap (Gaussian blending) and, as the control that
   shows what seams look like, 0 % overlap with constant blending; the seam ratio is the mean
   absolute intensity step across window borders divided by the mean step elsewhere.
6. Steps for synthesis: (a) DDIM, our DPM-Solver++(2M) and MONAI's PNDM on Gaussian data, whose
   probability flow is known exactly; (b) DDIM, DPM-Solver++(2M) and MONAI's PLMS at 5 to 100 steps with the
   trained network against the same probability-flow ODE solved with every one of the 1000
   timesteps (DDIM, eta 0) from the same noise.

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
from MedDiffFMLib.tasks import Engine  # noqa: E402


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb() -> float:
    """Peak memory so far: the GPU's allocated peak on CUDA, the process's peak resident set on CPU."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_memory() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def engine_for(model: torch.nn.Module, **options) -> Engine:
    return Engine(model, device=DEVICE, **options)


def forward_inputs(size: int, batch: int) -> dict:
    shape = (size,) * 3
    window = tuple(slice(0, size) for _ in range(3))
    return dict(
        x=torch.randn(batch, 1, *shape, device=DEVICE),
        t=torch.full((batch,), 500, device=DEVICE),
        coordinates=window_coordinates(window, shape)[None].repeat(batch, 1, 1, 1, 1).to(DEVICE),
        region=torch.full((batch,), 3, device=DEVICE),
        anatomy=torch.full((batch, *shape), 119, dtype=torch.uint8, device=DEVICE),
    )


@torch.no_grad()
def time_forward(network, size: int, batch: int, repeats: int, autocast: torch.dtype | None = None) -> float:
    """Median seconds of one forward pass of ``batch`` windows of ``size``^3 (after one warm-up call)."""
    return time_calls(network, size, batch, repeats, autocast)[1]


@torch.no_grad()
def time_calls(network, size: int, batch: int, repeats: int, autocast: torch.dtype | None) -> tuple[float, float]:
    """Seconds of the first call (compilation included, if any) and median seconds of the next
    ``repeats`` calls of ``network`` on ``batch`` windows ``(batch, 1, size, size, size)`` on DEVICE."""
    inputs = forward_inputs(size, batch)

    def call() -> None:
        if autocast is None:
            network(**inputs)
        else:
            with torch.autocast(DEVICE.type, dtype=autocast):
                network(**inputs)
        synchronize()

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def bench_throughput(sizes: list[int], repeats: int, compile_network: bool) -> None:
    layouts = [("contiguous", "contiguous", False), ("channels-last", "channels_last", False)]
    if compile_network:
        layouts.append(("channels-last + compile", "channels_last", True))
    rows = []
    for name in ("demo", "paper"):
        for size in sizes:
            baseline = None
            for label, memory_format, compiled in layouts:
                engine = engine_for(untrained_model(name), memory_format=memory_format, compile=compiled)
                reset_peak_memory()
                first, seconds = time_calls(engine.network, size, 1, repeats, engine.autocast_dtype)
                baseline = baseline or seconds
                if compiled and engine.network.compiled is None:
                    label += " (fell back to eager)"
                rows.append(
                    [
                        name,
                        f"{size}^3",
                        label,
                        f"{first:.1f}",
                        f"{seconds:.3f}",
                        f"{1 / seconds:.2f}",
                        f"{size**3 / seconds / 1e6:.2f}",
                        f"{baseline / seconds:.2f}",
                        f"{peak_memory_mb():.0f}",
                    ]
                )
                torch._dynamo.reset()
    table(
        f"1. Bare network throughput (batch 1, no grad, {DEVICE.type}; speed-up vs contiguous eager)",
        [
            "network",
            "window",
            "layout",
            "first call s",
            "s / forward",
            "forwards / s",
            "Mvoxel-steps / s",
            "speed-up",
            "peak MB" + (" (allocated)" if DEVICE.type == "cuda" else " (process RSS)"),
        ],
        rows,
    )


class TimedNetwork:
    """Calls a network and adds up the wall time spent inside the calls."""

    def __init__(self, network) -> None:
        self.network = network
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.network(*args, **kwargs)
        synchronize()
        self.seconds += time.perf_counter() - start
        return result


def bare_time(engine: Engine, batch_sizes: list[int], repeats: int) -> float:
    """Seconds the bare network needs for window batches of these sizes (one timestep)."""
    size = engine.config.patch_size
    per_size = {b: time_forward(engine.network, size, b, repeats, engine.autocast_dtype) for b in set(batch_sizes)}
    return sum(per_size[b] for b in batch_sizes)


def bench_sampler_efficiency(steps: int, repeats: int) -> None:
    from MedDiffFMLib.device import make_generator
    from MedDiffFMLib.diffusion.samplers import sample

    rows = []
    for name, shape, batch in (("demo", (40, 96, 96), 4), ("demo", (64, 128, 128), 8)):
        engine = engine_for(untrained_model(name), batch_size=batch)
        predictor = engine.predictor(Conditions(3), shape)
        timed = TimedNetwork(engine.network)
        predictor.model = timed
        predictor(torch.randn(shape, device=DEVICE), 500)  # warm-up
        batch_sizes = [len(predictor.windows[i : i + batch]) for i in range(0, len(predictor.windows), batch)]
        before = bare_time(engine, batch_sizes, repeats) * steps
        timed.seconds = 0.0
        start = time.perf_counter()
        sample(predictor, engine.schedule, shape, make_generator(0), DEVICE, sampler="ddim", steps=steps, eta=0.0)
        synchronize()
        total = time.perf_counter() - start
        network_only = 0.5 * (before + bare_time(engine, batch_sizes, repeats) * steps)
        rows.append(
            [
                name,
                "x".join(map(str, shape)),
                len(predictor.windows),
                batch,
                steps,
                f"{total:.2f}",
                f"{network_only:.2f}",
                f"{network_only / total:.3f}",
                f"{timed.seconds / total:.3f}",
            ]
        )
    table(
        "2. Sampler efficiency: bare network time of the same window batches / whole-volume DDIM sampling time",
        [
            "network",
            "volume",
            "windows",
            "batch",
            "steps",
            "sampling s",
            "network-only s",
            "efficiency",
            "in-run network share",
        ],
        rows,
    )


def trained_model(weights: Path | None) -> torch.nn.Module | str:
    """The model for benchmarks that need trained weights, or why there is none."""
    try:
        return load_model(weights or resolve_weights())
    except Exception as error:  # noqa: BLE001 - reported in the table
        return f"skipped: {error}"


SAMPLE = ROOT / "Testing" / "Data" / "totalsegmentator_example"


def sample_anatomy():
    """The bundled sample CT and its anatomy label map (TotalSegmentator labels plus the body class)."""
    from MedDiffFMLib.anatomy import from_totalsegmentator
    from MedDiffFMLib.volume import read_volume

    ct, seg = read_volume(SAMPLE / "example_ct_sm.nii.gz"), read_volume(SAMPLE / "example_seg.nii.gz")
    return ct, seg.with_array(from_totalsegmentator(seg.array, ct.array))


def bench_work_per_result(weights: Path | None) -> None:
    from MedDiffFMLib.lowdose import simulate
    from MedDiffFMLib.metrics import psnr
    from MedDiffFMLib.preprocessing import Window
    from MedDiffFMLib.tasks import denoise
    from MedDiffFMLib.volume import read_volume

    model = trained_model(weights)
    if isinstance(model, str):
        table("3. Work per result", ["note"], [[model]])
        return
    sample = read_volume(SAMPLE / "example_ct_sm.nii.gz")
    simulated = simulate(sample, target_psnr=23.0, seed=0)
    window = Window(40.0, 400.0)
    engine = engine_for(model, batch_size=8)
    baseline = psnr(simulated.reference.array, simulated.low_dose.array, window)
    rows = [["low-dose input", "-", "0", "-", f"{baseline:.2f}", "-", "-"]]
    t_start = denoise(simulated.low_dose, engine, "abdomen", steps=1, seed=0).t_start
    settings = [("paper: every timestep from t_start", t_start + 1, 0.5)]
    settings += [(f"ours: {n} steps" + (" (default)" if n == 10 else ""), n, 0.5) for n in (10, 5, 4, 3, 2)]
    settings += [(f"ours: {n} steps, 25 % window overlap", n, 0.25) for n in (10, 4)]
    paper = None
    for label, steps, overlap in settings:
        engine.overlap = overlap
        start = time.perf_counter()
        result = denoise(simulated.low_dose, engine, "abdomen", steps=steps, seed=0)
        seconds = time.perf_counter() - start
        value = psnr(simulated.reference.array, result.volume.array, window)
        paper = paper or (result.network_evaluations, value)
        rows.append(
            [
                label,
                str(steps),
                str(result.network_evaluations),
                f"{paper[0] / result.network_evaluations:.1f}",
                f"{value:.2f}",
                f"{value - paper[1]:+.2f}",
                f"{seconds:.1f}",
            ]
        )
    table(
        f"3. Work per result: denoising the bundled sample (t_start {t_start}; PSNR in [-160, 240] HU vs the "
        "noise-free reference)",
        ["setting", "steps", "window evaluations", "x fewer", "PSNR dB", "vs paper dB", "s"],
        rows,
    )


def seam_ratio(volume: np.ndarray, inside: np.ndarray, predictor: WindowedNoisePredictor) -> float:
    """Mean absolute step between neighbouring voxels across window borders divided by the mean step
    between all other neighbours (1 = no seams), counting only pairs of voxels that are both
    ``inside`` (the body: steps at the body's outline are not seams).

    Borders are the planes where a window starts or ends, along each axis, inside the volume.
    """
    ratios = []
    for axis in range(3):
        difference = np.abs(np.diff(volume.astype(np.float64), axis=axis))
        lower, upper = (
            tuple(part if a == axis else slice(None) for a in range(3)) for part in (slice(None, -1), slice(1, None))
        )
        both = inside[lower] & inside[upper]
        edges = {w[axis].start - 1 for w in predictor.windows} | {w[axis].stop - 1 for w in predictor.windows}
        edges = sorted(e for e in edges if 0 <= e < difference.shape[axis])
        if not edges:
            continue
        at_border = np.zeros(difference.shape[axis], dtype=bool)
        at_border[edges] = True
        at_border = np.expand_dims(at_border, [a for a in range(3) if a != axis])
        ratios.append(difference[both & at_border].mean() / difference[both & ~at_border].mean())
    return float(np.mean(ratios))


def bench_seams(weights: Path | None) -> None:
    from MedDiffFMLib.tasks import synthesize

    model = trained_model(weights)
    if isinstance(model, str):
        table("5. Seams", ["note"], [[model]])
        return
    _, labels = sample_anatomy()
    rows = []
    for overlap, blend in ((0.5, "gaussian"), (0.25, "gaussian"), (0.0, "constant")):
        engine = engine_for(model, overlap=overlap, blend=blend, batch_size=8)
        start = time.perf_counter()
        volume = synthesize(labels, "abdomen", engine, sampler="dpm++2m", steps=20, seed=0)
        seconds = time.perf_counter() - start
        predictor = engine.predictor(Conditions(3), volume.array.shape)
        ratio = seam_ratio(volume.array, labels.array > 0, predictor)
        rows.append([f"{overlap:.2f}", blend, len(predictor.windows), f"{seconds:.1f}", f"{ratio:.3f}"])
    table(
        "5. Seams: synthesis of the sample's anatomy (DPM-Solver++ 20 steps); gradient at window borders / elsewhere",
        ["overlap", "blend", "windows", "s", "seam ratio"],
        rows,
    )


def bench_solvers_on_gaussian_data(steps_list: tuple[int, ...]) -> None:
    """Samplers on data whose probability flow is known exactly: x0 ~ N(0, spread^2) per voxel.

    The exact noise prediction is linear in x_t and the exact ODE solution from t = 999 is
    ``x0 = spread * x_T / sqrt(abar_T spread^2 + 1 - abar_T)``; the table gives the largest error.
    MONAI's PNDM (its only higher-order scheduler) runs as MONAI sets it up (leading timesteps).
    """
    from monai.networks.schedulers import PNDMScheduler

    from MedDiffFMLib.device import make_generator, randn
    from MedDiffFMLib.diffusion.samplers import sample
    from MedDiffFMLib.diffusion.schedule import NoiseSchedule

    schedule, spread, shape = NoiseSchedule(), 0.3, (4000,)

    def exact_eps(x: torch.Tensor, t: int) -> torch.Tensor:
        a, s = schedule.abar(t) ** 0.5, (1 - schedule.abar(t)) ** 0.5
        return (x - a * (a * spread**2 / (a**2 * spread**2 + s**2)) * x) / s

    start = randn(shape, make_generator(7), torch.device("cpu"))
    top = schedule.abar(schedule.num_timesteps - 1)
    expected = (spread * start / (top * spread**2 + 1 - top) ** 0.5).clamp(-1, 1)
    rows = []
    for steps in steps_list:
        row = [str(steps)]
        for sampler in ("ddim", "dpm++2m"):
            x = sample(exact_eps, schedule, shape, make_generator(7), torch.device("cpu"), sampler, steps, eta=0.0)
            row.append(f"{(x - expected).abs().max().item():.4f}")
        for skip_prk in (True, False):
            pndm = PNDMScheduler(
                schedule.num_timesteps, schedule=schedule.name, skip_prk_steps=skip_prk, set_alpha_to_one=True
            )
            pndm.set_timesteps(steps)
            x = start.clone()
            for t in pndm.timesteps.tolist():
                x, _ = pndm.step(exact_eps(x, t), t, x)
            row.append(f"{(x.clamp(-1, 1) - expected).abs().max().item():.4f} ({len(pndm.timesteps)})")
        rows.append(row)
    table(
        "6a. Samplers on the exactly known probability flow of Gaussian data (largest error; PNDM: (network calls))",
        ["steps", "DDIM", "DPM-Solver++(2M) (ours)", "MONAI PNDM, PLMS only", "MONAI PNDM, PRK + PLMS"],
        rows,
    )


def monai_plms(predict, schedule, shape: tuple[int, ...], generator: torch.Generator, steps: int) -> torch.Tensor:
    """Synthesis with MONAI's PNDMScheduler in PLMS mode (its only higher-order scheduler), set up
    as MONAI documents it, on our noise schedule; for comparison only (benchmark 6b)."""
    from monai.networks.schedulers import PNDMScheduler

    from MedDiffFMLib.device import randn

    plms = PNDMScheduler(schedule.num_timesteps, schedule=schedule.name, skip_prk_steps=True, set_alpha_to_one=True)
    plms.set_timesteps(steps)
    x = randn(shape, generator, DEVICE)
    for t in plms.timesteps.tolist():
        x, _ = plms.step(predict(x, t), t, x)
    return x.clamp(-1.0, 1.0)


def bench_steps(weights: Path | None, steps_list: tuple[int, ...]) -> None:
    from MedDiffFMLib import preprocessing as pp
    from MedDiffFMLib.anatomy import label_of
    from MedDiffFMLib.device import make_generator
    from MedDiffFMLib.diffusion.samplers import sample
    from MedDiffFMLib.metrics import psnr

    model = trained_model(weights)
    if isinstance(model, str):
        table("6. Steps for synthesis", ["note"], [[model]])
        return
    labels = sample_anatomy()[1].array
    engine = engine_for(model, batch_size=8)
    size = engine.config.patch_size
    _, y, x = np.argwhere(labels == label_of("liver")).mean(axis=0).astype(int)
    y0, x0 = (max(0, min(c - size // 2, n - size)) for c, n in zip((y, x), labels.shape[1:]))
    crop = labels[:, y0 : y0 + size, x0 : x0 + size]
    predictor = engine.predictor(Conditions(3, torch.from_numpy(crop.astype(np.uint8))), crop.shape)
    window = pp.REGIONS["abdomen"]

    def run(sampler: str, steps: int) -> tuple[np.ndarray, int, float]:
        before, start = predictor.evaluations, time.perf_counter()
        if sampler == "plms":
            x = monai_plms(predictor, engine.schedule, crop.shape, make_generator(0), steps)
        else:
            x = sample(predictor, engine.schedule, crop.shape, make_generator(0), DEVICE, sampler, steps, eta=0.0)
        seconds = time.perf_counter() - start
        return pp.model_to_hu(x.cpu().numpy(), "abdomen"), predictor.evaluations - before, seconds

    reference, evaluations, seconds = run("ddim", engine.schedule.num_timesteps)
    rows = [["ddim (reference)", str(engine.schedule.num_timesteps), str(evaluations), "-", f"{seconds:.1f}"]]
    for steps in steps_list:
        for sampler in ("ddim", "dpm++2m", "plms"):
            result, evaluations, seconds = run(sampler, steps)
            rows.append(
                [sampler, str(steps), str(evaluations), f"{psnr(reference, result, window):.2f}", f"{seconds:.1f}"]
            )
    table(
        f"6b. Steps for synthesis: {'x'.join(map(str, crop.shape))} crop of the sample's anatomy (liver), same "
        "noise; PSNR in the abdomen window vs the 1000-step solution of the same ODE",
        ["sampler", "steps", "window evaluations", "PSNR dB vs reference", "s"],
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


BENCHMARKS = (1, 2, 3, 4, 5, 6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    parser.add_argument("--large", action="store_true", help="also 128^3 windows (about 30 s per paper forward on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of benchmark 1")
    parser.add_argument("--only", type=int, nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--model", type=Path, help="trained weights for benchmarks 3, 5 and 6")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    selected = set(args.only or BENCHMARKS)
    repeats = 2 if args.quick else 5
    sizes = [32] if args.quick else [32, 64] + ([128] if args.large else [])
    if 1 in selected:
        bench_throughput(sizes, repeats, not args.no_compile)
    if 2 in selected:
        bench_sampler_efficiency(2 if args.quick else 3, repeats)
    if 3 in selected:
        bench_work_per_result(args.model)
    if 4 in selected:
        bench_memory()
    if 5 in selected:
        bench_seams(args.model)
    if 6 in selected:
        bench_solvers_on_gaussian_data((10, 20, 50))
        bench_steps(args.model, (5, 10) if args.quick else (5, 10, 20, 50, 100))
    return 0


if __name__ == "__main__":
    sys.exit(main())
