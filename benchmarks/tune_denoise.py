"""Choose DiffPIR's settings on training data, never on a held-out scan.

    python benchmarks/tune_denoise.py --model models/meddiff-fm-1mm-large-0.1.safetensors \\
        --tuning-data FOLDER [--extent-mm 96] [--steps 4 8] [--zeta 0 0.5] [--gains 2 3] [--draws 2] \\
        [--true-level] [--ensemble models/meddiff-fm-1mm-0.4.safetensors]
    python benchmarks/tune_denoise.py --model models/meddiff-fm-demo-0.1.safetensors --ct example_ct.nii.gz

With ``--tuning-data`` (the folder ``quality.py`` fetches the totalsegmentator archive into): the
denoising tuning case of ``quality.py`` (the chest CTA's upper-abdominal slices, projection-domain
low dose, seed 7), its central ``--extent-mm`` square, abdomen window. With ``--ct``: slices
``--slices`` of a training CT (for the demo model: slices 40-69 of the totalsegmentator package's
``example_ct.nii.gz``, which it was trained on, away from the held-out sample), 23 dB, abdomen window.

Prints PSNR and SSIM (``quality.py``'s: [-160, 240] HU, inside the body) for every combination of
``--lam``, ``--zeta``, ``--steps`` and ``--gains`` with the automatic noise level; ``--draws`` N
also scores the mean of N seeds (zeta > 0 only: zeta 0 is deterministic); ``--true-level`` repeats
the grid at the true noise level (the std of low dose minus reference on the working grid), whose
best gain differs from the automatic level's; ``--ensemble`` scores the mean of the result and that
model's result with the same settings. Also prints the classical baselines of ``quality.py``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402

from MedDiffFMLib import read_volume  # noqa: E402
from MedDiffFMLib.model import load_model  # noqa: E402
from MedDiffFMLib.tasks import Engine, denoise  # noqa: E402


def case_from_args(args: argparse.Namespace) -> quality.DenoiseCase:
    if args.tuning_data is not None:
        case = quality.tuning_case(args.tuning_data)
        box = quality.central_box(case.low.array.shape, case.low.spacing, args.extent_mm)
        return quality.DenoiseCase(quality.crop(case.low, box), quality.crop(case.reference, box), case.body[box])
    ct = quality.crop_z(read_volume(args.ct), slice(*args.slices))
    return quality.DenoiseCase.simulated(ct, (slice(None),) * 3, seed=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tuning-data", type=Path, help="quality.py's tuning-data folder")
    source.add_argument("--ct", type=Path, help="a CT from the model's training data")
    parser.add_argument("--extent-mm", type=float, default=96.0, help="in-plane square scored (--tuning-data)")
    parser.add_argument("--slices", type=int, nargs=2, default=(40, 70), help="slices of --ct")
    parser.add_argument("--region", default="abdomen")
    parser.add_argument("--lam", type=float, nargs="+", default=[10.0])
    parser.add_argument("--zeta", type=float, nargs="+", default=[0.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4])
    parser.add_argument("--gains", type=float, nargs="+", default=[3.0])
    parser.add_argument("--draws", type=int, default=1, help="seeds averaged when zeta > 0")
    parser.add_argument("--true-level", action="store_true", help="also run at the true noise level")
    parser.add_argument("--ensemble", type=Path, help="a second base model whose result is averaged in")
    args = parser.parse_args()
    case = case_from_args(args)
    engine = Engine(load_model(args.model), device="auto")
    second = Engine(load_model(args.ensemble), device="auto") if args.ensemble else None
    low_psnr, low_ssim = case.score(case.low.array)
    print(f"low dose: {low_psnr:.2f} dB, SSIM {low_ssim:.3f}; {case.low.array.shape} voxels of {case.low.spacing} mm")
    for name, (value, settings) in quality.tune_baselines(case).items():
        print(f"{name}, best of its grid: {value:.2f} dB with {settings}")
    levels = [("automatic", "auto")]
    if args.true_level:
        levels.append(("true", quality.true_sigma(engine, case, args.region)))
    print("\n| noise level | lambda | zeta | steps | gain | sigma_n | t_start | draws | PSNR dB | SSIM | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, sigma_n), lam, zeta, steps, gain in itertools.product(
        levels, args.lam, args.zeta, args.steps, args.gains
    ):
        settings = dict(sigma_n=sigma_n, lam=lam, zeta=zeta, steps=steps, noise_gain=gain)
        started = time.perf_counter()
        results = []
        for seed in range(args.draws if zeta > 0 else 1):
            result = denoise(case.low, engine, args.region, seed=seed, **settings)
            results.append(result.volume.array.astype(np.float64))
            value, structure = case.score(np.mean(results, axis=0).astype(np.float32))
            seconds = time.perf_counter() - started
            print(
                f"| {label} | {lam:g} | {zeta:g} | {steps} | {gain:g} | {result.sigma_n:.4f} | {result.t_start} "
                f"| {len(results)} | {value:.2f} | {structure:.3f} | {seconds:.0f} |",
                flush=True,
            )
        if second is not None:
            other = denoise(case.low, second, args.region, seed=0, **settings).volume.array
            value, structure = case.score(((results[0] + other) / 2).astype(np.float32))
            print(
                f"| {label}, mean with {second.name} | {lam:g} | {zeta:g} | {steps} | {gain:g} | | | 1 "
                f"| {value:.2f} | {structure:.3f} | |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
