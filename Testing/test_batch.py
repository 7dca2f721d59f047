"""``meddiff-fm batch``: a cohort from a manifest or a folder, resumable, failures listed, sharded."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from MedDiffFMLib import cli
from MedDiffFMLib.volume import read_volume, write_volume

COMMON = ["--", "--untrained", "tiny", "--device", "cpu"]


@pytest.fixture
def cohort(tmp_path, small_ct, small_seg):
    write_volume(small_ct, tmp_path / "ct.nrrd")
    write_volume(small_seg, tmp_path / "seg.nrrd")
    rows = [
        ("denoise", "ct.nrrd", "out/denoised.nrrd", "--steps 1"),
        ("detect-anomalies", "ct.nrrd", "out/map.nrrd", "--anatomy seg.nrrd --organ liver"),
        ("denoise", "missing.nrrd", "out/never.nrrd", ""),
        ("sharpen", "ct.nrrd", "out/sharp.nrrd", ""),
        ("denoise", "ct.nrrd", "out/bad.nrrd", "--steps many"),
    ]
    (tmp_path / "out").mkdir()
    with open(tmp_path / "cases.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "input", "output", "options"])
        writer.writerows(rows)
    return tmp_path


def _summary(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_manifest_batch_is_resumable_lists_failures_and_reuses_the_engine(cohort, monkeypatch):
    built = []
    real = cli.build_engine
    monkeypatch.setattr(cli, "build_engine", lambda *a: built.append(a) or real(*a))
    summary = cohort / "summary.csv"
    arguments = ["batch", str(cohort / "cases.csv"), "--summary", str(summary), "--quiet", *COMMON]
    assert cli.main(arguments) == 1
    rows = _summary(summary)
    assert [row["status"] for row in rows] == ["done", "done", "failed", "failed", "failed"]
    assert "does not exist" in rows[2]["error"] and "Unknown task 'sharpen'" in rows[3]["error"]
    assert "invalid options" in rows[4]["error"] and "many" in rows[4]["error"]
    assert len(built) == 1  # one engine for both cases with the same model and settings
    denoised = read_volume(cohort / "out" / "denoised.nrrd")
    assert denoised.geometry.same_grid(read_volume(cohort / "ct.nrrd").geometry)
    assert (cohort / "out" / "map_mask.nrrd").exists()
    assert not list((cohort / "out").glob("*never*")) and not list(cohort.glob(".*.part"))

    assert cli.main(arguments) == 1
    assert [row["status"] for row in _summary(summary)] == ["skipped", "skipped", "failed", "failed", "failed"]


def test_a_folder_batch(tmp_path, small_ct, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "results"
    inputs.mkdir()
    for name in ("a.nii.gz", "b.nrrd"):
        write_volume(small_ct, inputs / name)
    (inputs / "notes.txt").write_text("not a volume")
    summary = tmp_path / "s.csv"
    arguments = ["batch", "--folder", str(inputs), "--output-folder", str(outputs), "--task", "denoise"]
    assert cli.main([*arguments, "--summary", str(summary), "--quiet", *COMMON, "--steps", "1"]) == 0
    assert sorted(p.name for p in outputs.iterdir()) == ["a_out.nii.gz", "b_out.nii.gz"]
    assert "2 done, 0 skipped (outputs exist), 0 failed of 2" in capsys.readouterr().out


def test_torchrun_shards_the_cases_across_two_processes(cohort):
    summary = cohort / "summary.csv"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "MedDiffFMLib.cli", "batch", str(cohort / "cases.csv"), "--summary", str(summary), "--quiet"]
    result = subprocess.run([*command, *COMMON], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]  # failed cases are listed, the other rank finishes
    ranks = [_summary(cohort / f"summary.rank{rank}.csv") for rank in (0, 1)]
    assert [row["output"] for row in ranks[0]] == [
        str(cohort / "out" / n) for n in ("denoised.nrrd", "never.nrrd", "bad.nrrd")
    ]
    assert [row["output"] for row in ranks[1]] == [str(cohort / "out" / n) for n in ("map.nrrd", "sharp.nrrd")]
    assert ranks[0][0]["status"] == ranks[1][0]["status"] == "done"
