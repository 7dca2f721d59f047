"""Device choice and seeding."""

from __future__ import annotations

import logging

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def select_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name`` (``auto``: CUDA, then Apple MPS, else CPU).

    On CPU a one-line notice is logged, because whole-volume diffusion is slow there.
    """
    if name not in DEVICE_CHOICES:
        raise InputError(f"Unknown device '{name}'. Choose one of: {', '.join(DEVICE_CHOICES)}.")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "CUDA was requested but no CUDA GPU is visible to PyTorch. Install a CUDA build of "
            "PyTorch matching your driver, or choose device 'cpu'."
        )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("Apple MPS was requested but is not available. Choose device 'cpu'.")
    if name == "cpu":
        logger.warning("No GPU found: running on the CPU, which is slow for whole-volume diffusion.")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (fast autocast): a CUDA GPU that supports it, or
    a CPU with AMX-BF16 or AVX512-BF16 (bfloat16 on other CPUs is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU random generator seeded with ``seed`` (random seed if None).

    Noise is always drawn on the CPU and then moved, so a seed gives the same noise on every device.
    """
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32) drawn on the CPU from ``generator``."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
