"""Training speed: samples/s of one optimisation step in float32 and in bfloat16 autocast, in one run.

    python benchmarks/training_speed.py [--models demo base1mm] [--patch 32] [--batch 4] [--steps 6]

Each row times the real training step of :class:`Training.pretrain.Trainer` (forward, L1 noise
loss, backward, gradient clipping, Adam, EMA update) on a synthetic prepared cache, for contiguous
float32 weights and for bfloat16 autocast with channels-last-3D weights (``mixed_precision: auto``
on a CPU with AMX-BF16 or AVX512-BF16). The speed-up is the ratio of the two rows of a model,
measured back to back in the same process; the first steps (warm-up) are not counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffFMLib.device import native_bf16  # noqa: E402
from MedDiffFMLib.volume import Volume, write_volume  # noqa: E402
from Training.config import TrainingConfig  # noqa: E402
from Training.pretrain import Distributed, Trainer, noisy_batch  # noqa: E402

WARMUP = 2


def synthetic_cache(folder: Path, shape: tuple[int, int, int] = (48, 80, 80)) -> Path:
    """A one-case prepared cache of smooth random HU (the step's cost does not depend on content)."""
    rng = np.random.default_rng(0)
    hu = np.clip(rng.normal(0, 300, shape), -1000, 1500).astype(np.int16)
    anatomy = (hu > -500).astype(np.uint8)
    write_volume(Volume(hu, (1.0, 1.0, 1.0)), folder / "case_ct.nii.gz")
    write_volume(Volume(anatomy, (1.0, 1.0, 1.0)), folder / "case_anatomy.nii.gz")
    entry = dict(region="abdomen", image="case_ct.nii.gz", anatomy="case_anatomy.nii.gz", shape=list(shape))
    manifest = {"spacing_mm": 1.0, "cases": {"case": {"status": "done", "regions": [entry]}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def samples_per_second(config: TrainingConfig, data: Path, steps: int) -> float:
    """Samples/s of ``steps`` optimisation steps after :data:`WARMUP` uncounted ones."""
    with tempfile.TemporaryDirectory() as output:
        trainer = Trainer(config, data, Path(output), Distributed())
        batches = (batch for epoch in range(WARMUP + steps) for batch in trainer.loader(epoch))
        generator = torch.Generator().manual_seed(0)
        elapsed = 0.0
        for step in range(WARMUP + steps):
            batch = next(batches)
            started = time.perf_counter()
            x_t, t, target = noisy_batch(batch, trainer.schedule, generator, trainer.env.device)
            with trainer.autocast():
                prediction = trainer.network(
                    x_t, t, coordinates=batch["coordinates"], region=batch["region"], anatomy=batch["anatomy"]
                )
            torch.nn.functional.l1_loss(prediction.float(), target).backward()
            trainer.optimizer_step()
            if step >= WARMUP:
                elapsed += time.perf_counter() - started
    return steps * config.batch_size / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo", "base1mm"], help="model presets")
    parser.add_argument("--patch", type=int, default=32, help="patch edge in voxels")
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row")
    args = parser.parse_args(argv)
    device = Distributed().device
    print(
        f"{platform.machine()}, {platform.processor() or 'CPU'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}, native bf16: {native_bf16(device)}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = synthetic_cache(Path(folder))
        for model in args.models:
            base = dict(
                model=model,
                model_overrides={"patch_size": args.patch},
                batch_size=args.batch,
                accumulation=1,
                level_probabilities=(0.0, 0.0, 1.0),
            )
            fp32 = samples_per_second(
                TrainingConfig(**base, mixed_precision="no", memory_format="contiguous"), data, args.steps
            )
            bf16 = samples_per_second(
                TrainingConfig(**base, mixed_precision="bf16", memory_format="channels_last"), data, args.steps
            )
            rows.append((model, fp32, bf16))
    print("\n| model | patch | batch | fp32 samples/s | bf16 + channels-last samples/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for model, fp32, bf16 in rows:
        print(f"| {model} | {args.patch}^3 | {args.batch} | {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
