"""Choose DiffPIR's default settings on training data, never on the bundled test sample.

    python benchmarks/tune_denoise.py --model models/meddiff-fm-demo-0.1.safetensors --ct path/to/example_ct.nii.gz

Simulates a projection-domain low-dose scan (23 dB) of slices ``--slices`` of a training CT (for the
demo model: slices 40-69 of the totalsegmentator package's ``example_ct.nii.gz``, which it was
trained on, away from the held-out sample) and prints PSNR for a grid of lambda, zeta and steps.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffFMLib import read_volume  # noqa: E402
from MedDiffFMLib.lowdose import simulate  # noqa: E402
from MedDiffFMLib.metrics import psnr  # noqa: E402
from MedDiffFMLib.model import load_model  # noqa: E402
from MedDiffFMLib.preprocessing import Window  # noqa: E402
from MedDiffFMLib.tasks import Engine, denoise  # noqa: E402
from MedDiffFMLib.volume import Volume  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ct", type=Path, required=True, help="a CT from the model's training data")
    parser.add_argument("--slices", type=int, nargs=2, default=(40, 70))
    parser.add_argument("--region", default="abdomen")
    args = parser.parse_args()
    ct = read_volume(args.ct)
    z0, z1 = args.slices
    origin = (ct.geometry.index_to_physical() @ [0, 0, z0, 1])[:3]
    ct = Volume(ct.array[z0:z1].copy(), ct.spacing, tuple(origin), ct.direction)
    simulated = simulate(ct, target_psnr=23.0, seed=1)
    engine = Engine(load_model(args.model), device="auto", batch_size=8)
    window = Window(40.0, 400.0)
    print(f"low dose: {psnr(simulated.reference.array, simulated.low_dose.array, window):.2f} dB")
    print("| lambda | zeta | steps | t_start | PSNR dB |\n|---|---|---|---|---|")
    for lam, zeta, steps in itertools.product((1.0, 10.0), (0.0, 0.1, 0.3), (5, 10, 20)):
        result = denoise(simulated.low_dose, engine, args.region, lam=lam, zeta=zeta, steps=steps, seed=0)
        value = psnr(simulated.reference.array, result.volume.array, window)
        print(f"| {lam:g} | {zeta:g} | {steps} | {result.t_start} | {value:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
