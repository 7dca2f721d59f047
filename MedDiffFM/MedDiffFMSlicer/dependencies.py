"""Python packages MedDiffFM needs in Slicer's Python, and installing the missing ones after asking.

As the best Slicer AI extensions do: torch comes through the PyTorch extension's ``PyTorchUtils``
(it picks the CUDA or CPU build that matches the computer), everything else through
``slicer.util.pip_install``, with a constraints file that pins the numpy, SimpleITK, torch and vtk
already in Slicer, so an install never replaces Slicer's own copies. Nothing here imports torch,
MedDiffFMLib or Qt; the Slicer functions are passed in, so the decisions can be tested anywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Callable

MINIMUM_TORCH = "2.2"
REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("monai", "monai>=1.4"),
    ("einops", "einops>=0.7"),
    ("safetensors", "safetensors>=0.4"),
    ("nibabel", "nibabel>=5.0"),
    ("scipy", "scipy>=1.10"),
    ("tqdm", "tqdm>=4.60"),
)
"""(import name, pip requirement) of every package MedDiffFMLib imports besides torch, numpy and SimpleITK."""

PROTECTED = ("numpy", "SimpleITK", "torch", "vtk")
"""Distributions that Slicer (or the PyTorch extension) provides: pinned to their installed versions."""


class DependencyError(RuntimeError):
    """Installing the Python dependencies failed or was declined; the message says what to do."""


def module_missing(name: str) -> bool:
    return importlib.util.find_spec(name) is None


def missing_packages() -> list[str]:
    """Pip requirements of the packages that cannot be imported now (torch is reported as ``torch``)."""
    missing = ["torch"] if module_missing("torch") else []
    return missing + [requirement for module, requirement in REQUIREMENTS if module_missing(module)]


def constraints() -> str:
    """pip constraints pinning the protected distributions that are installed (one ``name==version`` a line)."""
    lines = []
    for name in PROTECTED:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def ensure(
    confirm: Callable[[str, str], bool],
    pip_install: Callable[[list[str]], object],
    install_torch: Callable[[], object] | None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Install what :func:`missing_packages` lists after ``confirm(text, details)`` says yes.

    ``install_torch()`` installs torch (``None``: the PyTorch extension is missing); ``pip_install(args)``
    gets a pip argument list. Returns what was installed; raises :class:`DependencyError` otherwise.
    """
    missing = missing_packages()
    if not missing:
        return []
    if not confirm(
        "MedDiffFM needs additional Python packages. Installing them needs a network connection and may take "
        "several minutes (PyTorch is large). Install now?",
        "Packages to install: " + ", ".join(missing),
    ):
        raise DependencyError("Dependency install failed: cancelled by the user. MedDiffFM cannot run without them.")
    if "torch" in missing:
        if install_torch is None:
            raise DependencyError(
                "Dependency install failed: MedDiffFM needs the PyTorch extension. Install 'PyTorch' from the "
                "Extensions Manager, restart Slicer, and press Apply again."
            )
        log("Installing PyTorch through the PyTorch extension (it chooses the CUDA or CPU build)...")
        if install_torch() is None or module_missing("torch"):
            raise DependencyError(
                "Dependency install failed: PyTorch could not be installed. Open the 'PyTorch Util' module, install "
                "PyTorch there (it shows the CUDA version it picks), restart Slicer and try again."
            )
    others = [requirement for requirement in missing if requirement != "torch"]
    if others:
        handle, path = tempfile.mkstemp(prefix="MedDiffFM-constraints-", suffix=".txt")
        try:
            with os.fdopen(handle, "w") as file:
                file.write(constraints())
            log("Installing " + ", ".join(others) + " ...")
            try:
                pip_install([*others, "-c", path])
            except Exception as error:  # noqa: BLE001 - pip failures come in many types
                raise DependencyError(
                    f"Dependency install failed: pip could not install {', '.join(others)} ({error}). Check the "
                    "network (and proxy settings), then press Apply again; the Python console shows pip's output."
                ) from error
        finally:
            os.remove(path)
    still = [requirement for requirement in missing_packages() if requirement in missing]
    if still:
        raise DependencyError(
            f"Dependency install failed: {', '.join(still)} still cannot be imported. Restart Slicer and try again."
        )
    return missing
