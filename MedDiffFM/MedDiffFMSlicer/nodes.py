"""Exact conversions between MRML nodes and :class:`MedDiffFMLib.volume.Volume`.

Slicer describes a volume node by its voxel array ``[k, j, i]`` and a 4x4 IJK-to-RAS matrix; the
library by the same array plus spacing, origin and direction in LPS (ITK conventions). Both describe
the same voxel-to-physical mapping, so the conversion is lossless:

``index_to_LPS = diag(-1, -1, 1, 1) @ IJK-to-RAS`` (the RAS <-> LPS flip is its own inverse).

Left-handed IJK-to-RAS matrices (a flipped K axis, common after DICOM import) are kept as they are:
the array is never reordered and the physical position of every voxel is unchanged. Slicer's own file
readers reorder such volumes (they flip K so that the matrix becomes right-handed); results therefore
travel back from the child process through :func:`MedDiffFMLib.volume.read_volume`, not through a
Slicer storage node, and land on exactly the input's matrix.

Only MRML and numpy are used here (no Qt), so this module runs in the Slicer application and
headlessly with the ``slicer-core`` package.
"""

from __future__ import annotations

import logging

import numpy as np
import slicer
import vtk

from MedDiffFMLib.anatomy import BODY_LABEL, CLASS_NAMES, TOTALSEGMENTATOR_CLASSES, body_mask
from MedDiffFMLib.class_names import class_name_for
from MedDiffFMLib.errors import InputError, MaskError
from MedDiffFMLib.preprocessing import labels_on_grid
from MedDiffFMLib.volume import Volume

logger = logging.getLogger(__name__)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Flips the first two axes; maps RAS to LPS and LPS to RAS."""

METADATA_ATTRIBUTE_PREFIX = "MedDiffFM."


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def ijk_to_ras(node) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a volume node."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _matrix_to_numpy(matrix)


def ijk_to_ras_of(volume: Volume) -> np.ndarray:
    """The IJK-to-RAS matrix that places ``volume``'s voxels where its LPS geometry says."""
    return LPS_FROM_RAS @ volume.geometry.index_to_physical()


def volume_from_node(node, dtype=None) -> Volume:
    """A :class:`Volume` holding a copy of ``node``'s voxels with the identical voxel-to-physical mapping.

    Coordinates are the node's own (local) coordinates; a parent transform is not applied (outputs are
    placed under the same transform, see :func:`place_next_to`).
    """
    if node is None or node.GetImageData() is None:
        raise InputError("The volume is empty (no image data). Load or select a volume first.")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"'{node.GetName()}' has {node.GetImageData().GetNumberOfScalarComponents()} components per voxel "
            "(a colour or vector volume). MedDiffFM needs a single-channel CT in HU."
        )
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    if dtype is not None:
        array = array.astype(dtype)
    if array.ndim != 3:
        raise InputError(f"'{node.GetName()}' is not a 3D volume (array shape {array.shape}).")
    index_to_lps = LPS_FROM_RAS @ ijk_to_ras(node)
    axes = index_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if not (spacing > 0).all():
        raise InputError(f"'{node.GetName()}' has a zero voxel spacing; its geometry is invalid.")
    direction = axes / spacing
    return Volume(
        array,
        tuple(spacing),
        tuple(index_to_lps[:3, 3]),
        tuple(direction.ravel()),
        {"name": node.GetName() or ""},
    )


def update_node_from_volume(node, volume: Volume) -> None:
    """Put ``volume``'s voxels and exact geometry into an existing volume node."""
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
    node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras_of(volume)))
    for key, value in volume.metadata.items():
        if key.startswith("MedDiffFM_"):
            node.SetAttribute(METADATA_ATTRIBUTE_PREFIX + key[len("MedDiffFM_") :], str(value))
    node.Modified()


def node_from_volume(volume: Volume, name: str, node_class: str = "vtkMRMLScalarVolumeNode", scene=None):
    """A new volume node in the scene holding ``volume`` (voxels, geometry, MedDiffFM metadata as attributes)."""
    scene = scene or slicer.mrmlScene
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    update_node_from_volume(node, volume)
    node.CreateDefaultDisplayNodes()
    return node


def place_next_to(node, reference) -> None:
    """Put ``node`` beside ``reference``: same subject hierarchy folder/study and same parent transform."""
    if reference is None:
        return
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference)
    if not reference_item:
        return
    parent = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # the application adds items for new nodes; without it (scripts, slicer-core) we add one
        hierarchy.CreateItem(parent, node)


def _check_same_transform(node, reference, what: str) -> None:
    if reference is not None and node.GetTransformNodeID() != reference.GetTransformNodeID():
        raise InputError(
            f"The {what} '{node.GetName()}' and the volume '{reference.GetName()}' are under different transforms. "
            "Harden the transforms (Data module, right-click > Harden transform) and try again."
        )


# --------------------------------------------------------------------------------------------------
# Segments and masks
# --------------------------------------------------------------------------------------------------


def segment_ids(segmentation_node) -> list[str]:
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(index) for index in range(ids.GetNumberOfValues())]


def mask_from_segment(segmentation_node, segment_id: str, reference_node) -> Volume:
    """The segment as a uint8 mask (0/1) on the grid of the volume node ``reference_node``.

    Slicer resamples the segment onto the grid (also across different segmentation geometries and
    transforms). An empty result is refused, because every task that takes a mask needs voxels in it.
    """
    if segmentation_node is None or not segment_id:
        raise MaskError("Choose a segment (draw the lesion in the Segment Editor first).")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise MaskError(f"The segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'.")
    array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_node)
    reference = volume_from_node(reference_node)
    mask = (np.asarray(array) > 0).astype(np.uint8)
    if mask.shape != reference.array.shape:
        raise MaskError(f"The segment '{segment.GetName()}' could not be resampled onto '{reference_node.GetName()}'.")
    if not mask.any():
        raise MaskError(
            f"The segment '{segment.GetName()}' has no voxel inside '{reference_node.GetName()}'. Draw it over the "
            "volume in the Segment Editor (or pick another segment)."
        )
    return reference.with_array(mask)


def segmentation_from_masks(
    masks: list[tuple[str, Volume, tuple[float, float, float]]], name: str, reference_node=None, scene=None
):
    """A new segmentation node with one segment per ``(segment name, uint8 mask Volume, colour)``.

    Each mask keeps its exact geometry: it enters Slicer as a temporary label map node built with
    :func:`node_from_volume` and is imported with the Segmentations logic. An empty mask gives an
    empty segment (the result is still shown, with nothing in it).
    """
    scene = scene or slicer.mrmlScene
    segmentations = slicer.modules.segmentations.logic()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    if reference_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    for segment_name, mask, color in masks:
        binary = (np.asarray(mask.array) > 0).astype(np.uint8)
        if not binary.any():
            node.GetSegmentation().AddEmptySegment("", segment_name, color)
            continue
        labelmap = node_from_volume(mask.with_array(binary), segment_name, "vtkMRMLLabelMapVolumeNode", scene)
        try:
            before = set(segment_ids(node))
            if not segmentations.ImportLabelmapToSegmentationNode(labelmap, node):
                raise MaskError(f"Slicer could not import the mask '{segment_name}' into a segmentation.")
            for segment_id in set(segment_ids(node)) - before:
                segment = node.GetSegmentation().GetSegment(segment_id)
                segment.SetName(segment_name)
                segment.SetColor(color)
        finally:
            scene.RemoveNode(labelmap.GetDisplayNode())
            scene.RemoveNode(labelmap)
    return node


# --------------------------------------------------------------------------------------------------
# Anatomy label maps
# --------------------------------------------------------------------------------------------------


def anatomy_segment_classes(segmentation_node) -> tuple[dict[str, str], list[str]]:
    """Segments of a segmentation that name anatomy classes: ``({segment_id: class}, [unmatched names])``."""
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for segment_id in segment_ids(segmentation_node):
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        name = class_name_for(segment_id) or class_name_for(segment.GetName())
        if name is None:
            unmatched.append(segment.GetName())
        else:
            matched[segment_id] = name
    return matched, unmatched


def anatomy_from_node(anatomy_node, reference_node=None, scene=None) -> Volume:
    """An anatomy label map (uint8, MedDiff-FM's 118-class scheme) from a segmentation or label map node.

    * A segmentation node: segments whose ID or name is a TotalSegmentator v2 class (``liver``,
      ``kidney_right``, "Right kidney"...) or ``body`` get that class's label value; others are ignored
      (and logged). Exported onto ``reference_node``'s grid, or onto the segmentation's own reference
      geometry when no reference is given.
    * A label map volume node: its values are taken as TotalSegmentator v2 label values (0..117, 118 body),
      on its own grid.

    When ``reference_node`` (the CT) is given, the label map is brought onto its grid (nearest neighbour) and
    unlabelled voxels inside its body become ``body`` (118).
    """
    scene = scene or slicer.mrmlScene
    if anatomy_node is None:
        raise InputError("Choose an anatomy segmentation (for example from TotalSegmentator).")
    if anatomy_node.IsA("vtkMRMLSegmentationNode"):
        labels = _labels_from_segmentation(anatomy_node, reference_node, scene)
    elif anatomy_node.IsA("vtkMRMLVolumeNode"):
        _check_same_transform(anatomy_node, reference_node, "label map")
        labels = volume_from_node(anatomy_node)
        values = np.asarray(labels.array)
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() > BODY_LABEL:
            raise InputError(
                f"The label map '{anatomy_node.GetName()}' must hold TotalSegmentator v2 label values 0..117 "
                f"(118 = body); it holds {values.min()}..{values.max()}. Use a segmentation node instead: its "
                "segment names are matched to the class names."
            )
        labels = labels.with_array(values.astype(np.uint8))
    else:
        raise InputError(f"'{anatomy_node.GetName()}' is neither a segmentation nor a label map volume.")
    if reference_node is not None:
        reference = volume_from_node(reference_node)
        if not labels.geometry.same_grid(reference.geometry):  # a label map on another grid: nearest neighbour
            labels = labels_on_grid(labels, reference.geometry, f"anatomy label map '{anatomy_node.GetName()}'")
        array = np.array(labels.array, dtype=np.uint8)
        array[(array == 0) & body_mask(np.asarray(reference.array))] = BODY_LABEL
        labels = reference.with_array(array)
    return labels


def _labels_from_segmentation(segmentation_node, reference_node, scene) -> Volume:
    matched, unmatched = anatomy_segment_classes(segmentation_node)
    if not matched:
        raise InputError(
            f"No segment of '{segmentation_node.GetName()}' is named after an anatomical structure MedDiffFM knows. "
            "Use a TotalSegmentator segmentation (task 'total') or name segments with TotalSegmentator v2 class names, "
            f"e.g. {', '.join(TOTALSEGMENTATOR_CLASSES[:5])}."
        )
    if unmatched:
        logger.info("Anatomy: ignoring segments that are not anatomy classes: %s", ", ".join(unmatched))
    ids = vtk.vtkStringArray()
    order = list(matched)
    for segment_id in order:
        ids.InsertNextValue(segment_id)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MedDiffFM temporary anatomy")
    try:
        logic = slicer.modules.segmentations.logic()
        if reference_node is not None:
            ok = logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_node)
        else:
            ok = logic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
            )
        if not ok or labelmap.GetImageData() is None:
            raise InputError(f"Slicer could not export '{segmentation_node.GetName()}' to a label map.")
        exported = volume_from_node(labelmap)
    finally:
        if labelmap.GetDisplayNode() is not None:
            scene.RemoveNode(labelmap.GetDisplayNode())
        scene.RemoveNode(labelmap)
    # The export numbers segments 1..n in the order given; translate to class label values.
    lookup = np.zeros(len(order) + 1, dtype=np.uint8)
    for index, segment_id in enumerate(order, start=1):
        lookup[index] = CLASS_NAMES.index(matched[segment_id])
    values = np.asarray(exported.array).astype(np.int64)
    return exported.with_array(lookup[np.clip(values, 0, len(order))])
