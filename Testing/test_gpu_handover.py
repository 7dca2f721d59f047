"""Carrying training to another machine: packed caches, training without SimpleITK, weights in parts."""

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

from MedDiffFMLib.errors import ChecksumError
from MedDiffFMLib.model import untrained_model
from MedDiffFMLib.model.weights import ModelCard, load_model, save_checkpoint
from MedDiffFMLib.volume import Volume, read_volume, write_volume
from Training import pack_data, prepare_data, shards
from Training.config import load_config
from Training.dataset import MultiLevelDataset, manifest_entries, read_array

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "Training" / "configs" / "tiny.yaml"
OBLIQUE = (0.96, -0.28, 0.0, 0.28, 0.96, 0.0, 0.0, 0.0, 1.0)


def _scan(path: Path, shape, spacing, direction, seed: int) -> Path:
    """A body-shaped CT (soft tissue, a brighter organ, noise) on the given grid, written to ``path``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    body = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (0.4 * shape[1]) ** 2
    organ = ((y - shape[1] / 2.5) ** 2 + (x - shape[2] / 2.5) ** 2 + (z - shape[0] / 2) ** 2) < (0.2 * shape[1]) ** 2
    hu = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0) + rng.normal(0, 15, shape)
    volume = Volume(hu.astype(np.int16), spacing=spacing, origin=(-31.5, 12.25, 80.0), direction=direction)
    write_volume(volume, path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A prepared 1.5 mm cache of two grids unlike the model's: 0.7 x 0.7 x 5 mm slices, and an oblique
    0.9 x 0.9 x 2 mm scan cropped to some of its slices."""
    folder = tmp_path_factory.mktemp("handover")
    thick = _scan(folder / "thick.nii.gz", (8, 48, 48), (0.7, 0.7, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 0)
    oblique = _scan(folder / "oblique.nii.gz", (20, 40, 40), (0.9, 0.9, 2.0), OBLIQUE, 1)
    rows = [
        dict(case="thick", image=thick, region="abdomen"),
        dict(case="oblique", image=oblique, region="chest", z_start=3, z_stop=17),
    ]
    with open(folder / "cases.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "image", "labels", "region", "z_start", "z_stop"])
        writer.writeheader()
        writer.writerows(rows)
    args = ["--csv", str(folder / "cases.csv"), "--output", str(folder / "prepared"), "--spacing", "1.5"]
    assert prepare_data.main([*args, "--threshold-labels"]) == 0
    return folder / "prepared"


def test_unpacking_reproduces_the_simpleitk_cache_without_simpleitk(cache, tmp_path):
    packed = pack_data.pack(cache, tmp_path / "pack")
    assert packed["cases"]["oblique"]["source_shape"][0] == 14  # the 14 slices the case was prepared from
    manifest = pack_data.unpack(tmp_path / "pack", tmp_path / "unpacked")
    prepared = json.loads((cache / "manifest.json").read_text())
    assert sorted(manifest["cases"]) == sorted(prepared["cases"])
    for name, case in prepared["cases"].items():
        for original, unpacked in zip(case["regions"], manifest["cases"][name]["regions"]):
            reference = read_volume(cache / original["image"]).array
            hu = read_array(tmp_path / "unpacked" / unpacked["image"])
            assert hu.dtype == np.int16 and hu.shape == reference.shape
            assert np.abs(hu.astype(np.int32) - reference).max() <= 1, name
            assert (hu == reference).mean() > 0.999, name
            labels = read_array(tmp_path / "unpacked" / unpacked["anatomy"])
            np.testing.assert_array_equal(labels, read_volume(cache / original["anatomy"]).array)
            assert unpacked["region"] == original["region"] and unpacked["shape"] == original["shape"]
    # the training samples of both caches are the same
    entries = [manifest_entries(cache), manifest_entries(tmp_path / "unpacked")]
    samples = [MultiLevelDataset(e, 8, seed=3)[5] for e in entries]
    for key in ("image", "anatomy", "coordinates"):
        assert torch.allclose(samples[0][key].float(), samples[1][key].float(), atol=1.0 / 180), key


def test_linear_resampling_follows_itk_at_the_edges():
    source = np.arange(4, dtype=np.int16).reshape(4, 1, 1) * 10
    # positions -0.6 (outside), -0.5 (inside: clamped), 1.25, 3.4 (clamped), 3.5 (outside)
    scale, offset = np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0])
    values = [
        pack_data.resample_linear(source, scale, np.array([z, 0.0, 0.0]), (1, 1, 1))[0, 0, 0]
        for z in (-0.6, -0.5, 1.25, 3.4, 3.5)
    ]
    np.testing.assert_allclose(values, [pack_data.FILL_HU, 0.0, 12.5, 30.0, pack_data.FILL_HU])
    assert pack_data.resample_linear(source, scale, offset, (4, 1, 1)).dtype == np.float32


def test_training_runs_from_an_unpacked_cache_where_simpleitk_is_missing(cache, tmp_path):
    pack_data.pack(cache, tmp_path / "pack")
    stub = tmp_path / "no_simpleitk"
    stub.mkdir()
    (stub / "SimpleITK.py").write_text('raise ImportError("SimpleITK is not installed here")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub), str(REPO)])}
    script = f"""
import sys
import MedDiffFMLib.volume as volume
try:
    volume.sitk.ReadImage
except ImportError as error:
    assert "SimpleITK is needed to read, write or resample images" in str(error)
else:
    sys.exit("SimpleITK was importable")
from Training import pack_data, pretrain
assert pack_data.main(["unpack", "--pack", r"{tmp_path / "pack"}", "--output", r"{tmp_path / "cache"}"]) == 0
args = ["--config", r"{TINY}", "--data", r"{tmp_path / "cache"}", "--output", r"{tmp_path / "run"}"]
assert pretrain.main([*args, "--export", "handover@1", "--export-dtype", "bfloat16"]) == 0
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_model(tmp_path / "run" / "handover-1.safetensors")
    assert "4 optimiser steps" in model.card.training and model.card.anatomy_hu
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bfloat16_export_halves_the_file_and_loads_as_float32(tmp_path):
    model = untrained_model("tiny", seed=0)
    card = ModelCard(name="tiny", version="1", task="base", config={})
    save_checkpoint(model, tmp_path / "full.safetensors", card)
    save_checkpoint(model, tmp_path / "half.safetensors", card, torch.bfloat16)
    full, half = (tmp_path / "full.safetensors").stat().st_size, (tmp_path / "half.safetensors").stat().st_size
    assert half < 0.55 * full
    loaded = load_model(tmp_path / "half.safetensors")
    for key, value in model.state_dict().items():
        restored = loaded.state_dict()[key]
        assert restored.dtype == value.dtype, key
        torch.testing.assert_close(restored, value.to(torch.bfloat16).to(value.dtype), rtol=0, atol=0)


def test_weights_split_into_parts_join_back_bit_for_bit(tmp_path):
    model = untrained_model("tiny", seed=1)
    save_checkpoint(model, tmp_path / "tiny-1.safetensors", ModelCard(name="tiny", version="1", task="base", config={}))
    parts = shards.split(tmp_path / "tiny-1.safetensors", tmp_path / "parts", max_mib=0.02)
    assert len(parts) > 2 and all(p.stat().st_size < 0.02 * 2**20 + 4096 or _one_tensor(p) for p in parts)
    joined = shards.join(tmp_path / "parts", "tiny-1", tmp_path / "joined")
    assert joined.read_bytes() == (tmp_path / "tiny-1.safetensors").read_bytes()
    assert load_model(joined).card.name == "tiny"

    parts[1].unlink()
    with pytest.raises(ChecksumError, match="a part is missing or damaged"):
        shards.join(tmp_path / "parts", "tiny-1", tmp_path / "broken")
    assert not (tmp_path / "broken" / "tiny-1.safetensors").exists()


def _one_tensor(path: Path) -> bool:
    from safetensors.torch import load_file

    return len(load_file(str(path))) == 1


def test_gpu_configs_train_the_shipped_architectures_in_long_epochs():
    base = load_config(REPO / "Training" / "configs" / "gpu_base1mm.yaml")
    large = load_config(REPO / "Training" / "configs" / "gpu_large1mm.yaml")
    assert base.model_config == load_config(REPO / "Training" / "configs" / "base1mm.yaml").model_config
    assert large.model_config.prediction == "v" and len(large.model_config.channels) == 4
    for config in (base, large):
        assert config.samples_per_volume * 5 >= 100 * config.batch_size  # >= 100 batches per epoch
    dataset = MultiLevelDataset([{"image": "", "anatomy": "", "region": "abdomen"}] * 3, 8, samples_per_volume=7)
    assert len(dataset) == 21
