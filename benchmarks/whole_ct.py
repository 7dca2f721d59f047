"""A whole chest CT on this CPU (issue 15.2): default denoising and the fast preview, as ratios.

    python benchmarks/whole_ct.py [--model PATH] [--smoke]

The scan is the chest CTA of the totalsegmentator 2.18.0 test data (1.5 mm) resampled to
0.7 x 0.7 x 1 mm and padded with air to 512 x 512 x 300, as a clinical chest CT comes, with 20 HU
of noise in the body (resampling smoothed the scan's own). It is
denoised by the command line's defaults (the model ``meddiff-fm denoise`` picks without
``--model``: the 1 mm model the catalogue recommends; 10 DiffPIR steps, window overlap 0.5) and by
``--preview`` (the 3 mm model, 4 steps, overlap 0.25),
each in its own process, with a Gaussian filter of the same volume as the yardstick. Per run: wall
time, peak resident memory, network evaluations and the share of the time spent inside the
network. Nothing is asserted; results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffFMLib import preprocessing as pp  # noqa: E402
from MedDiffFMLib.job import Job, run_job  # noqa: E402
from MedDiffFMLib.tasks.engine import EngineOptions, build_engine  # noqa: E402
from MedDiffFMLib.volume import Geometry, Volume, read_volume, write_volume  # noqa: E402

CHEST = "tests/reference_files/aorta_report/example_ct.nii.gz"
SHAPE, SPACING = (300, 512, 512), (0.7, 0.7, 1.0)


def chest_ct(data: Path, smoke: bool) -> Volume:
    """The chest CTA on a 512 x 512 x 300 grid of 0.7 x 0.7 x 1 mm voxels centred on it (air outside)."""
    source = read_volume(data / CHEST)
    shape = (12, 64, 64) if smoke else SHAPE
    spacing = (5.6, 5.6, 8.0) if smoke else SPACING
    centre = source.geometry.index_to_physical() @ np.array([*(np.array(source.array.shape[::-1]) - 1) / 2.0, 1.0])
    half = (np.array(shape[::-1]) - 1) / 2.0 * np.array(spacing)
    origin = centre[:3] - np.reshape(source.direction, (3, 3)) @ half
    target = Geometry(shape, spacing, tuple(origin), source.direction)
    ct = pp.resample(source, target, fill=-1024.0, extrapolate=False)
    noise = np.random.default_rng(0).normal(0.0, 20.0, ct.array.shape) * (ct.array > -900)  # resampling smooths
    return ct.with_array((ct.array + noise).astype(np.float32))


def child(ct_path: str, model: str | None, preview: bool, output: str) -> dict:
    """One denoising run in this process; returns its figures."""
    options = EngineOptions(model=model)
    inside = [0.0]

    def engine_factory(options: EngineOptions):
        engine = build_engine(options)
        network = engine.network

        def timed(*arguments, **keywords):
            started = time.perf_counter()
            result = network(*arguments, **keywords)
            inside[0] += time.perf_counter() - started
            return result

        engine.network = timed
        factory_result["model"] = engine.name
        return engine

    factory_result: dict = {}
    job = Job("denoise", {"ct": ct_path}, {"volume": output}, region="chest", engine=options, preview=preview)
    started = time.perf_counter()
    result = run_job(job, engine_factory)
    seconds = time.perf_counter() - started
    return dict(
        seconds=seconds,
        peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        evaluations=result.fields["network_evaluations"],
        skipped=result.fields["skipped_windows"],
        inside=inside[0] / seconds,
        model=factory_result["model"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/data/totalsegmentator-2.18.0"))
    parser.add_argument("--model", help="model name or path (default: what the command line picks)")
    parser.add_argument("--smoke", action="store_true", help="a tiny volume, to check the script")
    parser.add_argument("--child", nargs=3, metavar=("CT", "PREVIEW", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.model, args.child[1] == "1", args.child[2])))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        ct = chest_ct(args.data, args.smoke)
        path = str(write_volume(ct, Path(folder) / "chest.nrrd"))
        started = time.perf_counter()
        ndimage.gaussian_filter(ct.array.astype(np.float32), [0.75 / s for s in ct.spacing[::-1]])
        gaussian = time.perf_counter() - started
        runs = {}
        for name, preview in (("default", False), ("fast preview", True)):
            command = [sys.executable, __file__, "--child", path, "1" if preview else "0", f"{folder}/{preview}.nrrd"]
            if args.model:
                command += ["--model", args.model]
            runs[name] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    shape = " x ".join(str(n) for n in ct.array.shape[::-1])
    spacing = " x ".join(f"{s:g}" for s in ct.spacing)
    print(f"\n### Whole chest CT: {shape} voxels of {spacing} mm, 2 CPU threads\n")
    columns = "seconds | / default | / Gaussian | peak MB | network evaluations | skipped windows | in network"
    print(f"| run | model | {columns} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(
            f"| {name} | {run['model']} | {run['seconds']:.1f} | {run['seconds'] / runs['default']['seconds']:.2f} | "
            f"{run['seconds'] / gaussian:.0f}x | {run['peak_mb']:.0f} | {run['evaluations']} | {run['skipped']} | "
            f"{run['inside']:.0%} |"
        )
    print(f"| Gaussian filter (0.75 mm) | | {gaussian:.2f} | | 1x | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
