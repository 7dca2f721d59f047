"""Choose anomaly detection's timestep and draws on training data, never on the held-out scan.

    python benchmarks/tune_anomaly.py --model models/meddiff-fm-1mm-0.4.safetensors --tuning-data /work/train/raw

Seeds six liver lesions (5-15 mm, -60..-20 or +20..+40 HU; ``quality.seed_lesions``) into slabs of
the TotalSegmentator archive's abdomen CT (``--cases``: first slice, seed) and prints the smoothed
pixel AUROC of ``|anomaly map|`` inside the liver for each t and number of draws, beside the
``|HU - liver median|`` baseline, with the mean over the cases.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import aurocs, median_baseline, seeded_training_slab, smoothed  # noqa: E402

from MedDiffFMLib.model import load_model  # noqa: E402
from MedDiffFMLib.tasks import Engine, detect_anomalies  # noqa: E402
from MedDiffFMLib.volume import read_volume  # noqa: E402
from Training.demo_data import fetch_totalsegmentator  # noqa: E402

SLAB_SLICES = 30
"""Slices (3 mm) of each case's slab."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tuning-data", type=Path, required=True, help="folder for the totalsegmentator archive")
    parser.add_argument(
        "--cases",
        type=int,
        nargs="+",
        default=(48, 11, 78, 12, 78, 13, 64, 14),
        help="pairs of first slice and lesion seed (default: the liver's tip, its dome twice, its middle)",
    )
    parser.add_argument("--timesteps", type=int, nargs="+", default=(150, 300, 450, 600, 750))
    parser.add_argument("--draws", type=int, nargs="+", default=(1, 2))
    args = parser.parse_args()
    reference = fetch_totalsegmentator(args.tuning_data)
    ct = read_volume(reference / "example_ct.nii.gz")
    seg = read_volume(reference / "example_seg_fast_force_split.nii.gz")
    engine = Engine(load_model(args.model), device="auto", batch_size=8, overlap=0.25)
    cases = []
    print("| case | baseline |\n|---|---|")
    for first, seed in zip(args.cases[::2], args.cases[1::2]):
        seeded, labels, lesions, liver = seeded_training_slab(ct, seg, first, seed, SLAB_SLICES)
        baseline = aurocs(median_baseline(seeded, liver), lesions, liver)[0]
        print(f"| slices {first}-{first + SLAB_SLICES - 1}, seed {seed} | {baseline:.3f} |")
        cases.append((seeded, labels, lesions, liver, baseline))
    print(f"| mean | {np.mean([case[-1] for case in cases]):.3f} |")
    print(f"\n{engine.name}\n\n| t | draws | pixel AUROC per case | mean | s |\n|---|---|---|---|---|")
    for t, draws in itertools.product(args.timesteps, args.draws):
        start = time.perf_counter()
        values = []
        for seeded, labels, lesions, liver, _ in cases:
            result = detect_anomalies(seeded, labels, ["liver"], engine, "abdomen", t=t, draws=draws, seed=0)
            values.append(aurocs(smoothed(np.abs(result.anomaly_map.array), seeded.spacing), lesions, liver)[0])
        per_case = " ".join(f"{value:.3f}" for value in values)
        print(f"| {t} | {draws} | {per_case} | {np.mean(values):.3f} | {time.perf_counter() - start:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
