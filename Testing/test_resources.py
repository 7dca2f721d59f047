"""Shipped files (models, sample scans) are found the same way from a checkout, a wheel and Slicer."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from MedDiffFMLib import resources

ROOT = Path(__file__).resolve().parents[1]
LOOKUP = (
    "from MedDiffFMLib import resources; from MedDiffFMLib.model import weights; "
    "print(resources.shipped_models_dir()); print(resources.sample_dir()); "
    "print(sorted(card.identifier for card, _ in weights.list_bundled()))"
)


def _lookup(library_parent: Path, cwd: Path, **environment: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != resources.DATA_ENV} | environment
    env["PYTHONPATH"] = str(library_parent)
    return subprocess.run(
        [sys.executable, "-c", LOOKUP], cwd=cwd, env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()


def test_a_checkout_finds_its_own_folders():
    assert resources.shipped_models_dir() == ROOT / "models"
    assert resources.sample_dir() == ROOT / resources.SAMPLE


def test_a_wheel_carries_the_models_and_the_sample_and_finds_them_inside_itself(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("*.whl"))
    installed = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(installed)
    models, sample, bundled = _lookup(installed, cwd=tmp_path)
    assert Path(models) == installed / "MedDiffFMLib" / "data" / "models"
    assert Path(sample) == installed / "MedDiffFMLib" / "data" / resources.SAMPLE
    assert (Path(sample) / "example_ct_dicom").is_dir() and (Path(sample) / "LICENSE").exists()
    assert "meddiff-fm-demo@0.1" in bundled
    assert (installed / "MedDiffFMLib" / "data" / "models" / "meddiff-fm-1mm-0.3.safetensors").exists()


def test_the_slicer_layout_and_the_environment_variable(tmp_path):
    """Slicer installs MedDiffFMLib and models/ side by side; MEDDIFFFM_DATA points anywhere else."""
    modules = tmp_path / "qt-scripted-modules"
    (modules / "MedDiffFMLib").mkdir(parents=True)
    for path in (ROOT / "MedDiffFMLib").glob("*.py"):
        (modules / "MedDiffFMLib" / path.name).write_bytes(path.read_bytes())
    for folder in ("model", "diffusion", "tasks"):
        target = modules / "MedDiffFMLib" / folder
        target.mkdir()
        for path in (ROOT / "MedDiffFMLib" / folder).iterdir():
            if path.is_file():
                (target / path.name).write_bytes(path.read_bytes())
    (modules / "models").mkdir()
    for path in (ROOT / "models").glob("meddiff-fm-demo-0.1.*"):
        (modules / "models" / path.name).write_bytes(path.read_bytes())
    data = tmp_path / "data"
    (data / resources.SAMPLE).mkdir(parents=True)
    models, sample, bundled = _lookup(modules, cwd=tmp_path, **{resources.DATA_ENV: str(data)})
    assert Path(models) == modules / "models" and Path(sample) == data / resources.SAMPLE
    assert bundled == "['meddiff-fm-demo@0.1']"
