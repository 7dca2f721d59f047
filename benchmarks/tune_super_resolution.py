"""Choose super-resolution's sigma_n, zeta and draws on training data, never on the held-out scan.

    python benchmarks/tune_super_resolution.py --model models/meddiff-fm-1mm-0.4.safetensors \
        --ct /work/train/raw/totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz

Averages slabs of ``--factor`` slices of a CT the model and its SR ControlNet were trained on
(default: the chest CTA, 1.5 mm slices, into 6 mm slabs; central 160 mm in-plane, slices
``--slices``) and prints PSNR and SSIM inside the body against the thin slices for a grid of
sigma_n, zeta and draws, beside cubic interpolation made consistent with the slabs (the sampler's start).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import WINDOW, controlled_engine, crop, slab_pair, ssim  # noqa: E402

from MedDiffFMLib.anatomy import body_mask  # noqa: E402
from MedDiffFMLib.diffusion.operators import ZSlabAverage  # noqa: E402
from MedDiffFMLib.metrics import psnr  # noqa: E402
from MedDiffFMLib.model import load_model  # noqa: E402
from MedDiffFMLib.tasks import Engine, super_resolve  # noqa: E402
from MedDiffFMLib.volume import read_volume  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="base model (its SR ControlNet is found beside it)")
    parser.add_argument("--ct", type=Path, required=True, help="a CT from the models' training data")
    parser.add_argument("--slices", type=int, nargs=2, default=(100, 148), help="slice range of the CT")
    parser.add_argument("--factor", type=int, default=4, help="thin slices per thick slab")
    parser.add_argument("--region", default="chest")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sigmas", type=float, nargs="+", default=(0.15, 0.3, 0.5))
    parser.add_argument("--zetas", type=float, nargs="+", default=(1.0,), help="fresh-noise shares")
    parser.add_argument("--draws", type=int, nargs="+", default=(1, 2))
    args = parser.parse_args()
    ct = read_volume(args.ct)
    thin, thick = slab_pair(crop(ct, (slice(*args.slices), slice(None), slice(None))), args.factor)
    body = body_mask(thin.array)
    engine = Engine(load_model(args.model), device="auto", batch_size=8, overlap=0.25)
    sr_engine, why = controlled_engine(engine, "controlnet-sr", args.model.parent)
    if sr_engine is None:
        print(why)
        return 1
    consistent = ZSlabAverage(args.factor).interpolate(torch.from_numpy(thick.array)).numpy()
    print(f"{thick.spacing[2]:g} mm slabs -> {thin.spacing[2]:g} mm, {thin.array.shape} voxels, {sr_engine.name}")
    print("| sigma_n | zeta | draws | PSNR dB | SSIM |\n|---|---|---|---|---|")
    print(
        f"| consistent cubic (no model) | | | {psnr(thin.array, consistent, WINDOW, body):.2f} | "
        f"{ssim(thin.array, consistent, body):.3f} |"
    )
    for sigma, zeta, draws in itertools.product(args.sigmas, args.zetas, args.draws):
        result = super_resolve(
            thick,
            sr_engine,
            spacing=thin.spacing[2],
            steps=args.steps,
            sigma_n=sigma,
            zeta=zeta,
            draws=draws,
            region=args.region,
            seed=0,
        ).array
        print(
            f"| {sigma:g} | {zeta:g} | {draws} | {psnr(thin.array, result, WINDOW, body):.2f} | "
            f"{ssim(thin.array, result, body):.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
