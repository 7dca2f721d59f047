"""Data preparation, multi-level samples and pre-training (single process, resume, 2-process DDP)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA
from safetensors.torch import load_file

from MedDiffFMLib.anatomy import BODY_LABEL, UNKNOWN_LABEL, label_of
from MedDiffFMLib.errors import InputError, MedDiffFMError
from MedDiffFMLib.model.embeddings import window_coordinates
from MedDiffFMLib.model.weights import load_model
from MedDiffFMLib.volume import Volume, read_volume, write_volume
from Training import anatomy_hu, prepare_data
from Training.config import TrainingConfig, load_config
from Training.dataset import MultiLevelDataset, manifest_entries
from Training.demo_data import CHEST_CTA_MASKS, chest_cta_labels

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "Training" / "configs" / "tiny.yaml"


def _cases(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "cases.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "image", "labels", "region", "z_start", "z_stop"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("prepared")
    csv_path = _cases(
        tmp_path,
        [
            dict(case="labelled", image=DATA / "example_ct_sm.nii.gz", labels=DATA / "example_seg.nii.gz"),
            dict(case="thresholded", image=DATA / "example_ct_sm.nii.gz", region="abdomen", z_start=5, z_stop=25),
        ],
    )
    assert (
        prepare_data.main(
            ["--csv", str(csv_path), "--output", str(tmp_path / "cache"), "--spacing", "3", "--threshold-labels"]
        )
        == 0
    )
    return tmp_path / "cache"


def test_preparation_writes_regions_with_anatomy_and_manifest(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    labelled = manifest["cases"]["labelled"]
    assert labelled["status"] == "done" and "abdomen" in [r["region"] for r in labelled["regions"]]
    thresholded = manifest["cases"]["thresholded"]["regions"]
    assert [r["region"] for r in thresholded] == ["abdomen"] and thresholded[0]["labels"].startswith("threshold")
    anatomy = read_volume(prepared / thresholded[0]["anatomy"]).array
    assert set(np.unique(anatomy)) == {0, BODY_LABEL} and anatomy.shape[0] == 20
    ct = read_volume(prepared / thresholded[0]["image"])
    source = read_volume(DATA / "example_ct_sm.nii.gz")
    np.testing.assert_allclose(ct.origin, (source.geometry.index_to_physical() @ [0, 0, 5, 1])[:3])


def test_rerun_skips_finished_cases_and_records_failures(prepared, tmp_path, monkeypatch):
    calls, real = [], prepare_data.prepare_case

    def spy(case, *args):
        calls.append(case.name)
        return real(case, *args)

    monkeypatch.setattr(prepare_data, "prepare_case", spy)
    cases = [
        prepare_data.Case("labelled", DATA / "example_ct_sm.nii.gz", DATA / "example_seg.nii.gz"),
        prepare_data.Case("broken", tmp_path / "missing.nii.gz", DATA / "example_seg.nii.gz"),
    ]
    manifest = prepare_data.prepare(cases, prepared, 3.0)
    assert calls == ["broken"]
    assert (
        manifest["cases"]["broken"]["status"] == "failed" and "does not exist" in manifest["cases"]["broken"]["error"]
    )
    assert manifest["cases"]["labelled"]["status"] == "done"
    assert manifest["summary"]["cases_failed"] == 1 and manifest["summary"]["failed"] == ["broken"]
    (prepared / prepare_data.RECORDS / "broken.json").unlink()
    del manifest["cases"]["broken"]
    prepare_data.write_manifest(prepared, manifest)


def _sample_cases(tmp_path: Path, count: int) -> list:
    return [
        prepare_data.Case(f"case{i}", DATA / "example_ct_sm.nii.gz", region="abdomen", z_start=2 * i, z_stop=2 * i + 14)
        for i in range(count)
    ] + [prepare_data.Case("broken", tmp_path / "missing.nii.gz", region="abdomen")]


def test_workers_and_shards_prepare_each_case_once_and_merge_one_manifest(tmp_path):
    cases = _sample_cases(tmp_path, 3)
    serial = prepare_data.prepare(cases, tmp_path / "serial", 3.0, threshold_labels=True)
    parallel = prepare_data.prepare(cases, tmp_path / "parallel", 3.0, threshold_labels=True, workers=2)
    assert parallel["cases"] == serial["cases"] and parallel["summary"] == serial["summary"]
    assert serial["summary"]["cases_done"] == 3 and serial["summary"]["failed"] == ["broken"]
    assert serial["summary"]["crops_per_region"] == {"abdomen": 3}
    assert "does not exist" in serial["cases"]["broken"]["error"]
    for name in ("case0", "case2"):
        np.testing.assert_array_equal(
            read_volume(tmp_path / "serial" / f"{name}_abdomen_ct.nii.gz").array,
            read_volume(tmp_path / "parallel" / f"{name}_abdomen_ct.nii.gz").array,
        )

    sharded = tmp_path / "sharded"
    first = prepare_data.prepare(cases, sharded, 3.0, threshold_labels=True, shard=(0, 2))
    assert sorted(first["cases"]) == ["broken", "case1"]  # sorted names, every second from the first
    second = prepare_data.prepare(cases, sharded, 3.0, threshold_labels=True, shard=(1, 2))
    records = prepare_data.read_records(sharded)
    assert sorted(records) == ["broken", "case0", "case1", "case2"]
    merged = second
    assert {"case0", "case1", "case2", "broken"} <= set(merged["cases"])
    assert not list(sharded.glob("*.part")) and not list((sharded / prepare_data.RECORDS).glob(".*.part"))


def test_shards_from_the_command_line_and_torchrun(tmp_path, monkeypatch, capsys):
    cases = _sample_cases(tmp_path, 2)
    with open(tmp_path / "cases.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "image", "region", "z_start", "z_stop"])
        for case in cases:
            writer.writerow([case.name, case.image, case.region, case.z_start or "", case.z_stop or ""])
    output = tmp_path / "out"
    arguments = ["--csv", str(tmp_path / "cases.csv"), "--output", str(output), "--spacing", "3"]
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert prepare_data.main(arguments + ["--threshold-labels"]) in (0, 1)
    assert prepare_data.main(["--merge", "--output", str(output)]) == 1  # one case failed
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("2 cases prepared (abdomen 2;") and printed.endswith("1 failed: broken")
    assert prepare_data.main(arguments + ["--shard", "2/2", "--threshold-labels"]) == 2
    assert prepare_data.shard_of("3/16") == (3, 16)


def test_totalsegmentator_python_api_is_used_when_installed(tmp_path, monkeypatch):
    package = tmp_path / "site" / "totalsegmentator"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "python_api.py").write_text(
        "import shutil, os\n"
        "def totalsegmentator(input, output, ml=False, task='total', quiet=False):\n"
        "    if os.environ.get('FAKE_TS_FAIL'):\n"
        "        raise FileNotFoundError('weights not found: Dataset291_TotalSegmentator_part1_organs')\n"
        f"    shutil.copy({str(DATA / 'example_seg.nii.gz')!r}, output)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        assert prepare_data.totalsegmentator_available()
        ct = read_volume(DATA / "example_ct_sm.nii.gz")
        labels = prepare_data.run_totalsegmentator(ct)
        np.testing.assert_array_equal(labels, read_volume(DATA / "example_seg.nii.gz").array)
        monkeypatch.setenv("FAKE_TS_FAIL", "1")
        with pytest.raises(MedDiffFMError, match="totalseg_download_weights -t total"):
            prepare_data.run_totalsegmentator(ct)
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "totalsegmentator"]:
            del sys.modules[name]


def test_missing_labels_stop_before_any_work_and_name_the_files(tmp_path):
    cases = [prepare_data.Case("a", DATA / "example_ct_sm.nii.gz")]
    with pytest.raises(InputError, match="example_ct_sm.nii.gz"):
        prepare_data.prepare(cases, tmp_path / "out", 3.0)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_multi_level_views(prepared):
    dataset = MultiLevelDataset(manifest_entries(prepared), 16, anatomy_dropout=0.0)
    image, anatomy = torch.rand(20, 30, 40) * 2 - 1, torch.randint(0, 119, (20, 30, 40), dtype=torch.uint8)
    rng = np.random.default_rng(0)
    whole = window_coordinates([slice(0, n) for n in image.shape], tuple(image.shape))
    level0 = dataset.view({"image": image, "anatomy": anatomy}, 0, rng)
    assert level0["image"].shape == (1, 16, 16, 16) and level0["anatomy"].shape == (16, 16, 16)
    assert level0["coordinates"].amin().item() == -1 and level0["coordinates"].amax().item() == 1
    level2 = dataset.view({"image": image, "anatomy": anatomy}, 2, rng)
    crop = level2["image"][0]
    matches = [
        (a, b, c)
        for a in range(5)
        for b in range(15)
        for c in range(25)
        if torch.equal(image[a : a + 16, b : b + 16, c : c + 16], crop)
    ]
    assert len(matches) == 1
    a, b, c = matches[0]
    expected = whole[:, a : a + 16, b : b + 16, c : c + 16]
    torch.testing.assert_close(level2["coordinates"], expected)
    level1 = dataset.view({"image": image, "anatomy": anatomy}, 1, rng)
    assert level1["image"].shape == (1, 16, 16, 16)
    assert level1["coordinates"][0].amax() - level1["coordinates"][0].amin() > 0.5


def test_samples_are_reproducible_and_dropout_uses_null_conditions(prepared):
    dataset = MultiLevelDataset(manifest_entries(prepared), 16, region_dropout=1.0, anatomy_dropout=1.0, seed=3)
    first, second = dataset[5], dataset[5]
    for key in first:
        assert torch.equal(first[key], second[key])
    assert first["region"].item() == 0 and (first["anatomy"] == UNKNOWN_LABEL).all()
    dataset.set_epoch(1)
    assert not torch.equal(dataset[5]["image"], first["image"])


def _pretrain(prepared, output, *extra, env=None):
    command = [
        sys.executable,
        "-m",
        "Training.pretrain",
        "--config",
        str(TINY),
        "--data",
        str(prepared),
        "--output",
        str(output),
        *extra,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_resume_reproduces_an_uninterrupted_run(prepared, tmp_path):
    _pretrain(prepared, tmp_path / "straight", "--export", "tiny@0")
    _pretrain(prepared, tmp_path / "resumed", "--stop-after-minutes", "0")
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    _pretrain(prepared, tmp_path / "resumed")
    straight = load_file(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoint" / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    model = load_model(tmp_path / "straight" / "tiny-0.safetensors")
    assert model.card.task == "base" and "4 optimiser steps" in model.card.training
    log = (tmp_path / "straight" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,loss") and len(log) == 5
    assert len(list((tmp_path / "straight" / "previews").glob("*.png"))) == 2


def test_two_process_ddp_with_gloo_and_resume(prepared, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["-m", "Training.pretrain", "--config", str(TINY), "--data", str(prepared), "--output", str(tmp_path)]
    first = subprocess.run(
        [*torchrun, *base, "--stop-after-minutes", "0"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 1
    second = subprocess.run([*torchrun, *base], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 4
    assert "resumed from step 1" in second.stderr


def test_config_validation(tmp_path):
    assert load_config(TINY).model_config.patch_size == 16
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nlearning_rat: 0.1\n")
    with pytest.raises(InputError, match="learning_rat"):
        load_config(bad)


def test_case_weights_list_a_case_several_times_in_a_row(prepared):
    plain = manifest_entries(prepared)
    weighted = manifest_entries(prepared, {"labelled": 3})
    assert [e["case"] for e in plain] == ["labelled", "thresholded"]
    assert [e["case"] for e in weighted] == ["labelled"] * 3 + ["thresholded"]
    assert weighted[0] == weighted[1] == plain[0]
    with pytest.raises(InputError, match="labeled.*its cases are: labelled, thresholded"):
        manifest_entries(prepared, {"labeled": 2})
    for bad in (0, 1.5, True):
        with pytest.raises(InputError, match="case_weights"):
            TrainingConfig(case_weights={"labelled": bad})
    trainer = _trainer(prepared, prepared.parent / "weighted", case_weights={"labelled": 2})
    assert len(trainer.dataset) == 3 * trainer.dataset.samples_per_volume


def test_checkpoints_round_trip_without_pickle_and_survive_a_crash_between_renames(tmp_path):
    from Training.checkpointing import load_training_state, save_training_state

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_training_state(tmp_path, model, None, optimizer, {"step": 7})
    assert not list(tmp_path.rglob("*.pt"))
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # crash after the first rename
    restored_model = torch.nn.Linear(3, 2)
    restored_optimizer = torch.optim.Adam(restored_model.parameters(), lr=1e-3)
    assert load_training_state(tmp_path, restored_model, None, restored_optimizer, torch.device("cpu")) == {"step": 7}
    assert torch.equal(restored_model.weight, model.weight)
    expected, actual = optimizer.state_dict(), restored_optimizer.state_dict()
    for index, values in expected["state"].items():
        for name, value in values.items():
            assert torch.equal(actual["state"][index][name], value)
    assert actual["param_groups"][0]["lr"] == expected["param_groups"][0]["lr"]


def _trainer(prepared: Path, output: Path, init: Path | None = None, **settings):
    from dataclasses import replace

    from Training.pretrain import Distributed, Trainer

    return Trainer(replace(load_config(TINY), **settings), prepared, output, Distributed(), init_weights=init)


def test_bf16_training_with_channels_last_weights_keeps_float32_weights_and_learns(prepared, tmp_path):
    trainer = _trainer(prepared, tmp_path, mixed_precision="bf16", memory_format="channels_last", steps=3)
    assert trainer.bf16 and trainer.memory_format == torch.channels_last_3d
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    weights = trainer.model.state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], weights[k]) for k in weights)
    rows = (tmp_path / "log.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(np.isfinite(float(row.split(",")[2])) for row in rows)
    assert all(0.0 <= float(row.split(",")[6]) < 1.0 for row in rows)  # share of time waiting for data


def test_auto_precision_follows_the_devices_native_bf16(prepared, tmp_path, monkeypatch):
    for native in (True, False):
        monkeypatch.setattr("Training.pretrain.native_bf16", lambda device, native=native: native)
        assert _trainer(prepared, tmp_path / str(native), mixed_precision="auto").bf16 is native
    assert not _trainer(prepared, tmp_path / "no", mixed_precision="no").bf16


def test_warm_start_from_a_saved_model_and_export_before_the_last_step(prepared, tmp_path):
    _pretrain(prepared, tmp_path / "first", "--export", "tiny@0")
    saved = load_model(tmp_path / "first" / "tiny-0.safetensors")
    assert saved.card.anatomy_hu == anatomy_hu.typical_hu(manifest_entries(prepared))
    warm = _trainer(prepared, tmp_path / "warm", init=tmp_path / "first" / "tiny-0.safetensors")
    for key, value in saved.state_dict().items():
        assert torch.equal(warm.model.state_dict()[key], value), key
        assert torch.equal(warm.ema.module.state_dict()[key], value), key
    with pytest.raises(InputError, match="another architecture"):
        _trainer(
            prepared,
            tmp_path / "other",
            init=tmp_path / "first" / "tiny-0.safetensors",
            model_overrides={"channels": [16, 16]},
        )
    _pretrain(prepared, tmp_path / "partial", "--stop-after-minutes", "0")
    _pretrain(prepared, tmp_path / "partial", "--export", "partial@1", "--export-only")
    exported = load_model(tmp_path / "partial" / "partial-1.safetensors")
    assert "1 optimiser steps" in exported.card.training
    assert json.loads((tmp_path / "partial" / "checkpoint" / "state.json").read_text())["step"] == 1


def test_a_v_predicting_model_trains_and_warm_starts_from_a_noise_predicting_one(prepared, tmp_path):
    _pretrain(prepared, tmp_path / "eps", "--export", "eps@0")
    eps_model = tmp_path / "eps" / "eps-0.safetensors"
    (tmp_path / "v").mkdir()
    v_run = _trainer(prepared, tmp_path / "v", init=eps_model, model_overrides={"prediction": "v"}, steps=2)
    assert v_run.schedule.prediction == "v"
    for key, value in load_model(eps_model).state_dict().items():
        assert torch.equal(v_run.model.state_dict()[key], value), key
    v_run.run()
    rows = (tmp_path / "v" / "log.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(np.isfinite(float(row.split(",")[2])) for row in rows)
    with pytest.raises(InputError, match="low_snr_cap"):
        _trainer(prepared, tmp_path / "capped", model_overrides={"prediction": "v"}, low_snr_cap=10.0)


def test_pure_noise_share_draws_timesteps_where_a_patch_mean_is_lost_in_the_noise():
    from MedDiffFMLib.diffusion.schedule import NoiseSchedule
    from Training.pretrain import noisy_batch, pure_noise_timesteps

    schedule = NoiseSchedule(1000, "cosine")
    first = pure_noise_timesteps(schedule, 32**3)
    snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
    assert first == 996 and snr[first] * 32**3 < 1 <= snr[first - 1] * 32**3
    batch = {"image": torch.zeros(4000, 1, 4, 4, 4)}
    small = pure_noise_timesteps(schedule, 4**3)

    def late_share(share: float) -> float:
        _, t, _ = noisy_batch(batch, schedule, torch.Generator().manual_seed(0), torch.device("cpu"), share)
        return float((t >= small).float().mean())

    uniform = (1000 - small) / 1000
    assert abs(late_share(0.0) - uniform) < 0.01
    assert abs(late_share(0.25) - (0.25 + 0.75 * uniform)) < 0.02


def test_max_sigma_draws_timesteps_up_to_that_noise_level_only():
    from MedDiffFMLib.diffusion.schedule import NoiseSchedule
    from Training.config import TrainingConfig
    from Training.pretrain import noisy_batch

    schedule = NoiseSchedule(1000, "cosine")
    batch = {"image": torch.zeros(4000, 1, 2, 2, 2)}
    _, t, _ = noisy_batch(batch, schedule, torch.Generator().manual_seed(0), torch.device("cpu"), max_sigma=1.0)
    last = schedule.timestep_for_sigma(1.0)
    sigmas = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()
    assert sigmas[last] <= 1.0 < sigmas[last + 1]
    assert int(t.max()) == last and int(t.min()) == 0
    assert abs(float((t <= last // 2).float().mean()) - 0.5) < 0.03
    with pytest.raises(InputError, match="max_sigma"):
        TrainingConfig(max_sigma=1.0, pure_noise_share=0.1)
    with pytest.raises(InputError, match="max_sigma"):
        TrainingConfig(max_sigma=-1.0)


def test_foreground_patches_are_centred_inside_the_body(tmp_path):
    from MedDiffFMLib.volume import Volume, write_volume

    hu = np.full((40, 64, 64), -1000, dtype=np.int16)
    anatomy = np.zeros(hu.shape, dtype=np.uint8)
    hu[30:36, 50:58, 4:12], anatomy[30:36, 50:58, 4:12] = 40, BODY_LABEL  # a small body in one corner
    write_volume(Volume(hu, (1.0, 1.0, 1.0)), tmp_path / "ct.nii.gz")
    write_volume(Volume(anatomy, (1.0, 1.0, 1.0)), tmp_path / "anatomy.nii.gz")
    entry = dict(region="abdomen", image=str(tmp_path / "ct.nii.gz"), anatomy=str(tmp_path / "anatomy.nii.gz"))

    def with_body(foreground: float) -> int:
        dataset = MultiLevelDataset([entry], 16, (0.0, 0.0, 1.0), foreground=foreground, seed=5)
        return sum(bool((dataset[index]["anatomy"] > 0).any()) for index in range(16))

    assert with_body(1.0) == 16
    assert with_body(0.0) < 8


def test_lesion_patches_are_centred_on_the_mask(tmp_path):
    """A 4-voxel lesion in a 40 x 64 x 64 body: uniform patches rarely show it, focused ones do."""
    from MedDiffFMLib.volume import Volume, write_volume

    hu = np.full((40, 64, 64), 40, dtype=np.int16)
    anatomy = np.full(hu.shape, BODY_LABEL, dtype=np.uint8)
    lesion = np.zeros(hu.shape, dtype=np.uint8)
    lesion[34:36, 4:6, 58:60] = 1
    for name, array in (("ct", hu), ("anatomy", anatomy), ("condition", lesion)):
        write_volume(Volume(array, (1.0, 1.0, 1.0)), tmp_path / f"{name}.nii.gz")
    entry = {key: str(tmp_path / f"{key}.nii.gz") for key in ("anatomy", "condition")}
    entry.update(region="abdomen", image=str(tmp_path / "ct.nii.gz"), condition_kind="mask")

    def with_lesion(focus: float) -> int:
        dataset = MultiLevelDataset([entry], 16, (0.0, 0.0, 1.0), foreground=1.0, condition_focus=focus, seed=5)
        return sum(bool((dataset[index]["condition"] > 0).any()) for index in range(16))

    assert with_lesion(1.0) == 16
    assert with_lesion(0.0) < 8
    with pytest.raises(InputError, match="condition_focus"):
        TrainingConfig(condition_focus=1.5)


def test_low_snr_weighting_turns_the_noise_loss_into_the_clean_image_loss_at_high_noise():
    from MedDiffFMLib.diffusion.schedule import NoiseSchedule
    from Training.pretrain import noise_loss

    schedule = NoiseSchedule(1000, "cosine")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand((2, 1, 4, 4, 4), generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=generator)
    for step, cap in ((900, 100.0), (100, 100.0), (900, 1.0)):
        t = torch.full((2,), step)
        abar = float(schedule.alphas_cumprod[step])
        x_t = abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
        eps_hat = (x_t - abar**0.5 * x0_hat) / (1 - abar) ** 0.5  # the noise estimate implied by x0_hat
        plain = (eps_hat - noise).abs().mean()
        snr = abar / (1 - abar)
        if snr < 1 and cap > 1 / snr**0.5:  # low SNR inside the cap: the clean-image L1 error
            expected = (x0_hat - x0).abs().mean()
        else:  # high SNR or no weighting: the plain noise loss
            expected = plain
        assert float(noise_loss(eps_hat, noise, t, schedule, cap)) == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(InputError, match="low_snr_cap"):
        TrainingConfig(low_snr_cap=0.5)


def _coordinate_maps(plain: MultiLevelDataset, changed: MultiLevelDataset, index: int, atol: float) -> list:
    """Per axis ``(scale, offset, changed coordinates)`` of sample ``index``: the changed dataset's
    coordinates must be an affine map of the plain one's, with image and anatomy the same."""
    a, b = plain[index], changed[index]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["anatomy"], b["anatomy"])
    maps = []
    for axis in range(3):
        c, d = a["coordinates"][axis].flatten().double(), b["coordinates"][axis].flatten().double()
        design = torch.stack((c, torch.ones_like(c)), dim=1)
        scale, offset = torch.linalg.lstsq(design, d[:, None]).solution.flatten()
        assert torch.allclose(design @ torch.stack((scale, offset)), d, atol=atol)  # an affine map per axis
        maps.append((float(scale), float(offset), d))
    return maps


def test_position_jitter_shifts_and_stretches_each_samples_coordinates_only(prepared):
    entries = manifest_entries(prepared)
    plain = MultiLevelDataset(entries, 16, (0.3, 0.3, 0.4), seed=2)
    jittered = MultiLevelDataset(entries, 16, (0.3, 0.3, 0.4), seed=2, position_jitter=0.25)
    offsets = []
    for index in range(8):
        for scale, offset, _ in _coordinate_maps(plain, jittered, index, atol=1e-5):
            assert abs(scale - 1) <= 0.25 + 1e-6 and abs(offset) <= 0.25 + 1e-6
            offsets.append(offset)
    assert np.std(offsets) > 0.05  # drawn per sample, not one fixed shift
    with pytest.raises(InputError, match="position_jitter"):
        TrainingConfig(position_jitter=1.5)


def test_field_of_view_crop_gives_coordinates_of_a_smaller_scan_containing_the_sample(prepared):
    entries = manifest_entries(prepared)
    plain = MultiLevelDataset(entries, 16, (0.0, 0.5, 0.5), seed=3)
    cropped = MultiLevelDataset(entries, 16, (0.0, 0.5, 0.5), seed=3, field_of_view_crop=1.0)
    scales = []
    for index in range(12):
        for scale, _, d in _coordinate_maps(plain, cropped, index, atol=1e-4):
            assert scale >= 1 - 1e-6  # a sub-box of the scan: never a wider extent
            assert float(d.min()) >= -1 - 1e-5  # the frame contains the sample (padding only follows it)
            scales.append(scale)
    assert max(scales) > 1.5 and min(scales) < 1.5  # random sub-boxes, up to the whole scan
    with pytest.raises(InputError, match="field_of_view_crop"):
        TrainingConfig(field_of_view_crop=1.5)


def test_the_typical_hu_table_is_the_median_of_each_label_per_region(prepared, tmp_path):
    entries = manifest_entries(prepared, {"labelled": 3})  # repeated crops count once
    table = anatomy_hu.typical_hu(entries, minimum_voxels=50)
    pooled: dict[tuple[str, int], list] = {}
    for entry in manifest_entries(prepared):
        hu, labels = read_volume(entry["image"]).array, read_volume(entry["anatomy"]).array
        for value in np.unique(labels[labels > 0]):
            pooled.setdefault((entry["region"], int(value)), []).append(hu[labels == value])
    expected: dict[str, dict[str, float]] = {}
    for (region, value), parts in pooled.items():
        values = np.clip(np.rint(np.concatenate(parts)), -1024, 3071)  # to the nearest HU
        if values.size >= 50:
            expected.setdefault(region, {})[str(value)] = float(np.median(values))
    assert table == expected and str(BODY_LABEL) in table["abdomen"] and "0" not in table["abdomen"]
    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps({"name": "tiny", "version": "0", "task": "base", "config": {}}))
    assert anatomy_hu.main(["--data", str(prepared), "--card", str(card_file), "--minimum-voxels", "50"]) == 0
    assert json.loads(card_file.read_text())["anatomy_hu"] == table


def test_chest_cta_masks_land_on_the_ct_grid_at_their_physical_position(tmp_path):
    direction = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    ct = Volume(np.full((12, 10, 14), -100, dtype=np.int16), (0.8, 0.8, 1.5), (-5.0, 3.0, 20.0), direction)
    reference = tmp_path / "reference"
    boxes = {}
    for index, path in enumerate(CHEST_CTA_MASKS):
        box = (slice(index, index + 4), slice(2, 8), slice(3, 3 + index + 1))  # each on its own crop
        crop = ct.geometry.subgrid(box)
        mask = np.zeros(crop.shape, dtype=np.uint8)
        mask[1:3, 2:4, : index + 1] = 1
        (reference / path).parent.mkdir(parents=True, exist_ok=True)
        write_volume(Volume.on_geometry(mask, crop), reference / path)
        boxes[path] = (slice(index + 1, index + 3), slice(4, 6), slice(3, 4 + index))
    write_volume(ct, reference / "aorta_report" / "example_ct.nii.gz")
    labels = read_volume(chest_cta_labels(reference, tmp_path / "labels.nii.gz"))
    assert labels.geometry.same_grid(ct.geometry)
    expected = np.zeros(ct.array.shape, dtype=np.uint8)
    for path, name in CHEST_CTA_MASKS.items():
        expected[boxes[path]] = label_of(name)
    np.testing.assert_array_equal(labels.array, expected)
