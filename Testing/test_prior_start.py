"""Synthesis from a label-painted prior (Docs/METHOD.md 1.1): the painting and the sampler's start."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from MedDiffFMLib.anatomy import BODY_LABEL, label_of
from MedDiffFMLib.diffusion.constraints import shift_to_medians
from MedDiffFMLib.diffusion.samplers import sample
from MedDiffFMLib.diffusion.schedule import NoiseSchedule
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.model.network import ControlledNet
from MedDiffFMLib.model.weights import BUNDLED_DIR as MODELS
from MedDiffFMLib.model.weights import ModelCard
from MedDiffFMLib.preprocessing import REGIONS
from MedDiffFMLib.tasks.engine import Engine
from MedDiffFMLib.tasks.synthesize import AIR_HU, PAINTED_START_SIGMA, painted, synthesize
from MedDiffFMLib.volume import Volume


def test_painted_maps_labels_air_and_unknown_to_the_window():
    window = REGIONS["abdomen"]
    labels = np.array([[[0, 5, 118, 7]]], dtype=np.uint8)
    image = painted(labels, {5: window.level, 118: window.low}, "abdomen")
    np.testing.assert_allclose(image[0, 0], [-1.0, 0.0, -1.0, 0.0])


def test_sampling_from_a_prior_starts_from_it_noised():
    schedule = NoiseSchedule()
    prior = torch.full((4, 4, 4), 0.5)
    seen = []

    def predict(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x)

    sample(
        predict,
        schedule,
        (4, 4, 4),
        torch.Generator().manual_seed(0),
        torch.device("cpu"),
        sampler="ddim",
        steps=1,
        prior=prior,
        start=500,
    )
    noise = torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[0], schedule.q_sample(prior, 500, noise))
    with pytest.raises(InputError):
        sample(predict, schedule, (4, 4, 4), torch.Generator(), torch.device("cpu"), prior=torch.zeros(2, 2, 2))


def _block_anatomy(spacing, direction) -> Volume:
    """Body (118) 48 x 48 mm in-plane with a 'liver' (5) block inside it, 40 mm of slices."""
    shape = (round(40 / spacing[2]), round(64 / spacing[1]), round(64 / spacing[0]))
    labels = np.zeros(shape, np.uint8)
    y, x = (slice(round(8 / s), round(56 / s)) for s in spacing[1::-1])
    labels[:, y, x] = BODY_LABEL
    y, x = (slice(round(20 / s), round(44 / s)) for s in spacing[1::-1])
    labels[:, y, x] = 5
    return Volume(labels, spacing=spacing, direction=direction)


def test_a_late_start_from_the_anatomy_keeps_the_painted_values_on_any_grid(tiny_engine):
    angle = np.deg2rad(30.0)
    oblique = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    table = {5: 60.0, BODY_LABEL: -80.0}
    for spacing, direction in (((0.8, 0.8, 5.0), oblique), ((3.0, 3.0, 3.0), Volume(np.zeros((1, 1, 1))).direction)):
        anatomy = _block_anatomy(spacing, direction)
        result = synthesize(
            anatomy, "abdomen", tiny_engine, steps=1, start_from="anatomy", label_hu=table, start=1, seed=0
        )
        assert result.geometry.same_grid(anatomy.geometry)
        inner = ndimage.binary_erosion(anatomy.array == 5, iterations=2)
        body = ndimage.binary_erosion(anatomy.array == BODY_LABEL, iterations=2)
        assert abs(float(np.median(result.array[inner])) - 60.0) < 10.0, spacing
        assert abs(float(np.median(result.array[body])) + 80.0) < 10.0, spacing
        assert (result.array[anatomy.array == 0] == AIR_HU).all()
    noise = synthesize(anatomy, "abdomen", tiny_engine, steps=1, seed=0)
    assert abs(float(np.median(noise.array[inner])) - 60.0) > 10.0  # the start is what made the values


def test_the_start_comes_from_the_model_card_or_says_how_to_get_one(tiny_engine):
    anatomy = _block_anatomy((3.0, 3.0, 3.0), Volume(np.zeros((1, 1, 1))).direction)
    with pytest.raises(InputError, match="Training.anatomy_hu"):
        synthesize(anatomy, "abdomen", tiny_engine, steps=1, start_from="anatomy")
    with pytest.raises(InputError, match="start_from 'anatomy'"):
        synthesize(anatomy, "abdomen", tiny_engine, steps=1, start=500)
    with pytest.raises(InputError, match="start_from must be one of"):
        synthesize(anatomy, "abdomen", tiny_engine, steps=1, start_from="prior")
    tiny_engine.model.card = ModelCard(
        name="tiny", version="0", task="base", config={}, anatomy_hu={"abdomen": {"5": 60.0, "118": -80.0}}
    )
    assert tiny_engine.typical_hu("abdomen") == {5: 60.0, 118: -80.0}
    assert ControlledNet(tiny_engine.model).base.card is tiny_engine.model.card
    controlled = Engine(ControlledNet(tiny_engine.model), device="cpu")
    assert controlled.typical_hu("abdomen") == {5: 60.0, 118: -80.0} and controlled.typical_hu("chest") == {}
    card_start = synthesize(anatomy, "abdomen", tiny_engine, steps=1, start_from="anatomy", start=1)
    inner = ndimage.binary_erosion(anatomy.array == 5, iterations=2)
    assert abs(float(np.median(card_start.array[inner])) - 60.0) < 10.0


def test_a_painted_start_without_a_timestep_starts_where_the_noise_is_the_default_sigma(tiny_engine):
    anatomy = _block_anatomy((0.8, 0.8, 5.0), Volume(np.zeros((1, 1, 1))).direction)
    table = {5: 60.0, BODY_LABEL: -80.0}
    assert NoiseSchedule(schedule="cosine").timestep_for_sigma(PAINTED_START_SIGMA) == 649
    start = tiny_engine.schedule.timestep_for_sigma(PAINTED_START_SIGMA)
    default = synthesize(anatomy, "abdomen", tiny_engine, steps=2, start_from="anatomy", label_hu=table, seed=0)
    explicit = synthesize(
        anatomy, "abdomen", tiny_engine, steps=2, start_from="anatomy", label_hu=table, start=start, seed=0
    )
    pure_noise_start = synthesize(
        anatomy,
        "abdomen",
        tiny_engine,
        steps=2,
        start_from="anatomy",
        label_hu=table,
        start=tiny_engine.schedule.sampling_start(),
        seed=0,
    )
    np.testing.assert_array_equal(default.array, explicit.array)
    assert not np.array_equal(default.array, pure_noise_start.array)


def test_the_shipped_base_model_cards_hold_their_training_datas_typical_hu():
    for version in ("0.3", "0.4"):
        card = ModelCard.from_dict(json.loads((MODELS / f"meddiff-fm-1mm-{version}.json").read_text()))
        abdomen = card.typical_hu("abdomen")
        assert 20.0 < abdomen[label_of("liver")] < 70.0 and abdomen[BODY_LABEL] < 0.0
        assert set(card.anatomy_hu) == {"abdomen", "chest", "head_neck"}


def test_the_automatic_start_is_the_anatomy_when_the_card_has_typical_hu_else_noise(tiny_engine):
    anatomy = _block_anatomy((0.8, 0.8, 5.0), Volume(np.zeros((1, 1, 1))).direction)

    def run(**keywords):
        return synthesize(anatomy, "abdomen", tiny_engine, steps=2, seed=0, **keywords).array

    np.testing.assert_array_equal(run(), run(start_from="noise"))
    table = {5: 60.0, BODY_LABEL: -80.0}
    np.testing.assert_array_equal(run(label_hu=table), run(start_from="anatomy", label_hu=table))
    tiny_engine.model.card = ModelCard(
        name="tiny",
        version="0",
        task="base",
        config={},
        anatomy_hu={"abdomen": {"5": 60.0, "118": -80.0}, "chest": {"118": -56.0}},
    )
    np.testing.assert_array_equal(run(), run(start_from="anatomy"))
    assert not np.array_equal(run(), run(start_from="noise"))
    chest = synthesize(anatomy, "chest", tiny_engine, steps=2, seed=0).array  # the body's value alone: noise
    np.testing.assert_array_equal(
        chest, synthesize(anatomy, "chest", tiny_engine, steps=2, seed=0, start_from="noise").array
    )


def test_typical_hu_by_name_replace_the_card_s_values_of_those_structures_only(tiny_engine):
    """A user's table (a contrast phase, say) by TotalSegmentator name or label value updates the card's:
    the structures it names take its values, the others keep the card's; on an oblique 5 mm grid."""
    angle = np.deg2rad(20.0)
    oblique = (np.cos(angle), 0.0, -np.sin(angle), 0.0, 1.0, 0.0, np.sin(angle), 0.0, np.cos(angle))
    anatomy = _block_anatomy((0.7, 0.7, 5.0), oblique)
    tiny_engine.model.card = ModelCard(
        name="tiny", version="0", task="base", config={}, anatomy_hu={"abdomen": {"5": 60.0, "118": -80.0}}
    )
    inner = ndimage.binary_erosion(anatomy.array == label_of("liver"), iterations=2)
    body = ndimage.binary_erosion(anatomy.array == BODY_LABEL, iterations=2)
    for asked in ({"liver": 150.0}, {"5": 150.0}, {5: 150.0}):
        result = synthesize(anatomy, "abdomen", tiny_engine, steps=1, start=1, seed=0, label_hu=asked)
        assert abs(float(np.median(result.array[inner])) - 150.0) < 10.0, asked
        assert abs(float(np.median(result.array[body])) + 80.0) < 10.0, asked  # the card's body
        assert "Typical HU asked for: liver 150." in result.metadata["MedDiffFM_note"]
        assert result.metadata["MedDiffFM_start"] == "painted anatomy, t = 1"
    card = synthesize(anatomy, "abdomen", tiny_engine, steps=1, start=1, seed=0)
    assert abs(float(np.median(card.array[inner])) - 60.0) < 10.0 and "asked" not in card.metadata["MedDiffFM_note"]
    with pytest.raises(InputError, match="Unknown structure 'livr'"):
        synthesize(anatomy, "abdomen", tiny_engine, steps=1, label_hu={"livr": 100.0})
    with pytest.raises(InputError, match="label values are 1..119"):
        synthesize(anatomy, "abdomen", tiny_engine, steps=1, label_hu={"0": 100.0})


def test_shift_to_medians_meets_each_target_under_clipping_and_touch_nothing_else():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (6, 7, 8), generator=generator)
    x0 = torch.rand((6, 7, 8), generator=generator) * 1.2 - 0.6
    held = shift_to_medians(x0, labels, {1: 0.1, 2: -0.9, 3: 1.5, 9: 0.0})
    one, two, three = (labels == value for value in (1, 2, 3))
    assert abs(float(held[one].median()) - 0.1) < 1e-6
    assert abs(float(held[two].median()) + 0.9) < 1e-6  # many voxels clipped at -1
    assert float(held[three].median()) == 1.0  # a target past the window's top: at the top
    assert float(held.min()) >= -1.0 and float(held.max()) <= 1.0
    assert torch.equal(held[labels == 0], x0[labels == 0])
    torch.testing.assert_close(held[one] - held[one].median(), x0[one] - x0[one].median())  # texture kept
    with pytest.raises(InputError, match="differs"):
        shift_to_medians(x0[:3], labels, {1: 0.0})


def test_asked_typical_hu_are_the_results_medians_not_only_painted_at_the_start(tiny_engine):
    """The sample's structures are shifted to the asked medians, so even a start from the default
    timestep (649 of 1000, where an untrained network's output has no memory of the painting) ends
    at them; the card's values only paint the start. Exact on the model's 3 mm grid (oblique); on a
    0.7 x 0.7 x 5 mm grid the untrained network's coarse texture (std about 80 HU) is interpolated,
    so there the values only have to move with the asked ones."""
    angle = np.deg2rad(25.0)
    oblique = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    tiny_engine.model.card = ModelCard(
        name="tiny", version="0", task="base", config={}, anatomy_hu={"abdomen": {"5": 150.0, "118": -80.0}}
    )
    medians = {}
    for spacing in ((3.0, 3.0, 3.0), (0.7, 0.7, 5.0)):
        anatomy = _block_anatomy(spacing, oblique)
        liver = anatomy.array == label_of("liver")
        for hu in (150.0, 0.0):
            asked = synthesize(anatomy, "abdomen", tiny_engine, steps=4, seed=0, label_hu={"liver": hu})
            assert asked.geometry.same_grid(anatomy.geometry)
            medians[spacing, hu] = float(np.median(asked.array[liver]))
        if spacing == (3.0, 3.0, 3.0):
            card = synthesize(anatomy, "abdomen", tiny_engine, steps=4, seed=0)  # 150 only painted
            assert abs(float(np.median(card.array[liver])) - 150.0) > 20.0
    assert abs(medians[(3.0, 3.0, 3.0), 150.0] - 150.0) < 2.0 and abs(medians[(3.0, 3.0, 3.0), 0.0]) < 2.0
    assert medians[(0.7, 0.7, 5.0), 150.0] - medians[(0.7, 0.7, 5.0), 0.0] > 60.0
