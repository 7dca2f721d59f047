"""Soak test: many small jobs back to back in one process; prints the memory after each batch.

    python benchmarks/soak.py [--jobs 60]

Runs denoising, anomaly detection and synthesis in turn on a crop of the bundled sample with a
tiny network and reports the process's resident memory (current, from /proc) every 10 jobs. Flat
numbers after the first batch mean no leak.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffFMLib import read_volume  # noqa: E402
from MedDiffFMLib.model import untrained_model  # noqa: E402
from MedDiffFMLib.tasks import Engine, denoise, detect_anomalies, synthesize  # noqa: E402
from MedDiffFMLib.volume import Volume  # noqa: E402


def resident_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * 4096 / 2**20


def crop(volume: Volume) -> Volume:
    return Volume(volume.array[8:24, 30:70, 10:58].copy(), volume.spacing, volume.origin, volume.direction)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
    args = parser.parse_args()
    data = ROOT / "Testing" / "Data" / "totalsegmentator_example"
    ct, seg = crop(read_volume(data / "example_ct_sm.nii.gz")), crop(read_volume(data / "example_seg.nii.gz"))
    engine = Engine(untrained_model("tiny"), device="cpu", batch_size=8)
    jobs = (
        lambda seed: denoise(ct, engine, "abdomen", sigma_n=0.05, steps=2, seed=seed),
        lambda seed: detect_anomalies(ct, seg, ["liver"], engine, region="abdomen", seed=seed),
        lambda seed: synthesize(seg, "abdomen", engine, steps=2, seed=seed),
    )
    readings, start = [], time.perf_counter()
    print("| jobs | resident MB | seconds |\n|---|---|---|")
    for job in range(1, args.jobs + 1):
        jobs[job % len(jobs)](job)
        if job % 10 == 0:
            gc.collect()
            readings.append(resident_mb())
            print(f"| {job} | {readings[-1]:.0f} | {time.perf_counter() - start:.1f} |")
    growth = readings[-1] - readings[0] if len(readings) > 1 else 0.0
    print(f"\nGrowth from job 10 to job {args.jobs}: {growth:+.0f} MB ({np.ptp(readings):.0f} MB range)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
