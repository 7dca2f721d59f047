"""Checkpoints: safetensors + validated card, checksums, no pickle, catalogue install, offline import."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch
from conftest import random_tiny_model

from MedDiffFMLib import resources
from MedDiffFMLib.errors import ChecksumError, OutputExistsError, WeightsError
from MedDiffFMLib.model import weights as w
from MedDiffFMLib.model.network import ControlledNet


def _card(name="tiny-test", task="base") -> w.ModelCard:
    return w.ModelCard(name=name, version="1.0", task=task, config={}, license="Apache-2.0", intended_use="tests")


def _save(tmp_path, name="tiny-test", seed=0):
    model = random_tiny_model(seed)
    path = tmp_path / f"{name}.safetensors"
    card = w.save_checkpoint(model, path, _card(name))
    return model, path, card


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, path, card = _save(tmp_path)
    assert card.sha256 == w.sha256_of(path)
    loaded = w.load_model(path, expected_sha256=card.sha256)
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key
    assert loaded.card.identifier == "tiny-test@1.0"


def test_checksum_mismatch_and_corruption_are_refused(tmp_path):
    _, path, card = _save(tmp_path)
    with pytest.raises(ChecksumError, match="Checksum mismatch"):
        w.load_model(path, expected_sha256="0" * 64)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        w.load_model(path)


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"x": 1}))
    (tmp_path / "model.json").write_text(_card().to_json())
    with pytest.raises(WeightsError, match="never loads pickled"):
        w.load_model(evil)
    assert not marker.exists()


def test_invalid_cards_are_refused(tmp_path):
    _, path, _ = _save(tmp_path)
    card = json.loads(w.card_path(path).read_text())
    card["__reduce__"] = "os.system"
    w.card_path(path).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="unknown keys"):
        w.load_model(path)
    w.card_path(path).write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        w.load_model(path)


def test_wrong_task_and_wrong_base_are_refused(tmp_path):
    base, path, card = _save(tmp_path)
    loaded = w.load_model(path)
    controlled = ControlledNet(loaded)
    control_path = tmp_path / "sr.safetensors"
    w.save_checkpoint(
        controlled,
        control_path,
        w.ModelCard(
            name="sr",
            version="1.0",
            task="controlnet-sr",
            config={},
            base_model=card.identifier,
            base_sha256=card.sha256,
        ),
    )
    with pytest.raises(WeightsError, match="'controlnet-sr' checkpoint"):
        w.load_model(control_path)
    attached = w.load_controlled_model(loaded, control_path, "controlnet-sr")
    assert isinstance(attached, ControlledNet)
    with pytest.raises(WeightsError, match="this task needs 'controlnet-lesion'"):
        w.load_controlled_model(loaded, control_path, "controlnet-lesion")
    _, other_path, _ = _save(tmp_path, "other", seed=1)
    with pytest.raises(WeightsError, match="trained on base model"):
        w.load_controlled_model(w.load_model(other_path), control_path, "controlnet-sr")


def test_missing_weights_say_how_to_install(tmp_path):
    with pytest.raises(WeightsError, match="models install"):
        w.resolve_weights()


def _catalogue(tmp_path, path, sha256):
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(
        json.dumps(
            {
                "version": 1,
                "models": [
                    dict(
                        name="tiny-test",
                        version="1.0",
                        task="base",
                        url=path.as_uri(),
                        sha256=sha256,
                        card_url=w.card_path(path).as_uri(),
                    )
                ],
            }
        )
    )
    return w.read_catalogue(catalogue)


def test_install_from_url_verifies_and_resolves(tmp_path):
    _, path, card = _save(tmp_path)
    entries = _catalogue(tmp_path, path, card.sha256)
    seen = []
    installed = w.install(w.find_entry("tiny-test", entries), progress=lambda d, t, m: seen.append(d))
    assert installed.parent == w.cache_dir() and seen and seen[-1] == path.stat().st_size
    assert w.resolve_weights() == installed
    assert w.resolve_weights("tiny-test@1.0") == installed
    w.load_model(installed, expected_sha256=card.sha256)


def test_install_with_wrong_checksum_leaves_nothing(tmp_path):
    _, path, _ = _save(tmp_path)
    entries = _catalogue(tmp_path, path, "f" * 64)
    with pytest.raises(ChecksumError):
        w.install(entries[0])
    assert list(w.cache_dir().iterdir()) == []


def test_offline_import(tmp_path):
    _, path, card = _save(tmp_path)
    imported = w.import_checkpoint(path)
    assert w.sha256_of(imported) == card.sha256
    assert [c.identifier for c in w.list_installed()] == ["tiny-test@1.0"]
    with pytest.raises(ChecksumError):
        w.import_checkpoint(path, expected_sha256="0" * 64)


def test_import_never_replaces_a_different_installed_model_silently(tmp_path, monkeypatch, caplog):
    _, path, card = _save(tmp_path)
    installed = w.import_checkpoint(path)
    assert w.import_checkpoint(path) == installed  # the same file again: harmless
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, other, other_card = _save(other_dir, seed=1)  # same name and version, other weights
    assert other_card.sha256 != card.sha256
    with pytest.raises(OutputExistsError, match="A different tiny-test@1.0 is already installed"):
        w.import_checkpoint(other)
    assert w.sha256_of(installed) == card.sha256
    _catalogue(tmp_path, path, card.sha256)  # publishes tiny-test@1.0 with the first file's checksum
    monkeypatch.setenv("MEDDIFFFM_CATALOGUE", str(tmp_path / "catalogue.json"))
    with caplog.at_level(logging.WARNING):
        assert w.import_checkpoint(other, overwrite=True) == installed
    assert w.sha256_of(installed) == other_card.sha256
    assert "is not the published tiny-test@1.0" in caplog.text


def test_cancelled_install_leaves_nothing(tmp_path):
    from MedDiffFMLib.errors import CancelledError
    from MedDiffFMLib.progress import CancelToken

    _, path, card = _save(tmp_path)
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(CancelledError):
        w.install(_catalogue(tmp_path, path, card.sha256)[0], cancel=cancel)
    assert list(w.cache_dir().iterdir()) == []


def test_models_shipped_with_the_checkout_are_found_after_installed_ones(tmp_path, monkeypatch):
    shipped = tmp_path / "models"
    shipped.mkdir()
    path = shipped / "tiny-test-1.0.safetensors"
    card = w.save_checkpoint(random_tiny_model(), path, _card("tiny-test"))
    catalogue = _catalogue(tmp_path, path, card.sha256)
    monkeypatch.setattr(w, "BUNDLED_DIR", shipped)
    monkeypatch.setenv("MEDDIFFFM_CATALOGUE", str(tmp_path / "catalogue.json"))
    assert [c.identifier for c, _ in w.list_bundled()] == ["tiny-test@1.0"]
    assert w.resolve_weights() == path
    installed = w.install(catalogue[0])
    assert w.resolve_weights() == installed


def _saved(folder, name, version, model, task="base", base=None) -> w.ModelCard:
    """Save ``model`` as ``folder/name-version.safetensors`` (a ControlNet of ``base``'s card when given)."""
    card = w.ModelCard(
        name=name,
        version=version,
        task=task,
        config={},
        base_model=base.identifier if base else "",
        base_sha256=base.sha256 if base else "",
    )
    return w.save_checkpoint(model, folder / f"{name}-{version}.safetensors", card)


def test_a_task_gets_a_controlnet_and_base_model_that_match(tmp_path):
    def saved(name, version, model, task="base", base=None):
        return _saved(tmp_path, name, version, model, task, base)

    old = saved("base-a", "0.1", random_tiny_model(0))
    new = saved("base-b", "0.2", random_tiny_model(1))  # the newest base model has no ControlNet
    control = saved(
        "sr-a", "0.1", ControlledNet(w.load_model(tmp_path / "base-a-0.1.safetensors")), "controlnet-sr", old
    )
    for card in (old, new, control):
        w.import_checkpoint(tmp_path / f"{card.name}-{card.version}.safetensors")
    assert w.load_task_model().card.identifier == "base-b@0.2"
    paired = w.load_task_model(None, "controlnet-sr")
    assert paired.card.identifier == "sr-a@0.1" and paired.base.card.identifier == "base-a@0.1"
    assert w.load_task_model("base-a", "controlnet-sr").card.identifier == "sr-a@0.1"
    with pytest.raises(WeightsError, match="'controlnet-sr' model trained on this base model"):
        w.load_task_model("base-b", "controlnet-sr")
    with pytest.raises(WeightsError, match="trained on base model"):
        w.load_task_model("base-b", "controlnet-sr", "sr-a")


def test_every_shipped_model_loads_with_its_checksum_and_each_controlnet_onto_its_base():
    shipped = sorted(resources.shipped_models_dir().glob("*.safetensors"))
    assert len(shipped) >= 5
    cards = {path: w.read_card(path) for path in shipped}
    bases = {card.sha256: path for path, card in cards.items() if card.task == "base"}
    for path, card in cards.items():
        assert card.sha256 == w.sha256_of(path), path.name
        if card.task == "base":
            continue
        assert card.base_sha256 in bases, f"{path.name}: its base model is not shipped"
        model = w.load_controlled_model(w.load_model(bases[card.base_sha256]), path, card.task)
        assert isinstance(model, ControlledNet) and model.card.identifier == card.identifier


def test_the_typical_hu_table_round_trips_and_bad_tables_are_refused(tmp_path):
    model = random_tiny_model()
    card = _card()
    card.anatomy_hu = {"abdomen": {"5": 52.5, "118": -87.0}}
    path = tmp_path / "tiny-test.safetensors"
    w.save_checkpoint(model, path, card)
    assert w.load_model(path).card.typical_hu("abdomen") == {5: 52.5, 118: -87.0}
    assert w.load_model(path).card.typical_hu("chest") == {}
    saved = json.loads(w.card_path(path).read_text())
    for bad in ({"abdomen": {"liver": 50.0}}, {"abdomen": {"5": "50"}}, {"abdomen": {"5": True}}, ["abdomen"]):
        w.card_path(path).write_text(json.dumps({**saved, "anatomy_hu": bad}))
        with pytest.raises(WeightsError, match="anatomy_hu"):
            w.load_model(path)
    w.card_path(path).write_text(json.dumps({**saved, "anatomy_hu": {"abdomen": {"5": float("nan")}}}))
    with pytest.raises(WeightsError, match="anatomy_hu"):
        w.load_model(path)
    del saved["anatomy_hu"]  # cards written before the table existed stay valid
    w.card_path(path).write_text(json.dumps(saved))
    assert w.load_model(path).card.anatomy_hu == {}


def test_a_controlnet_is_found_in_a_given_folder_when_none_is_installed(tmp_path):
    base, path, card = _save(tmp_path)
    controlled = ControlledNet(base)
    controlnet_card = w.ModelCard(
        name="tiny-sr",
        version="0.2",
        task="controlnet-sr",
        config={},
        base_model=card.identifier,
        base_sha256=card.sha256,
    )
    w.save_checkpoint(controlled, tmp_path / "tiny-sr-0.2.safetensors", controlnet_card)
    with pytest.raises(WeightsError, match="No installed model"):
        w.resolve_weights(task="controlnet-sr", base_sha256=card.sha256)
    found = w.resolve_weights(task="controlnet-sr", base_sha256=card.sha256, folders=(tmp_path,))
    assert found == tmp_path / "tiny-sr-0.2.safetensors"
    with pytest.raises(WeightsError, match="No installed model"):
        w.resolve_weights(task="controlnet-sr", base_sha256="0" * 64, folders=(tmp_path,))


def test_a_task_without_a_named_model_gets_the_catalogues_recommendation(tmp_path, monkeypatch):
    def saved(name, version, model, task="base", base=None):
        return tmp_path / f"{name}-{version}.safetensors", _saved(tmp_path, name, version, model, task, base)

    fine_path, fine = saved("fine", "0.1", random_tiny_model(0))
    coarse_path, coarse = saved("coarse", "0.1", random_tiny_model(1))
    newest_path, newest = saved("newest", "0.9", random_tiny_model(2))
    sr_path, sr = saved("fine-sr", "0.1", ControlledNet(w.load_model(fine_path)), "controlnet-sr", fine)
    recommendations = {
        "fine": dict(default_for=["denoise"]),
        "coarse": dict(preview_for=["denoise"]),
        "fine-sr": dict(default_for=["super_resolve"]),
        "missing": dict(default_for=["synthesize"]),
    }
    entries = [
        dict(
            name=name,
            version="0.1",
            task="controlnet-sr" if name.endswith("-sr") else "base",
            url=(tmp_path / f"{name}-0.1.safetensors").as_uri(),
            sha256="0" * 64,
            card_url=(tmp_path / f"{name}-0.1.json").as_uri(),
            **tasks,
        )
        for name, tasks in recommendations.items()
    ]
    (tmp_path / "catalogue.json").write_text(json.dumps({"version": 1, "models": entries}))
    monkeypatch.setenv("MEDDIFFFM_CATALOGUE", str(tmp_path / "catalogue.json"))
    for path in (fine_path, coarse_path, newest_path, sr_path):
        w.import_checkpoint(path)

    assert w.load_task_model(task_key="denoise").card.identifier == "fine@0.1"
    assert w.load_task_model(task_key="denoise", preview=True).card.identifier == "coarse@0.1"
    # Not installed or shipped ("missing"), or nothing recommended: the newest, as before.
    assert w.recommended("synthesize") is None
    assert w.load_task_model(task_key="synthesize").card.identifier == "newest@0.9"
    assert w.load_task_model(task_key="detect_anomalies", preview=True).card.identifier == "newest@0.9"
    # A task without a preview model previews with its default one.
    assert w.load_task_model(None, "controlnet-sr", task_key="super_resolve", preview=True).card.identifier == (
        "fine-sr@0.1"
    )
    # A ControlNet task gets the recommended ControlNet with the base model it was trained on.
    paired = w.load_task_model(None, "controlnet-sr", task_key="super_resolve")
    assert paired.card.identifier == "fine-sr@0.1" and paired.base.card.identifier == "fine@0.1"
    # A named model always wins.
    assert w.load_task_model("newest", task_key="denoise").card.identifier == "newest@0.9"


def test_the_shipped_catalogue_recommends_one_shipped_model_per_task(monkeypatch):
    from MedDiffFMLib.task_spec import TASKS

    monkeypatch.setattr(w, "BUNDLED_DIR", resources.shipped_models_dir())
    entries = w.read_catalogue()
    # Super-resolution has no preview model: the 3 mm ControlNet takes only slices of 6, 9, ... mm.
    previewed = set(TASKS) - {"super_resolve"}
    for task in TASKS:
        for field_name in ("default_for", "preview_for"):
            chosen = [e for e in entries if task in getattr(e, field_name)]
            assert len(chosen) == (1 if field_name == "default_for" or task in previewed else 0), (task, field_name)
            if not chosen:
                continue
            entry = chosen[0]
            assert entry.task == (TASKS[task].controlnet_task or "base"), (task, entry)
            path = resources.shipped_models_dir() / f"{entry.file_stem}.safetensors"
            assert w.read_card(path).sha256 == entry.sha256 == w.sha256_of(path)
    assert all(set(e.default_for) | set(e.preview_for) <= set(TASKS) for e in entries)
    for task, spec in TASKS.items():  # the fast preview runs on the coarse 3 mm grid, the default at 1 mm
        for preview, spacing_mm in ((True, 3.0 if task in previewed else 1.0), (False, 1.0)):
            model = w.load_task_model(controlnet_task=spec.controlnet_task, task_key=task, preview=preview)
            base = model if spec.controlnet_task is None else model.base
            assert base.config.spacing_mm == spacing_mm, (task, preview)
