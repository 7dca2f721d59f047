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
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

MINIMUM_TORCH = "2.2"
REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("monai", "monai>=1.4"),
    ("einops", "einops>=0.7"),
    ("safetensors", "safetensors>=0.4"),
    ("nibabel", "nibabel>=5.0"),
    ("scipy", "scipy>=1.10"),
    ("tqdm", "tqdm>=4.60"),
    ("skimage", "scikit-image>=0.22"),
    ("PIL", "Pillow>=10.0"),
)
"""(import name, pip requirement) of every package MedDiffFMLib imports besides torch, numpy and SimpleITK."""

PROTECTED = ("numpy", "SimpleITK", "torch", "vtk")
"""Distributions that Slicer (or the PyTorch extension) provides: pinned to their installed versions."""


class DependencyError(RuntimeError):
    """Installing the Python dependencies failed or was declined; the message says what to do."""


LIBRARY = "MedDiffFMLib"


def module_missing(name: str) -> bool:
    return importlib.util.find_spec(name) is None


def put_library_on_path(module_folder: str | os.PathLike) -> Path | None:
    """Make ``MedDiffFMLib`` importable in Slicer's Python; returns the folder that holds it, or None.

    Slicer puts only the module's folder on ``sys.path``. A built extension installs the library
    into that folder; a source checkout added under *Additional module paths* has it one level up,
    beside ``MedDiffFM/``. The first of the two that holds the library goes on ``sys.path``.
    """
    spec = importlib.util.find_spec(LIBRARY)
    if spec is not None and spec.origin:
        return Path(spec.origin).parent.parent
    module_folder = Path(module_folder).resolve()
    _searched[:] = [module_folder, module_folder.parent]
    for candidate in _searched:
        if (candidate / LIBRARY / "__init__.py").is_file():
            sys.path.insert(0, str(candidate))
            importlib.invalidate_caches()
            return candidate
    return None


_searched: list[Path] = []


def library_missing_message() -> str:
    """What to do when ``MedDiffFMLib`` cannot be imported (it is part of the extension, not a pip package)."""
    where = " or ".join(f"'{folder}'" for folder in _searched) or "Slicer's Python path"
    return (
        f"Dependency install failed: the MedDiffFMLib library is not in {where}. If you added MedDiffFM/ under "
        "Additional module paths, keep it inside the whole repository checkout (MedDiffFMLib/ sits next to it) "
        "and restart Slicer; otherwise reinstall the MedDiffFM extension."
    )


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.8.0+cu126"`` -> ``(2, 8, 0)``: the leading numeric release parts of a version string."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def torch_too_old() -> str | None:
    """The installed torch version if it is older than ``MINIMUM_TORCH`` (read without importing torch)."""
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    return installed if version_tuple(installed) < version_tuple(MINIMUM_TORCH) else None


def missing_packages() -> list[str]:
    """Pip requirements of the packages that cannot be imported now (torch is reported as ``torch``, or
    ``torch>=MINIMUM`` when it is too old; the library itself as ``MedDiffFMLib``)."""
    missing = [LIBRARY] if module_missing(LIBRARY) else []
    if module_missing("torch"):
        missing.append("torch")
    elif torch_too_old():
        missing.append(f"torch>={MINIMUM_TORCH}")
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
    if LIBRARY in missing:
        raise DependencyError(library_missing_message())
    old_torch = torch_too_old()
    if old_torch:
        raise DependencyError(
            f"Dependency install failed: PyTorch {old_torch} is installed, MedDiffFM needs {MINIMUM_TORCH} or later. "
            f"Open the 'PyTorch Util' module, uninstall PyTorch, install version {MINIMUM_TORCH} or later, restart "
            "Slicer and press Apply again."
        )
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
        try:
            installed = install_torch()
        except Exception as error:  # noqa: BLE001 - PyTorchUtils raises CalledProcessError, OSError, ...
            raise DependencyError(
                f"Dependency install failed: installing PyTorch failed ({error}). Check the network (and proxy "
                "settings), or open the 'PyTorch Util' module and install PyTorch there; then restart Slicer."
            ) from error
        if installed is None or module_missing("torch"):
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
