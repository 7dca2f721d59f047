"""Data preparation speed: cases per minute with 1 and with N worker processes, in one run.

    python benchmarks/prepare_speed.py [--cases 6] [--workers 2] [--spacing 1.0]

Each case is the bundled upper-abdomen DICOM series (512 x 512 x 20, 0.98 x 0.98 x 2 mm, like a
clinical scan) with its TotalSegmentator labels, under another name, prepared at ``--spacing`` mm
(read, label conversion, resampling, region split, atomic writes) by
``Training.prepare_data.prepare`` into a fresh folder. The speed-up is the ratio of the two rows,
measured back to back; worker start-up is included, as a user sees it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Training.prepare_data import Case, prepare  # noqa: E402

SAMPLE = ROOT / "Testing" / "Data" / "totalsegmentator_example"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--spacing", type=float, default=1.0)
    args = parser.parse_args(argv)
    cases = [
        Case(f"scan{i}", SAMPLE / "example_ct_dicom", SAMPLE / "example_seg_dicom.nii.gz", "abdomen")
        for i in range(args.cases)
    ]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.cases} cases at {args.spacing} mm"
    )
    print("| workers | seconds | cases/min | speed-up |\n|---|---|---|---|")
    baseline = None
    for workers in (1, args.workers):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            manifest = prepare(cases, Path(folder), args.spacing, workers=workers)
            seconds = time.perf_counter() - started
        assert manifest["summary"]["cases_done"] == args.cases, manifest["summary"]
        rate = args.cases / seconds * 60
        baseline = baseline or rate
        print(f"| {workers} | {seconds:.1f} | {rate:.1f} | {rate / baseline:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
