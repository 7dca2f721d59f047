"""Pre-train a MedDiff-FM base model (Docs/METHOD.md 1.1-1.2), from one CPU to many GPUs.

Single process::

    python -m Training.pretrain --config Training/configs/demo.yaml --data data/prepared --output runs/demo

Several GPUs or nodes (PyTorch DDP; only rank 0 writes)::

    torchrun --nproc_per_node 8 -m Training.pretrain --config Training/configs/paper.yaml --data ... --output ...

Re-running with the same ``--output`` resumes from its last checkpoint, with the same data order.
At the end (or with ``--export-only``) the EMA weights are exported as a catalogue-ready checkpoint
(``.safetensors`` + model card; a base model's card carries the median HU of each label value in the
training data, ``anatomy_hu``, from :mod:`Training.anatomy_hu`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from MedDiffFMLib.device import native_bf16
from MedDiffFMLib.diffusion.schedule import NoiseSchedule
from MedDiffFMLib.errors import InputError, MedDiffFMError
from MedDiffFMLib.model.network import ControlledNet, MedDiffFMNet
from MedDiffFMLib.model.weights import ModelCard, load_controlled_model, load_model, save_checkpoint

from .anatomy_hu import typical_hu
from .checkpointing import load_training_state, save_training_state
from .config import TrainingConfig, load_config
from .dataset import MultiLevelDataset, manifest_entries
from .previews import save_preview

logger = logging.getLogger("pretrain")
EXPORT_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
LOG_FIELDS = ("step", "epoch", "loss", "learning_rate", "samples_per_second", "elapsed_seconds", "data_wait_share")


def timed(iterable: Iterable, waiting: list[float]) -> Iterator:
    """The items of ``iterable``; the seconds spent waiting for each are added to ``waiting[0]``."""
    iterator = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        waiting[0] += time.perf_counter() - start
        yield item


class Distributed:
    """Rank, world size and device of this process (plain single process when not under torchrun)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1:
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True on any process (so every process takes the same branch)."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def mean(self, value: float) -> float:
        """Average of ``value`` over all processes."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def noise_loss(
    prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, low_snr_cap: float
) -> torch.Tensor:
    """Mean L1 error of a batch ``(N, 1, D, H, W)`` against its target (the noise, or ``v``:
    :meth:`~MedDiffFMLib.diffusion.schedule.NoiseSchedule.training_target`), each sample weighted by
    ``clamp(1 / sqrt(SNR_t), 1, low_snr_cap)`` (see :class:`~.config.TrainingConfig`)."""
    errors = (prediction.float() - target).abs().flatten(1).mean(1)
    if low_snr_cap > 1.0:
        abar = schedule.alphas_cumprod[t.cpu()].double()
        weights = ((1.0 - abar) / abar).sqrt().clamp(1.0, low_snr_cap).to(errors)
        errors = errors * weights
    return errors.mean()


def pure_noise_timesteps(schedule: NoiseSchedule, voxels: int) -> int:
    """The first timestep from which even the mean of ``voxels`` voxels is lost in the noise:
    ``SNR_t * voxels < 1`` (cosine schedule, 32^3 patches: t >= 996)."""
    snr = schedule.alphas_cumprod / (1.0 - schedule.alphas_cumprod)
    visible = (snr * voxels >= 1.0).nonzero()
    return int(visible.max()) + 1 if len(visible) else 0


def noisy_batch(
    batch: dict,
    schedule: NoiseSchedule,
    generator: torch.Generator,
    device: torch.device,
    pure_noise_share: float = 0.0,
    max_sigma: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """``(x_t, t, target)`` for a batch: uniform timesteps, up to the one of noise level
    ``max_sigma`` when that is positive (a ``pure_noise_share`` of them drawn from
    :func:`pure_noise_timesteps` of a sample's voxels instead), Gaussian noise, seeded by ``generator``;
    ``target`` is what the network should output (:meth:`NoiseSchedule.training_target`)."""
    x0 = batch["image"].to(device)
    last = schedule.timestep_for_sigma(max_sigma) if max_sigma > 0 else schedule.num_timesteps - 1
    t = torch.randint(0, last + 1, (x0.shape[0],), generator=generator)
    if pure_noise_share > 0:
        first = min(pure_noise_timesteps(schedule, x0[0].numel()), schedule.num_timesteps - 1)
        late = torch.randint(first, schedule.num_timesteps, t.shape, generator=generator)
        t = torch.where(torch.rand(t.shape, generator=generator) < pure_noise_share, late, t)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    abar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1).to(device)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t.to(device), schedule.training_target(x0, noise, t)


class Trainer:
    """Runs the optimisation loop (weighted L1 noise loss, Adam, accumulation, EMA, clipping, checkpoints).

    With ``task = "base"`` it pre-trains a :class:`MedDiffFMNet` of ``config.model_config``; with a
    ControlNet task (``controlnet-sr``, ``controlnet-lesion``) it fine-tunes a ControlNet on the
    frozen base model in ``base_weights`` (whose architecture then replaces the config's), feeding
    each sample's ``condition``. ``init_weights`` warm-starts a new run (not a resumed one) from a
    saved model of the same architecture and task, so one model's training can continue over
    several runs or from a shipped model.

    Precision and layout follow ``config.mixed_precision`` and ``config.memory_format``: on a CPU
    with AMX-BF16, bfloat16 autocast with channels-last-3D weights (the ``auto`` default) trains
    several times faster than float32 (``benchmarks/training_speed.py``); the weights, the
    optimiser and the EMA stay float32.
    """

    def __init__(
        self,
        config: TrainingConfig,
        data: Path,
        output: Path,
        env: Distributed,
        task: str = "base",
        base_weights: Path | None = None,
        init_weights: Path | None = None,
    ) -> None:
        self.config, self.output, self.env, self.task = config, output, env, task
        torch.manual_seed(config.seed)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest 3D kernels
        if task == "base":
            self.model = MedDiffFMNet(config.model_config).to(env.device)
            self.trainable = list(self.model.parameters())
        else:
            if base_weights is None:
                raise InputError("Fine-tuning a ControlNet needs the base model's weights (--base).")
            self.model = ControlledNet(load_model(base_weights)).to(env.device)
            self.trainable = list(self.model.controlnet.parameters())
        architecture = self.model.config
        self.bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and native_bf16(env.device))
        channels_last = config.memory_format == "channels_last" or (
            config.memory_format == "auto" and env.device.type in ("cpu", "cuda")
        )
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
            if config.ema_decay > 0
            else None
        )
        self.optimizer = torch.optim.Adam(self.trainable, lr=config.learning_rate)
        self.schedule = NoiseSchedule(architecture.num_train_timesteps, architecture.schedule, architecture.prediction)
        if architecture.prediction == "v" and config.low_snr_cap > 1.0:
            raise InputError(
                "low_snr_cap weighs a noise-predicting model's loss; a 'v' model's loss already is the "
                "clean-image error at high noise. Set low_snr_cap to 1."
            )
        entries = manifest_entries(data, config.case_weights)
        self.entries = entries
        if task != "base" and any("condition" not in entry for entry in entries):
            raise InputError(f"'{data}' has no task conditions; make it with 'python -m Training.make_pairs'.")
        self.dataset = MultiLevelDataset(
            entries,
            architecture.patch_size,
            config.level_probabilities,
            config.region_dropout,
            config.anatomy_dropout,
            seed=config.seed,
            foreground=config.foreground,
            condition_focus=config.condition_focus,
            position_jitter=config.position_jitter,
            field_of_view_crop=config.field_of_view_crop,
            samples_per_volume=config.samples_per_volume,
        )
        self.network = DistributedDataParallel(self.model) if env.world > 1 else self.model
        base_sha256 = self.model.base.card.sha256 if task != "base" else ""
        self.state = {"step": 0, "epoch": 0, "batch": 0, "elapsed_seconds": 0.0, "base_sha256": base_sha256}
        restored = load_training_state(output, self.model, self.ema, self.optimizer, env.device)
        if restored is not None:
            if restored.get("base_sha256", "") != base_sha256:
                raise InputError(
                    f"'{output}' holds a run on another base model; resume with the same --base or use a new --output."
                )
            self.state = restored
            logger.info("resumed from step %d", self.state["step"])
        elif init_weights is not None:
            self.warm_start(init_weights)
        logger.info(
            "%s, %s weights on %s",
            "bfloat16 autocast" if self.bf16 else "float32",
            "channels-last" if channels_last else "contiguous",
            env.device,
        )
        if env.main:
            self.truncate_log(self.state["step"])

    def warm_start(self, path: Path) -> None:
        """Start from the weights of a saved model of this run's task, EMA included; a base model must
        have this run's architecture. A ControlNet may come from another version of the base model
        (same architecture): it carries its condition encoder over to the new base."""
        if self.task == "base":
            source = load_model(path)
            if replace(source.config, prediction=self.model.config.prediction) != self.model.config:
                raise InputError(
                    f"'{path}' has another architecture than this run's; warm-start needs the same model preset "
                    "and overrides."
                )
            if source.config.prediction != self.model.config.prediction:
                logger.info(
                    "the saved model predicts '%s'; training it to predict '%s'",
                    source.config.prediction,
                    self.model.config.prediction,
                )
            self.model.load_state_dict(source.state_dict())
        else:
            source = load_controlled_model(self.model.base, path, self.task, same_base=False)
            self.model.controlnet.load_state_dict(source.controlnet.state_dict())
            if source.card.base_sha256 != self.model.base.card.sha256:
                logger.info("the ControlNet was trained on %s; fine-tuning it on this base", source.card.base_model)
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
        logger.info("warm-started from %s", source.card.identifier)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loader(self, epoch: int) -> DataLoader:
        sampler = DistributedSampler(
            self.dataset,
            num_replicas=self.env.world,
            rank=self.env.rank,
            shuffle=True,
            seed=self.config.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        return DataLoader(
            self.dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=self.config.num_workers,
            prefetch_factor=4 if self.config.num_workers else None,
            pin_memory=self.env.device.type == "cuda",
            drop_last=True,
        )

    def run(self, stop_after_minutes: float | None = None) -> None:
        config, env = self.config, self.env
        progress = tqdm(total=config.steps, initial=self.state["step"], desc="pretrain", disable=not env.main)
        started, window_start, window_samples, losses = time.time(), time.time(), 0, []
        waiting = [0.0]
        elapsed_before = self.state["elapsed_seconds"]
        while self.state["step"] < config.steps:
            epoch = self.state["epoch"]
            loader = self.loader(epoch)
            if len(loader) < config.accumulation:
                raise InputError(
                    f"An epoch holds {len(loader)} batches per process, fewer than the {config.accumulation} "
                    "accumulated per step: add data or lower 'accumulation' / 'batch_size'."
                )
            self.optimizer.zero_grad(set_to_none=True)
            for index, batch in enumerate(timed(loader, waiting)):
                if index < self.state["batch"]:
                    continue
                seed = np.random.SeedSequence([config.seed, env.rank, epoch, index]).generate_state(1)[0]
                generator = torch.Generator().manual_seed(int(seed))
                micro = index % config.accumulation
                last_micro = micro == config.accumulation - 1
                sync = contextlib.nullcontext() if last_micro or env.world == 1 else self.network.no_sync()
                with sync:
                    x_t, t, target = noisy_batch(
                        batch, self.schedule, generator, env.device, config.pure_noise_share, config.max_sigma
                    )
                    inputs = dict(
                        coordinates=batch["coordinates"].to(env.device),
                        region=batch["region"].to(env.device),
                        anatomy=batch["anatomy"].to(env.device),
                    )
                    if self.task != "base":
                        inputs["control"] = batch["condition"].to(env.device)
                    with self.autocast():
                        prediction = self.network(x_t, t, **inputs)
                    loss = noise_loss(prediction, target, t, self.schedule, config.low_snr_cap)
                    (loss / config.accumulation).backward()
                losses.append(float(loss.detach()))
                window_samples += x_t.shape[0] * env.world
                self.state["batch"] = index + 1
                if not last_micro:
                    continue
                self.optimizer_step()
                progress.update(1)
                step = self.state["step"]
                elapsed = elapsed_before + time.time() - started
                self.state["elapsed_seconds"] = elapsed
                if step % config.log_every == 0 or step == config.steps:
                    loss_mean = env.mean(float(np.mean(losses)))
                    window = max(time.time() - window_start, 1e-9)
                    self.log(step, epoch, loss_mean, window_samples / window, elapsed, waiting[0] / window)
                    progress.set_postfix(loss=f"{loss_mean:.4f}")
                    window_start, window_samples, losses, waiting[0] = time.time(), 0, [], 0.0
                if env.main and (step % config.preview_every == 0 or step == config.steps):
                    save_preview(
                        self.ema.module if self.ema else self.model,
                        self.dataset,
                        self.schedule,
                        self.output,
                        step,
                        env.device,
                    )
                out_of_time = env.any(
                    stop_after_minutes is not None and time.time() - started > stop_after_minutes * 60
                )
                if step % config.checkpoint_every == 0 or step == config.steps or out_of_time:
                    self.checkpoint()
                if step >= config.steps or out_of_time:
                    progress.close()
                    return
            self.state.update(epoch=epoch + 1, batch=0)
        progress.close()

    def optimizer_step(self) -> None:
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.state["step"] += 1

    def checkpoint(self) -> None:
        if self.env.main:
            save_training_state(self.output, self.model, self.ema, self.optimizer, self.state)
        if self.env.world > 1:
            dist.barrier()

    def truncate_log(self, step: int) -> None:
        """Drop log rows written after ``step`` (by a run that stopped before its next checkpoint)."""
        path = self.output / "log.csv"
        if not path.exists():
            return
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [row for row in rows[1:] if int(row[0]) <= step]
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows([rows[0], *kept] if kept else [])
        if not kept:
            path.unlink()

    def log(self, step: int, epoch: int, loss: float, rate: float, elapsed: float, data_share: float) -> None:
        """Append a row to ``log.csv``; ``data_share`` is the share of the time spent waiting for data."""
        if not self.env.main:
            return
        path = self.output / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(LOG_FIELDS)
            values = (f"{loss:.6f}", self.config.learning_rate, f"{rate:.3f}", f"{elapsed:.1f}", f"{data_share:.3f}")
            writer.writerow([step, epoch, *values])

    def export(
        self, name: str, version: str, training_data: str, notes: list[str], dtype: torch.dtype | None = None
    ) -> Path:
        """Save the EMA (or raw) weights as ``<output>/<name>-<version>.safetensors`` with its model card
        (floating-point weights as ``dtype`` when given, e.g. bfloat16 for half the size)."""
        weights = self.ema.module if self.ema is not None else self.model
        hours = self.state["elapsed_seconds"] / 3600
        device = torch.cuda.get_device_name(0) if self.env.device.type == "cuda" else f"{platform.processor() or 'CPU'}"
        base_card = self.model.base.card if self.task != "base" else None
        card = ModelCard(
            name=name,
            version=version,
            task=self.task,
            base_model=base_card.identifier if base_card else "",
            base_sha256=base_card.sha256 if base_card else "",
            config={},
            training_data=training_data,
            training=(
                f"{self.state['step']} optimiser steps x {self.config.batch_size} samples x {self.config.accumulation} "
                f"accumulation x {self.env.world} processes; {hours:.2f} h on {self.env.world} x {device}; "
                f"configuration: {self.config.to_dict()}"
            ),
            license="Apache-2.0",
            intended_use=(
                "Demonstration and research only. Not a medical device; not for clinical use."
                if self.config.model != "paper"
                else "Research only. Not a medical device; not for clinical use."
            ),
            notes=notes,
            anatomy_hu=typical_hu(self.entries) if self.task == "base" else {},
        )
        path = self.output / f"{name}-{version}.safetensors"
        save_checkpoint(weights, path, card, dtype)
        return path


def build_parser(description: str) -> argparse.ArgumentParser:
    """Options shared by pre-training and ControlNet fine-tuning."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, required=True, help="YAML training configuration")
    parser.add_argument("--data", type=Path, required=True, help="prepared cache (Training.prepare_data)")
    parser.add_argument("--output", type=Path, required=True, help="run folder (checkpoints, log.csv, previews)")
    parser.add_argument("--stop-after-minutes", type=float, help="checkpoint and stop after this wall time")
    parser.add_argument(
        "--init", type=Path, help="warm-start a new run from this saved model (same architecture), e.g. a shipped one"
    )
    parser.add_argument("--export", metavar="NAME@VERSION", help="export the final EMA weights under this name")
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="export the last checkpoint's EMA weights now (before the configured steps are done), without training",
    )
    parser.add_argument("--training-data", default="", help="description of the training data for the model card")
    parser.add_argument("--note", action="append", default=[], help="note for the model card (repeatable)")
    parser.add_argument(
        "--export-dtype",
        choices=sorted(EXPORT_DTYPES),
        default="float32",
        help="type of the exported weights (bfloat16: half the file; loading casts them back to float32)",
    )
    return parser


def run(args: argparse.Namespace, task: str = "base", base_weights: Path | None = None) -> int:
    """Train (or resume), then export when finished; returns the process exit code."""
    env = Distributed()
    try:
        config = load_config(args.config)
        args.output.mkdir(parents=True, exist_ok=True)
        if args.export_only and not args.export:
            raise InputError("--export-only needs --export NAME@VERSION.")
        trainer = Trainer(config, args.data, args.output, env, task, base_weights, args.init)
        if args.export_only and trainer.state["step"] == 0:
            raise InputError(f"'{args.output}' holds no checkpoint to export.")
        if not args.export_only:
            trainer.run(args.stop_after_minutes)
        if args.export and env.main and (args.export_only or trainer.state["step"] >= config.steps):
            name, _, version = args.export.partition("@")
            dtype = EXPORT_DTYPES[args.export_dtype]
            path = trainer.export(name, version or "1.0", args.training_data, args.note, dtype)
            print(f"exported {path}")
    except MedDiffFMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        env.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return run(build_parser("Pre-train a MedDiff-FM base model.").parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
