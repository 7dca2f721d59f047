"""The Slicer module's logic against real MRML (the ``slicer-core`` package), and its child-process runner.

The fixture does what the Slicer application does at start-up (Docs/METHOD.md 4): a scene, the application
logic, the default colour nodes with the Colors logic, and the Volumes, Segmentations and Subject
Hierarchy logics registered on it, plus the ``slicer.mrmlScene`` / ``slicer.modules.<name>.logic()``
globals that ``slicer.util`` expects.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import vtk
from conftest import crop, random_tiny_model, randomise_zero_parameters
from scipy import ndimage

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install slicer-core)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedDiffFM"))

from MedDiffFMSlicer import nodes  # noqa: E402
from MedDiffFMSlicer.logic import TaskLogic, TaskParameters, available_tasks, task_available  # noqa: E402
from MedDiffFMSlicer.runner import (  # noqa: E402
    ChildJob,
    _descendants_from_ps,
    advice_for,
    cli_arguments,
    kill_process_tree,
    parse_line,
)
from MedDiffFMSlicer.taskinfo import TASKS  # noqa: E402

from MedDiffFMLib.anatomy import BODY_LABEL, label_of  # noqa: E402
from MedDiffFMLib.errors import CancelledError, InputError, MaskError, MedDiffFMError  # noqa: E402
from MedDiffFMLib.model.network import ControlledNet  # noqa: E402
from MedDiffFMLib.tasks import Engine  # noqa: E402
from MedDiffFMLib.volume import Volume, read_volume, write_volume  # noqa: E402

OBLIQUE = np.array(
    [
        [0.0, 0.8 * np.cos(0.3), -2.5 * np.sin(0.3), 10.0],
        [1.1, 0.0, 0.0, -3.0],
        [0.0, 0.8 * np.sin(0.3), 2.5 * np.cos(0.3), 7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
"""Oblique, anisotropic (1.1 x 0.8 x 2.5 mm) and left-handed IJK-to-RAS matrix."""


@pytest.fixture
def scene():
    """A scene set up like the Slicer application's (see the module docstring)."""
    vtk.vtkObject.GlobalWarningDisplayOff()
    mrml = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(mrml)
    logics = {}
    for name, cls in (
        ("Colors", slicer.vtkSlicerColorLogic),
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(mrml)
        application.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = mrml
    slicer.modules = types.SimpleNamespace(**{name: _LogicHolder(logic) for name, logic in logics.items()})
    yield mrml
    mrml.Clear(True)
    for name, value in saved.items():
        setattr(slicer, name, value)


class _LogicHolder:
    """``slicer.modules.<name>``: only ``logic()`` is used by slicer.util."""

    def __init__(self, logic) -> None:
        self._logic = logic

    def logic(self):
        return self._logic


def _ijk_to_ras(node) -> np.ndarray:
    return nodes.ijk_to_ras(node)


def _ras_points(node_or_matrix, shape, count=50, seed=0):
    """RAS positions of random voxel indices (i, j, k) of a grid of ``shape`` (z, y, x)."""
    matrix = node_or_matrix if isinstance(node_or_matrix, np.ndarray) else _ijk_to_ras(node_or_matrix)
    rng = np.random.default_rng(seed)
    ijk = np.stack([rng.integers(0, n, count) for n in shape[::-1]] + [np.ones(count, int)])
    return ijk, (matrix @ ijk)[:3]


def _value_at_ras(node, ras: np.ndarray) -> np.ndarray:
    """Voxel values of ``node`` at RAS points (each point must be a voxel centre of ``node``)."""
    index = np.linalg.inv(_ijk_to_ras(node)) @ np.vstack([ras, np.ones(ras.shape[1])])
    i, j, k = np.rint(index[:3]).astype(int)
    assert np.allclose(index[:3], [i, j, k], atol=1e-4)
    return slicer.util.arrayFromVolume(node)[k, j, i]


@pytest.fixture
def ct_node(scene, small_ct):
    node = nodes.node_from_volume(small_ct, "CT", scene=scene)
    return node


@pytest.fixture
def anatomy_node(scene, small_seg, ct_node):
    """A segmentation with the liver, spleen and right kidney named as Slicer users name them."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TotalSegmentator")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    labels = np.asarray(small_seg.array)
    for name in ("liver", "spleen", "Right kidney", "my notes"):
        value = label_of(nodes.class_name_for(name)) if nodes.class_name_for(name) else 0
        segment_id = segmentation.GetSegmentation().AddEmptySegment("", name)
        mask = (labels == value).astype(np.uint8) if value else np.zeros(labels.shape, np.uint8)
        if value and not mask.any():
            continue
        if not value:
            mask[0, 0, 0] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, ct_node)
    return segmentation


@pytest.fixture
def engine():
    return Engine(random_tiny_model(), device="cpu", batch_size=8)


# --------------------------------------------------------------------------------------------------
# Volumes, segments and anatomy
# --------------------------------------------------------------------------------------------------


def test_volume_node_round_trip_with_an_oblique_anisotropic_left_handed_matrix(scene):
    assert np.linalg.det(OBLIQUE[:3, :3]) < 0
    array = np.random.default_rng(0).normal(0, 100, (5, 6, 7)).astype(np.float32)
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=OBLIQUE, name="oblique")
    volume = nodes.volume_from_node(node)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, (1.1, 0.8, 2.5))
    # Physical space: the library's LPS position of every voxel is the node's RAS position, flipped.
    ijk, ras = _ras_points(node, array.shape)
    lps = (volume.geometry.index_to_physical() @ ijk)[:3]
    np.testing.assert_allclose(lps, ras * np.array([[-1], [-1], [1]]), atol=1e-9)

    back = nodes.node_from_volume(volume, "back", scene=scene)
    np.testing.assert_allclose(_ijk_to_ras(back), OBLIQUE, atol=1e-12)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(back), array)
    assert back.GetName() == "back" and back.GetDisplayNode() is not None


def test_slicer_reader_flips_k_but_physical_positions_agree(scene, tmp_path):
    """Slicer's NRRD reader makes a left-handed grid right-handed by flipping K; our file reading does not.
    Both must put the same value at the same physical point."""
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=OBLIQUE, name="oblique")
    path = write_volume(nodes.volume_from_node(node), tmp_path / "oblique.nrrd")
    loaded = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(loaded)
    assert np.linalg.det(_ijk_to_ras(loaded)[:3, :3]) > 0  # K was flipped by Slicer
    ours = nodes.node_from_volume(read_volume(path), "ours", scene=scene)
    np.testing.assert_allclose(_ijk_to_ras(ours), OBLIQUE, atol=1e-9)
    _, ras = _ras_points(node, array.shape, count=80)
    np.testing.assert_array_equal(_value_at_ras(loaded, ras), _value_at_ras(node, ras))
    np.testing.assert_array_equal(_value_at_ras(ours, ras), _value_at_ras(node, ras))


def test_sample_ct_geometry_survives_node_conversion(scene, small_ct):
    node = nodes.node_from_volume(small_ct, "CT", scene=scene)
    again = nodes.volume_from_node(node)
    assert again.geometry.same_grid(small_ct.geometry, tolerance=1e-9)
    np.testing.assert_array_equal(again.array, small_ct.array)


def test_segment_to_mask_and_back_on_the_volume_grid(scene):
    ct = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8), np.int16), ijkToRAS=OBLIQUE, name="CT")
    mask = np.zeros((6, 7, 8), np.uint8)
    mask[1:4, 2:6, 3:7] = 1
    mask[5, 0, 0] = 1
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesions")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "lesion")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, ct)

    volume = nodes.mask_from_segment(segmentation, segment_id, ct)
    np.testing.assert_array_equal(volume.array, mask)
    assert volume.geometry.same_grid(nodes.volume_from_node(ct).geometry)

    created = nodes.segmentation_from_masks(
        [("found", volume, (1, 0, 0)), ("none", volume.with_array(0 * mask), (0, 1, 0))], "result", ct, scene
    )
    ids = nodes.segment_ids(created)
    assert [created.GetSegmentation().GetSegment(i).GetName() for i in ids] == ["found", "none"]
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(created, ids[0], ct), mask)
    assert not slicer.util.arrayFromSegmentBinaryLabelmap(created, ids[1], ct).any()
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0  # temporary nodes removed

    empty_id = segmentation.GetSegmentation().AddEmptySegment("", "empty")
    with pytest.raises(MaskError, match="no voxel"):
        nodes.mask_from_segment(segmentation, empty_id, ct)


def test_anatomy_from_a_segmentation_uses_class_names_and_fills_the_body(scene, ct_node, anatomy_node, small_seg):
    anatomy = nodes.anatomy_from_node(anatomy_node, ct_node, scene)
    labels = np.asarray(small_seg.array)
    for name in ("liver", "spleen", "kidney_right"):
        value = label_of(name)
        np.testing.assert_array_equal(anatomy.array == value, labels == value)
    assert (anatomy.array == BODY_LABEL).any()
    assert anatomy.geometry.same_grid(nodes.volume_from_node(ct_node).geometry)
    assert set(np.unique(anatomy.array)) <= {0, label_of("liver"), label_of("spleen"), label_of("kidney_right"), 118}

    unnamed = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "unnamed")
    unnamed.GetSegmentation().AddEmptySegment("", "Segment_1")
    with pytest.raises(InputError, match="TotalSegmentator"):
        nodes.anatomy_from_node(unnamed, ct_node, scene)


def test_anatomy_from_a_label_map_node_on_another_grid(scene, ct_node, small_seg):
    """A label map on a smaller grid is brought onto the CT's grid (nearest neighbour): same labels where it is."""
    part = crop(small_seg, slice(2, 12), slice(5, 35), slice(4, 40))
    labelmap = nodes.node_from_volume(part, "seg", "vtkMRMLLabelMapVolumeNode", scene)
    anatomy = nodes.anatomy_from_node(labelmap, ct_node, scene)
    assert anatomy.geometry.same_grid(nodes.volume_from_node(ct_node).geometry)
    original = np.asarray(small_seg.array)[2:12, 5:35, 4:40]
    inside = np.asarray(anatomy.array)[2:12, 5:35, 4:40]
    np.testing.assert_array_equal(inside[original > 0], original[original > 0])
    outside = np.ones(anatomy.array.shape, bool)
    outside[2:12, 5:35, 4:40] = False
    assert set(np.unique(np.asarray(anatomy.array)[outside])) <= {0, BODY_LABEL}
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    labelmap.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match="Harden"):
        nodes.anatomy_from_node(labelmap, ct_node, scene)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("liver", "liver"),
        ("Liver", "liver"),
        ("kidney right", "kidney_right"),
        ("Right kidney", "kidney_right"),
        ("body", "body"),
        ("Segment_1", None),
        ("", None),
    ],
)
def test_segment_names_map_to_classes(text, expected):
    assert nodes.class_name_for(text) == expected


def test_every_class_name_maps_to_itself_as_segment_id_or_name_in_any_case():
    from MedDiffFMLib.anatomy import CLASS_NAMES

    for name in CLASS_NAMES[1:]:  # vertebrae_L1, vertebrae_C1, ... are spelled with capitals
        for text in (name, name.lower(), name.upper(), name.replace("_", " ")):
            assert nodes.class_name_for(text) == name, text
    assert nodes.class_name_for("Vertebrae L1") == "vertebrae_L1"


# --------------------------------------------------------------------------------------------------
# Tasks in this process
# --------------------------------------------------------------------------------------------------


def _folder_of(scene, node):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    return hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node))


@pytest.fixture
def study(scene, ct_node):
    """Put the CT in a patient/study folder, as a DICOM import does."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
    folder = hierarchy.CreateStudyItem(patient, "Study")
    item = hierarchy.GetItemByDataNode(ct_node)  # the application creates it; slicer-core does not
    if item:
        hierarchy.SetItemParent(item, folder)
    else:
        hierarchy.CreateItem(folder, ct_node)
    return folder


def test_denoise_creates_a_node_on_the_input_grid_next_to_it(scene, ct_node, anatomy_node, engine, study):
    steps = []
    denoised = TaskLogic(scene).denoise(
        ct_node, anatomy_node, steps=2, engine=engine, progress=lambda d, t, m: steps.append((d, t))
    )
    assert denoised.GetName() == "CT denoised"
    np.testing.assert_allclose(_ijk_to_ras(denoised), _ijk_to_ras(ct_node), atol=0)
    result = slicer.util.arrayFromVolume(denoised)
    assert result.shape == slicer.util.arrayFromVolume(ct_node).shape and np.isfinite(result).all()
    assert not np.array_equal(result, slicer.util.arrayFromVolume(ct_node))
    assert _folder_of(scene, denoised) == study
    assert steps and steps[-1][0] == steps[-1][1]
    assert "anatomy label map" in denoised.GetAttribute("MedDiffFM.summary")
    assert denoised.GetAttribute("MedDiffFM.task") == "denoise"


def test_denoise_keeps_an_oblique_left_handed_geometry(scene, small_ct, engine):
    node = slicer.util.addVolumeFromArray(
        np.asarray(small_ct.array), ijkToRAS=np.diag([3.0, 3.0, 3.0, 1.0]) @ OBLIQUE, name="Oblique CT"
    )
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    denoised = TaskLogic(scene).denoise(node, region="abdomen", steps=1, engine=engine)
    assert denoised.GetName() == "Oblique CT denoised"
    np.testing.assert_array_equal(_ijk_to_ras(denoised), _ijk_to_ras(node))
    assert denoised.GetTransformNodeID() == transform.GetID()


def test_detect_anomalies_creates_a_map_and_a_segmentation(scene, ct_node, anatomy_node, engine, study, small_seg):
    # A random test network: a threshold just above 0 HU makes every nonzero map voxel an anomaly.
    anomaly_map, anomalies = TaskLogic(scene).detectAnomalies(
        ct_node, anatomy_node, "liver", engine=engine, threshold=1e-3
    )
    assert anomaly_map.GetName() == "CT anomaly map" and anomalies.GetName() == "CT anomalies"
    np.testing.assert_allclose(_ijk_to_ras(anomaly_map), _ijk_to_ras(ct_node), atol=0)
    values = slicer.util.arrayFromVolume(anomaly_map)
    liver = np.asarray(small_seg.array) == label_of("liver")
    assert not values[~liver].any() and values[liver].any()
    ids = nodes.segment_ids(anomalies)
    assert [anomalies.GetSegmentation().GetSegment(i).GetName() for i in ids] == ["liver anomaly"]
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(anomalies, ids[0], ct_node)
    assert mask.any() and not mask[~liver].any()
    assert _folder_of(scene, anomaly_map) == study and _folder_of(scene, anomalies) == study
    display = anomaly_map.GetDisplayNode()
    assert display.GetColorNodeID() != "vtkMRMLColorTableNodeGrey" and display.GetLevel() == 0


def test_synthesize_from_a_segmentation_on_the_ct_grid(scene, ct_node, anatomy_node, engine, small_seg):
    synthetic = TaskLogic(scene).synthesize(anatomy_node, referenceVolumeNode=ct_node, steps=2, engine=engine)
    assert synthetic.GetName() == "CT synthetic CT"
    np.testing.assert_allclose(_ijk_to_ras(synthetic), _ijk_to_ras(ct_node), atol=0)
    assert synthetic.GetAttribute("MedDiffFM.region") == "abdomen"  # found from the anatomy
    # The panel's "Typical HU" line: the painted start keeps the asked liver value at a late start.
    asked = TaskLogic(scene).synthesize(
        anatomy_node, referenceVolumeNode=ct_node, steps=1, start=1, label_hu="liver = 150,", engine=engine
    )
    liver = ndimage.binary_erosion(np.asarray(small_seg.array) == label_of("liver"), iterations=2)
    assert abs(float(np.median(slicer.util.arrayFromVolume(asked)[liver])) - 150.0) < 15.0
    with pytest.raises(InputError, match="Unknown structure 'livr'. Did you mean 'liver'"):
        TaskLogic(scene).synthesize(anatomy_node, label_hu="livr=150", engine=engine)
    with pytest.raises(InputError, match="anatomy segmentation"):
        TaskLogic(scene).synthesize(None, engine=engine)


def test_missing_inputs_are_refused_before_any_work(scene, ct_node, engine):
    logic = TaskLogic(scene)
    with pytest.raises(InputError, match="organ"):
        logic.run(TaskParameters("detect_anomalies", volume=ct_node, anatomy=ct_node), engine=engine)
    with pytest.raises(InputError, match="CT volume"):
        logic.run(TaskParameters("denoise"), engine=engine)
    with pytest.raises(TypeError, match="Unknown setting"):
        logic.denoise(ct_node, engine=engine, stepz=3)


def test_a_task_missing_from_the_library_says_so(scene, ct_node, monkeypatch):
    import importlib

    monkeypatch.delattr(importlib.import_module("MedDiffFMLib.tasks.super_resolution"), "run")
    assert not task_available("super_resolve") and "super_resolve" not in available_tasks()
    with pytest.raises(InputError, match="newer MedDiffFMLib"):
        TaskLogic(scene).validate(TaskParameters("super_resolve", volume=ct_node))


@pytest.fixture
def controlled_engine():
    """A tiny base model with a (randomly initialised) ControlNet, for the fine-tuned tasks."""
    return Engine(randomise_zero_parameters(ControlledNet(random_tiny_model()), seed=1), device="cpu", batch_size=8)


@pytest.fixture
def lesion_segmentation(scene, ct_node, small_seg):
    """A lesion drawn inside the liver, as a user draws it in the Segment Editor."""
    liver = np.asarray(small_seg.array) == label_of("liver")
    lesion = np.zeros(liver.shape, np.uint8)
    z, y, x = (int(np.median(axis)) for axis in np.nonzero(liver))
    lesion[z - 1 : z + 2, y - 2 : y + 3, x - 2 : x + 3] = 1
    lesion &= liver
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Lesions")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "tumour")
    slicer.util.updateSegmentBinaryLabelmapFromArray(lesion, segmentation, segment_id, ct_node)
    return segmentation, segment_id, lesion.astype(bool)


def test_inpaint_lesion_changes_only_the_lesion_and_its_margin(
    scene, ct_node, lesion_segmentation, controlled_engine, study
):
    segmentation, segment_id, lesion = lesion_segmentation
    inpainted = TaskLogic(scene).inpaintLesion(
        ct_node, segmentation, segment_id, steps=3, margin_mm=0.0, engine=controlled_engine
    )
    assert inpainted.GetName() == "CT lesion inpainted"
    np.testing.assert_array_equal(_ijk_to_ras(inpainted), _ijk_to_ras(ct_node))
    before, after = slicer.util.arrayFromVolume(ct_node), slicer.util.arrayFromVolume(inpainted)
    np.testing.assert_array_equal(after[~lesion], before[~lesion])
    assert not np.array_equal(after[lesion], before[lesion])
    assert _folder_of(scene, inpainted) == study


def test_generate_lesion_on_the_anatomy_grid(scene, ct_node, anatomy_node, lesion_segmentation, controlled_engine):
    segmentation, segment_id, _ = lesion_segmentation
    generated = TaskLogic(scene).generateLesion(
        anatomy_node, segmentation, segment_id, referenceVolumeNode=ct_node, steps=2, engine=controlled_engine
    )
    assert generated.GetName() == "CT synthetic lesion CT"
    np.testing.assert_array_equal(_ijk_to_ras(generated), _ijk_to_ras(ct_node))
    assert generated.GetAttribute("MedDiffFM.task") == "generate-lesion"


def test_super_resolve_makes_thin_slices(scene, small_ct, controlled_engine):
    thick = Volume(small_ct.array[::2], (3.0, 3.0, 6.0), small_ct.origin, small_ct.direction)
    node = nodes.node_from_volume(thick, "Thick CT", scene=scene)
    thin = TaskLogic(scene).superResolve(node, spacing=3.0, steps=2, engine=controlled_engine)
    assert thin.GetName() == "Thick CT super-resolved"
    assert slicer.util.arrayFromVolume(thin).shape == (2 * thick.array.shape[0], *thick.array.shape[1:])
    assert np.allclose(thin.GetSpacing(), (3.0, 3.0, 3.0))
    # The first thin slab's centre is the first thick slice's centre.
    thick_matrix, thin_matrix = _ijk_to_ras(node), _ijk_to_ras(thin)
    centre_thick = thick_matrix @ [0, 0, 0, 1]
    centre_slab = (thin_matrix @ [0, 0, 0, 1] + thin_matrix @ [0, 0, 1, 1]) / 2
    np.testing.assert_allclose(centre_slab, centre_thick, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The child-process runner
# --------------------------------------------------------------------------------------------------


def test_cli_arguments_are_a_list_without_shell_quoting():
    arguments = cli_arguments(
        "detect-anomalies",
        ["/a b/ct file.nrrd", "out;rm -rf x.nrrd"],
        {"--organ": ["liver", "spleen"], "--threshold": None, "--overwrite": True, "--quiet": False, "--t": 950},
    )
    assert arguments == [
        "-m", "MedDiffFMLib.cli", "detect-anomalies", "/a b/ct file.nrrd", "out;rm -rf x.nrrd",
        "--organ", "liver", "--organ", "spleen", "--overwrite", "--t", "950", "--progress-format", "json",
    ]  # fmt: skip
    assert parse_line('{"event": "progress", "done": 1, "total": 2, "message": ""}')["done"] == 1
    assert parse_line("WARNING: no GPU") is None and parse_line('{"no": "event"}') is None


def _wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_child_process_denoise_end_to_end(scene, ct_node, anatomy_node, study, tmp_path):
    logic = TaskLogic(scene)
    parameters = TaskParameters(
        "denoise", volume=ct_node, anatomy=anatomy_node, settings={"steps": 2}, untrained="tiny", device="cpu"
    )
    running = logic.start(parameters, temp_parent=tmp_path)
    folder = running.job.folder
    assert (folder / "ct.nrrd").exists() and (folder / "anatomy.nrrd").exists()
    events = []
    running.job.wait(timeout=240, on_event=events.append)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 2
    assert any("UNTRAINED MODEL" in e.get("message", "") for e in events if e["event"] == "log")
    result = logic.finish(running)
    denoised = result.outputs["volume"]
    assert denoised.GetName() == "CT denoised" and "sigma_n" in result.summary
    np.testing.assert_array_equal(_ijk_to_ras(denoised), _ijk_to_ras(ct_node))
    assert _folder_of(scene, denoised) == study
    assert not folder.exists() and not any(tmp_path.iterdir())

    # The same seed in this process gives the same voxels as the child process.
    in_process = logic.denoise(ct_node, anatomy_node, steps=2, untrained="tiny", device="cpu")
    np.testing.assert_allclose(
        slicer.util.arrayFromVolume(in_process), slicer.util.arrayFromVolume(denoised), atol=0.05
    )


def test_results_of_a_run_whose_input_left_the_scene_are_discarded(scene, ct_node, tmp_path):
    logic = TaskLogic(scene)
    parameters = TaskParameters("denoise", volume=ct_node, settings={"steps": 1}, untrained="tiny", device="cpu")
    running = logic.start(parameters, temp_parent=tmp_path)
    running.job.wait(timeout=240)
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    scene.RemoveNode(ct_node)  # what closing the scene does to the input
    with pytest.raises(InputError, match="removed from the scene while MedDiffFM ran"):
        logic.finish(running)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes - 1
    assert not running.job.folder.exists()


def test_child_process_anomalies_end_to_end(scene, ct_node, anatomy_node, tmp_path):
    logic = TaskLogic(scene)
    running = logic.start(
        TaskParameters(
            "detect_anomalies",
            volume=ct_node,
            anatomy=anatomy_node,
            settings={"organs": ["liver"]},
            untrained="tiny",
            device="cpu",
        ),
        temp_parent=tmp_path,
    )
    running.job.wait(timeout=240)
    result = logic.finish(running)
    assert [node.GetName() for node in result.nodes] == ["CT anomaly map", "CT anomalies"]
    assert "anomalous voxels" in result.summary
    assert not any(tmp_path.iterdir())


def test_child_process_inpaint_lesion_end_to_end(scene, ct_node, lesion_segmentation, tmp_path):
    segmentation, segment_id, lesion = lesion_segmentation
    logic = TaskLogic(scene)
    running = logic.start(
        TaskParameters(
            "inpaint_lesion",
            volume=ct_node,
            lesion_segmentation=segmentation,
            lesion_segment_id=segment_id,
            settings={"steps": 2, "margin_mm": 0.0},
            untrained="tiny",
            device="cpu",
        ),
        temp_parent=tmp_path,
    )
    assert (running.job.folder / "lesion.nrrd").exists()
    running.job.wait(timeout=240)
    inpainted = logic.finish(running).outputs["volume"]
    before, after = slicer.util.arrayFromVolume(ct_node), slicer.util.arrayFromVolume(inpainted)
    np.testing.assert_array_equal(after[~lesion], before[~lesion])
    assert not any(tmp_path.iterdir())


def test_a_failing_child_shows_its_real_error(scene, ct_node, tmp_path):
    logic = TaskLogic(scene)
    parameters = TaskParameters("denoise", volume=ct_node, settings={"steps": 2}, model="no-such-model", device="cpu")
    running = logic.start(parameters, temp_parent=tmp_path)
    outcome = running.job.wait(timeout=240)
    assert outcome.returncode == 2 and outcome.error_kind == "WeightsError"
    with pytest.raises(MedDiffFMError, match="No installed model matches 'no-such-model'") as error:
        logic.finish(running)
    assert "non-zero exit status" not in str(error.value)
    assert not any(tmp_path.iterdir())


def test_a_crashing_child_shows_its_last_words(tmp_path):
    def crash(arguments, environment):
        code = (
            "import sys; print('loading'); sys.stdout.flush(); raise MemoryError('DefaultCPUAllocator: out of memory')"
        )
        return subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    job = ChildJob(launcher=crash, temp_parent=tmp_path).start("denoise")
    outcome = job.wait(timeout=60)
    assert not outcome.succeeded and outcome.returncode == 1
    assert "MemoryError: DefaultCPUAllocator: out of memory" in outcome.error
    assert "ran out of memory" in outcome.error  # the advice
    job.cleanup()
    assert not any(tmp_path.iterdir())


def test_output_the_locale_cannot_decode_is_read_to_the_end(tmp_path):
    """launchConsoleProcess opens the pipe in the locale's encoding; the child writes UTF-8."""

    def ascii_locale(arguments, environment):
        code = (
            "import sys; sys.stdout.reconfigure(encoding='utf-8'); print('Ausgabe: \u00fcber 5 \u00b5m, \u0441');"
            "[print('x' * 100) for _ in range(2000)]; print('last line')"
        )
        return subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="ascii"
        )

    job = ChildJob(launcher=ascii_locale, temp_parent=tmp_path).start("denoise")
    outcome = job.wait(timeout=60)
    assert not outcome.cancelled and outcome.returncode == 0
    assert outcome.log[-1] == "last line"
    job.cleanup()


def _through_a_launcher(arguments, environment):
    """Start the command through an intermediate process, like PythonSlicer starts the real interpreter."""
    wrapper = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", wrapper, *arguments],
        env={**os.environ, **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed child that nobody waited for is a zombie: not running any more
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(os.name == "nt", reason="POSIX process listing")
def test_cancel_kills_the_process_tree_and_leaves_nothing(scene, ct_node, tmp_path):
    logic = TaskLogic(scene)
    parameters = TaskParameters("denoise", volume=ct_node, settings={"steps": 200}, untrained="tiny", device="cpu")
    running = logic.start(parameters, launcher=_through_a_launcher, temp_parent=tmp_path)
    launcher_pid = running.job.process.pid
    _wait_for(lambda: running.poll() is not None and running.progress is not None, timeout=120)
    workers = _descendants_from_ps(launcher_pid)
    assert workers, "the launcher should have started the interpreter as its child"
    running.cancel()
    assert running.finished and running.job.outcome.cancelled
    _wait_for(lambda: not any(_alive(pid) for pid in [launcher_pid, *workers]), timeout=10)
    assert not running.job.folder.exists() and not any(tmp_path.iterdir())
    with pytest.raises(CancelledError):
        logic.finish(running)
    assert scene.GetFirstNodeByName("CT denoised") is None


@pytest.mark.skipif(os.name == "nt", reason="POSIX process listing")
def test_kill_process_tree_without_psutil():
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); time.sleep(60)",
        ]
    )
    _wait_for(lambda: bool(_descendants_from_ps(parent.pid)), timeout=20)
    child = _descendants_from_ps(parent.pid)[0]
    kill_process_tree(parent.pid, use_psutil=False)
    parent.wait(timeout=10)
    _wait_for(lambda: not _alive(child), timeout=10)


def test_advice_for_known_failures():
    assert "PyTorch Utils" in advice_for("InputError: CUDA was requested but no CUDA GPU is visible to PyTorch")
    assert "Import from file" in advice_for("Download of 'https://x' failed (<urlopen error timed out>)")
    assert advice_for("something else") == ""


def test_files_written_for_the_child_keep_the_exact_geometry(scene, tmp_path):
    array = np.random.default_rng(1).normal(0, 50, (4, 5, 6)).astype(np.float32) - 500
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=OBLIQUE, name="oblique")
    path = write_volume(nodes.volume_from_node(node), tmp_path / "ct.nrrd")
    assert read_volume(path).geometry.same_grid(nodes.volume_from_node(node).geometry, tolerance=1e-9)


# --------------------------------------------------------------------------------------------------
# Model manager and dependencies
# --------------------------------------------------------------------------------------------------


def _catalogue_with_a_tiny_model(folder: Path, corrupt: bool = False) -> Path:
    from MedDiffFMLib.model import weights

    source = folder / "published" / "tiny-demo.safetensors"
    source.parent.mkdir()
    card = weights.save_checkpoint(random_tiny_model(), source, weights.ModelCard("tiny-demo", "1.2", "base", {}))
    entry = {
        "name": "tiny-demo",
        "version": "1.2",
        "task": "base",
        "url": source.as_uri(),
        "sha256": "0" * 64 if corrupt else card.sha256,
        "card_url": weights.card_path(source).as_uri(),
        "description": "tiny test model",
    }
    catalogue = folder / "catalogue.json"
    catalogue.write_text(__import__("json").dumps({"version": 1, "models": [entry]}))
    return catalogue


def test_model_install_with_progress_from_a_catalogue(tmp_path, monkeypatch):
    from MedDiffFMSlicer import models

    monkeypatch.setenv("MEDDIFFFM_CATALOGUE", str(_catalogue_with_a_tiny_model(tmp_path)))
    assert models.installed() == []
    assert models.catalogue() == ["tiny-demo@1.2 (base): tiny test model"]
    installer = models.ModelInstaller(models.catalogue()[0]).start().wait(timeout=60)
    assert installer.finished and not installer.error, installer.error
    assert installer.progress is not None and installer.progress[0] == installer.progress[1] > 0
    assert models.installed() == ["tiny-demo@1.2"] and installer.path.parent == models.cache_folder()

    other = tmp_path / "elsewhere"
    models.set_cache_folder(other)
    assert models.cache_folder() == other and models.installed() == []
    imported = models.import_model(tmp_path / "published" / "tiny-demo.safetensors")
    assert imported.parent == other and models.installed() == ["tiny-demo@1.2"]


def test_model_install_refuses_a_corrupted_download(tmp_path, monkeypatch):
    from MedDiffFMSlicer import models

    monkeypatch.setenv("MEDDIFFFM_CATALOGUE", str(_catalogue_with_a_tiny_model(tmp_path, corrupt=True)))
    installer = models.ModelInstaller("tiny-demo").start().wait(timeout=60)
    assert installer.finished and "Checksum mismatch" in installer.error
    assert models.installed() == [] and not list(models.cache_folder().glob("*.safetensors"))


def test_dependencies_are_complete_here_and_installs_are_pinned(monkeypatch):
    from MedDiffFMSlicer import dependencies

    assert dependencies.missing_packages() == []
    pins = dependencies.constraints().split()
    assert any(pin.startswith("numpy==") for pin in pins) and any(pin.startswith("torch==") for pin in pins)
    assert dependencies.ensure(lambda *a: pytest.fail("nothing to ask"), None, None) == []

    # A package that cannot be imported is installed with the constraints file, after asking.
    monkeypatch.setattr(dependencies, "REQUIREMENTS", (("no_such_module_xyz", "no-such-module-xyz>=1"),))
    calls = []
    with pytest.raises(dependencies.DependencyError, match="cancelled"):
        dependencies.ensure(lambda text, details: calls.append(details) or False, calls.append, None)
    assert calls == ["Packages to install: no-such-module-xyz>=1"]

    def pip(arguments):
        calls.append(arguments)
        constraints = Path(arguments[arguments.index("-c") + 1]).read_text()
        assert "numpy==" in constraints and "torch==" in constraints
        raise RuntimeError("Could not find a version that satisfies the requirement")

    with pytest.raises(dependencies.DependencyError, match="Dependency install failed: pip could not install"):
        dependencies.ensure(lambda *a: True, pip, None, log=lambda text: None)
    assert calls[-1][0] == "no-such-module-xyz>=1"


def test_a_failed_or_outdated_torch_install_is_a_dependency_error(monkeypatch):
    import subprocess

    from MedDiffFMSlicer import dependencies

    monkeypatch.setattr(dependencies, "module_missing", lambda name: name == "torch")

    def failing_install():
        raise subprocess.CalledProcessError(1, ["pip", "install", "torch"])

    with pytest.raises(dependencies.DependencyError, match="installing PyTorch failed"):
        dependencies.ensure(lambda *a: True, lambda args: None, failing_install, log=lambda text: None)

    monkeypatch.setattr(dependencies, "module_missing", lambda name: False)
    real_version = dependencies.importlib.metadata.version
    monkeypatch.setattr(
        dependencies.importlib.metadata, "version", lambda name: "2.1.2+cpu" if name == "torch" else real_version(name)
    )
    assert dependencies.missing_packages() == [f"torch>={dependencies.MINIMUM_TORCH}"]
    with pytest.raises(dependencies.DependencyError, match=r"PyTorch 2.1.2\+cpu is installed"):
        dependencies.ensure(lambda *a: pytest.fail("nothing to ask"), None, None)
    assert dependencies.version_tuple("2.10.0a0+git") == (2, 10, 0) > dependencies.version_tuple("2.2")


def test_requirements_cover_every_package_the_library_imports():
    import ast

    from MedDiffFMSlicer import dependencies

    provided = {module for module, _ in dependencies.REQUIREMENTS} | {"torch", "numpy", "SimpleITK", "MedDiffFMLib"}
    imported = set()
    for path in (ROOT / "MedDiffFMLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names}
    assert third_party <= provided, sorted(third_party - provided)


SLICER_LIKE_IMPORT = """
import sys
# Slicer puts only the module's folder on sys.path: hide the checkout and the editable install.
sys.meta_path = [finder for finder in sys.meta_path if "editable" not in getattr(finder, "__module__", "")]
sys.path = [p for p in sys.path if p not in ("", {root!r})]
sys.path.insert(0, {module!r})
from MedDiffFMSlicer import dependencies
assert dependencies.module_missing("MedDiffFMLib")
print("missing", dependencies.missing_packages()[:1])
print("found", dependencies.put_library_on_path({module!r}))
print("missing", dependencies.missing_packages())
from MedDiffFMSlicer import logic
import MedDiffFMLib
print("library", MedDiffFMLib.__file__)
"""


def test_additional_module_path_install_finds_the_library_beside_the_module(tmp_path):
    code = SLICER_LIKE_IMPORT.format(root=str(ROOT), module=str(ROOT / "MedDiffFM"))
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "missing ['MedDiffFMLib']" in result.stdout
    assert f"found {ROOT}" in result.stdout and "missing []" in result.stdout
    assert f"library {ROOT / 'MedDiffFMLib' / '__init__.py'}" in result.stdout


def test_a_module_folder_without_the_library_says_what_to_do(tmp_path):
    module = tmp_path / "MedDiffFM"
    shutil.copytree(ROOT / "MedDiffFM", module, ignore=shutil.ignore_patterns("__pycache__"))
    code = SLICER_LIKE_IMPORT.format(root=str(ROOT), module=str(module)).split("from MedDiffFMSlicer import logic")[0]
    code += "dependencies.ensure(lambda *a: True, None, None)\n"
    result = _run_python(code, tmp_path)
    assert result.returncode != 0
    assert "found None" in result.stdout
    assert "DependencyError" in result.stderr and "keep it inside the whole repository checkout" in result.stderr


def _run_python(code: str, folder: Path) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder, env=environment)


# --------------------------------------------------------------------------------------------------
# The module file's calls into the logic (MedDiffFM.py itself needs the Slicer application)
# --------------------------------------------------------------------------------------------------


def _module_tree():
    import ast

    return ast.parse((Path(__file__).resolve().parents[1] / "MedDiffFM" / "MedDiffFM.py").read_text())


def test_module_logic_offers_only_task_logic_methods():
    import ast

    for node in _module_tree().body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "TASK_LOGIC_METHODS":
            names = ast.literal_eval(node.value.args[0])
            break
    else:
        raise AssertionError("TASK_LOGIC_METHODS not found")
    assert {"synthesize", "denoise", "detectAnomalies", "superResolve", "generateLesion", "inpaintLesion"} <= set(names)
    assert all(callable(getattr(TaskLogic, name, None)) for name in names)


def test_the_panel_builds_task_parameters_with_known_fields():
    import ast
    from dataclasses import fields

    known = {f.name for f in fields(TaskParameters)}
    calls = [
        node
        for node in ast.walk(_module_tree())
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "TaskParameters"
    ]
    assert calls
    for call in calls:
        assert {keyword.arg for keyword in call.keywords} - known == set()


@pytest.mark.parametrize("task", list(TASKS))
def test_child_job_files_carry_the_panel_settings_to_the_library(
    scene, ct_node, anatomy_node, lesion_segmentation, task, tmp_path
):
    """The job file the module writes for its background process reads back as the same run."""
    from MedDiffFMLib.job import Job

    segmentation, segment_id, _ = lesion_segmentation
    spec = TASKS[task]
    given = {"organs": ["liver", "spleen"], "sigma_n": 0.05, "lam": 2.0, "threshold": 30.0, "steps": 3}
    parameters = TaskParameters(
        task,
        volume=ct_node,
        anatomy=anatomy_node,
        lesion_segmentation=segmentation,
        lesion_segment_id=segment_id,
        settings={name: value for name, value in given.items() if name in spec.defaults()},
        region="abdomen",
        model="base@1",
        controlnet="cn@1",
        device="cpu",
    )
    logic = TaskLogic(scene)
    job = ChildJob(temp_parent=tmp_path)
    try:
        job_file, outputs = logic.write_job(parameters, logic.prepare(parameters), job)
        read = Job.read(job_file)
        assert all(Path(path).exists() for path in read.inputs.values())
    finally:
        job.cleanup()
    assert read.task == task and read.region == "abdomen" and read.seed == 0
    assert set(read.inputs) == {role.name for role in spec.inputs if role.required or role.name == "anatomy"}
    assert read.outputs == {name: str(path) for name, path in outputs.items()}
    assert read.engine.model == "base@1" and read.engine.device == "cpu"
    assert read.engine.controlnet_task == spec.controlnet_task
    assert read.engine.controlnet == ("cn@1" if spec.controlnet_task else None)  # only where the task has one
    resolved = spec.resolve(read.settings)
    assert resolved == spec.resolve(parameters.settings)
    assert resolved.get("steps", 3) == 3


def test_one_task_runs_on_several_volumes_and_a_failing_one_does_not_stop_the_others(scene, small_ct, engine):
    logic = TaskLogic(scene)
    first = nodes.node_from_volume(small_ct, "CT A", scene=scene)
    second = nodes.node_from_volume(small_ct.with_array(small_ct.array + 5), "CT B", scene=scene)
    flat = nodes.node_from_volume(small_ct.with_array(np.full_like(small_ct.array, 3000)), "not CT", scene=scene)
    seen = []
    parameters = TaskParameters("denoise", settings={"steps": 1}, untrained="tiny", device="cpu")
    results = logic.run_on_volumes(parameters, [first, flat, second], progress=lambda *a: seen.append(a))
    assert [volume.GetName() for volume, _ in results] == ["CT A", "not CT", "CT B"]
    assert isinstance(results[1][1], MedDiffFMError)
    for volume, result in results[::2]:
        assert result.outputs["volume"].GetName() == f"{volume.GetName()} denoised"
        np.testing.assert_array_equal(_ijk_to_ras(result.outputs["volume"]), _ijk_to_ras(volume))
    assert seen[0][:2] == (0, 3) and seen[-1][:2] == (3, 3)


def test_the_panel_and_the_command_line_build_the_same_engine(scene, ct_node):
    from MedDiffFMLib import cli

    logic = TaskLogic(scene)
    parameters = TaskParameters("denoise", volume=ct_node, untrained="tiny", device="cpu", overlap=0.25, batch_size=2)
    from_panel = logic.engine(parameters)
    arguments = cli.build_parser().parse_args(
        ["denoise", "in.nrrd", "out.nrrd", "--untrained", "tiny", "--device", "cpu", "--overlap", "0.25"]
        + ["--batch-size", "2", "--seed", str(parameters.seed)]
    )
    from_cli = cli._engine(arguments)
    for field_name in ("device", "overlap", "batch_size", "blend", "precision", "memory_format", "compile", "name"):
        assert getattr(from_panel, field_name) == getattr(from_cli, field_name), field_name
    for first, second in zip(from_panel.model.state_dict().values(), from_cli.model.state_dict().values()):
        assert torch.equal(first, second)


def test_the_fast_preview_reaches_both_ways_of_running(scene, ct_node, tmp_path):
    from MedDiffFMLib.job import Job, run_job

    logic = TaskLogic(scene)
    parameters = TaskParameters("denoise", volume=ct_node, untrained="tiny", device="cpu", preview=True)
    options = logic.engine_options(parameters)
    assert parameters.run_settings()["steps"] == 4 and options.overlap == 0.25
    # Without a named model the task picks the preview's (weights.recommended); a named one stays.
    assert options.task_key is None
    unnamed = logic.engine_options(dataclasses.replace(parameters, untrained=None))
    assert unnamed.preview and unnamed.task_key == "denoise"
    assert TaskParameters("denoise", settings={"steps": 6}, preview=True).run_settings()["steps"] == 6
    seen = []

    class Stop(Exception):
        pass

    def factory(options):
        seen.append(options)
        raise Stop

    job = ChildJob(temp_parent=tmp_path)
    try:
        job_file, _ = logic.write_job(parameters, logic.prepare(parameters), job)
        read = Job.read(job_file)
        for job_read in (read, dataclasses.replace(read, engine=dataclasses.replace(read.engine, untrained=None))):
            with pytest.raises(Stop):
                run_job(job_read, factory)
    finally:
        job.cleanup()
    assert read.preview and read.engine.overlap == 0.25
    assert seen[0].task_key is None and (seen[1].task_key, seen[1].preview) == ("denoise", True)


def test_a_controlnet_chosen_for_another_task_does_not_change_the_model_picked(scene, ct_node):
    logic = TaskLogic(scene)
    left_over = TaskParameters("denoise", volume=ct_node, controlnet="meddiff-fm-demo-sr@0.1", preview=True)
    options = logic.engine_options(left_over)
    assert options.controlnet is None and (options.task_key, options.preview) == ("denoise", True)
    wanted = logic.engine_options(dataclasses.replace(left_over, task="super_resolve"))
    assert wanted.controlnet == "meddiff-fm-demo-sr@0.1" and wanted.controlnet_task == "controlnet-sr"


def test_compiling_the_network_reaches_both_ways_of_running(scene, ct_node, tmp_path):
    from MedDiffFMLib.job import Job

    logic = TaskLogic(scene)
    parameters = TaskParameters("denoise", volume=ct_node, untrained="tiny", device="cpu", compile=True)
    assert logic.engine(parameters).compile
    assert not logic.engine(TaskParameters("denoise", volume=ct_node, untrained="tiny", device="cpu")).compile

    def finish_at_once(arguments, environment):
        return subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE, text=True)

    for compile_network in (True, False):
        parameters.compile = compile_network
        running = logic.start(parameters, launcher=finish_at_once, temp_parent=tmp_path)
        assert Job.read(running.job.path("job.json")).engine.compile == compile_network
        running.job.wait(timeout=60)
        running.job.cleanup()
