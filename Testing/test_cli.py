"""The meddiff-fm command line on the bundled sample."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA, crop, random_tiny_model

from MedDiffFMLib import cli
from MedDiffFMLib.model import weights as w
from MedDiffFMLib.volume import read_volume, write_volume

CT = str(DATA / "example_ct_sm.nii.gz")
SEG = str(DATA / "example_seg.nii.gz")


@pytest.mark.parametrize("command", [[], ["denoise"], ["synthesize"], ["detect-anomalies"], ["demo"], ["models"]])
def test_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "MedDiffFMLib.cli", *command, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage: meddiff-fm" in result.stdout


@pytest.fixture
def small_files(tmp_path, small_ct, small_seg):
    return str(write_volume(small_ct, tmp_path / "ct.nrrd")), str(write_volume(small_seg, tmp_path / "seg.nrrd"))


@pytest.fixture
def saved_model(tmp_path):
    path = tmp_path / "tiny.safetensors"
    w.save_checkpoint(random_tiny_model(), path, w.ModelCard(name="tiny", version="1", task="base", config={}))
    return str(path)


def test_denoise_round_trip(tmp_path, small_files, saved_model, capsys):
    ct, seg = small_files
    out = tmp_path / "out.nii.gz"
    code = cli.main(["denoise", ct, str(out), "--anatomy", seg, "--model", saved_model, "--steps", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    result, source = read_volume(out), read_volume(ct)
    assert result.geometry.same_grid(source.geometry)
    assert "region abdomen (anatomy label map)" in capsys.readouterr().out
    assert cli.main(["denoise", ct, str(out), "--model", saved_model, "--steps", "1", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_untrained_model_is_announced_loudly(tmp_path, small_files, capsys):
    ct, _ = small_files
    assert cli.main(["denoise", ct, str(tmp_path / "o.mha"), "--untrained", "tiny", "--steps", "1", "--quiet"]) == 0
    assert "UNTRAINED MODEL" in capsys.readouterr().err


def test_detect_anomalies_and_synthesize(tmp_path, small_files, saved_model):
    ct, seg = small_files
    out = tmp_path / "map.nii.gz"
    assert (
        cli.main(
            ["detect-anomalies", ct, str(out), "--anatomy", seg, "--organ", "liver", "--model", saved_model, "--quiet"]
        )
        == 0
    )
    mask = read_volume(tmp_path / "map_mask.nii.gz")
    assert mask.array.dtype == np.uint8 and mask.geometry.same_grid(read_volume(ct).geometry)
    synthetic = tmp_path / "synthetic.nrrd"
    assert (
        cli.main(
            [
                "synthesize",
                seg,
                str(synthetic),
                "--region",
                "abdomen",
                "--steps",
                "2",
                "--model",
                saved_model,
                "--quiet",
            ]
        )
        == 0
    )
    assert read_volume(synthetic).geometry.same_grid(read_volume(seg).geometry)


def test_errors_exit_with_code_2_and_a_message(tmp_path, small_files, saved_model, capsys):
    ct, seg = small_files
    assert (
        cli.main(
            [
                "detect-anomalies",
                ct,
                str(tmp_path / "m.nrrd"),
                "--anatomy",
                seg,
                "--organ",
                "livr",
                "--model",
                saved_model,
            ]
        )
        == 2
    )
    assert "Unknown structure 'livr'" in capsys.readouterr().err
    assert cli.main(["denoise", ct, str(tmp_path / "o.nrrd")]) == 2
    assert "No installed model" in capsys.readouterr().err


def test_truncated_input_is_refused_and_nothing_written(tmp_path, small_files, saved_model, capsys):
    cut = write_volume(read_volume(small_files[0]), tmp_path / "cut.nii.gz")
    cut.write_bytes(cut.read_bytes()[:5000])
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "o.nii.gz"
    assert cli.main(["denoise", str(cut), str(out), "--sigma", "0.05", "--model", saved_model, "--quiet"]) == 2
    assert "incomplete or corrupt" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before


def test_interrupted_run_writes_nothing(tmp_path, small_files, saved_model, monkeypatch):
    ct, _ = small_files

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("MedDiffFMLib.tasks.denoise"), "denoise", interrupted)
    assert cli.main(["denoise", ct, str(tmp_path / "never.nrrd"), "--model", saved_model]) == 130
    assert not (tmp_path / "never.nrrd").exists()
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


def test_demo_writes_volumes_and_figure(tmp_path, monkeypatch, sample_ct, sample_seg, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_volume(crop(sample_ct, slice(8, 24), slice(30, 70), slice(10, 58)), data / "ct.nii.gz")
    write_volume(crop(sample_seg, slice(8, 24), slice(30, 70), slice(10, 58)), data / "seg.nii.gz")
    monkeypatch.setattr(cli, "SAMPLE_DIR", data)
    monkeypatch.setattr(cli, "DEMO_CT", "ct.nii.gz")
    monkeypatch.setattr(cli, "DEMO_LABELS", "seg.nii.gz")
    out = tmp_path / "demo"
    assert cli.main(["demo", str(out), "--untrained", "tiny", "--steps", "1", "--quiet", "--with-anatomy"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.png",
        "denoised.nii.gz",
        "gaussian.nii.gz",
        "low_dose.nii.gz",
        "reference.nii.gz",
    ]
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "Gaussian filter" in printed


def test_models_list_and_import(saved_model, capsys):
    assert cli.main(["models", "import", saved_model]) == 0
    assert cli.main(["models", "list"]) == 0
    assert "tiny@1 (base)" in capsys.readouterr().out


def test_compute_options_reach_the_engine(saved_model):
    parser = cli.build_parser()
    default = cli._engine(parser.parse_args(["denoise", "ct.nrrd", "out.nrrd", "--model", saved_model]))
    assert (default.memory_format, default.compile) == ("auto", False)
    arguments = ["denoise", "ct.nrrd", "out.nrrd", "--model", saved_model, "--memory-format", "contiguous", "--compile"]
    engine = cli._engine(parser.parse_args(arguments))
    assert (engine.memory_format, engine.compile) == ("contiguous", True)
    assert engine.network is not engine.model and engine.network.model is engine.model
