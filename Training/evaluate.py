"""The paper's evaluation metrics, where they make sense offline (issue 5, paper Section 4.2).

Usable as a library and as a command line (``python -m Training.evaluate --help``).

Conventions
-----------
* Volumes are numpy arrays indexed ``[z, y, x]`` (axial slices first), as
  :class:`MedDiffFMLib.volume.Volume` stores them. Compared arrays must have the same shape.
* Intensity metrics (PSNR, SSIM, MS-SSIM) take an explicit ``window = (low, high)`` in the data's
  units: HU (for example ``(-160, 240)``, the window of the paper's denoising results) or the model's
  scale (``(-1, 1)``). A :class:`MedDiffFMLib.preprocessing.Window` (level, width) is accepted too.
  Both images are clipped to the window; the data range (PSNR peak, SSIM constants) is ``high - low``.
* Masks are boolean arrays on the same grid (any non-zero value counts as inside).
* Anomaly maps: higher means more anomalous. MedDiff-FM's maps are signed HU differences, so score
  ``abs(map)`` (the command line does, unless told ``--signed``).

Which SSIM is which
-------------------
* ``ssim(..., per_slice=False)``: 3D SSIM, an 11 x 11 x 11 Gaussian window (sigma 1.5 voxels),
  Wang et al. 2004 constants ``K1 = 0.01, K2 = 0.03``, population (co)variances, averaged over the
  voxels at least 5 voxels from every face (where the window fits). Needs at least 11 slices.
* ``ssim(..., per_slice=True)``: the same 2D SSIM on every axial slice, averaged over slices: what
  most CT denoising and super-resolution papers (and the paper's tables) report.

Both scale the windowed images to ``[0, 1]`` first, so they equal
``skimage.metrics.structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`` on the windowed, scaled images (3D, or per slice and averaged).
Which of the two a number is must always be said next to it: 2D and 3D SSIM differ.

Where the numbers come from
---------------------------
MS-SSIM, AUROC and the Frechet distance (FID) are MONAI's (``MultiScaleSSIMMetric``,
``compute_roc_auc``, ``get_fid_score``); the tests check them on known cases. Written here: SSIM,
because it takes a mask and MONAI's ``SSIMMetric`` does not (without a mask the two agree, tested);
PRO, which neither MONAI nor scikit-image provides; and MMD, because MONAI's ``MMDMetric`` is the
biased linear-kernel statistic of image batches, not the unbiased Gaussian-kernel MMD of feature sets
the paper's distribution comparison uses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from itertools import repeat
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.integrate import trapezoid
from scipy.spatial.distance import cdist

from MedDiffFMLib.anatomy import CLASS_NAMES, label_of
from MedDiffFMLib.errors import InputError, MedDiffFMError, WeightsError
from MedDiffFMLib.metrics import WindowLike, checked_mask, psnr, scaled_pair, window_bounds
from MedDiffFMLib.preprocessing import REGIONS
from MedDiffFMLib.volume import Volume, read_volume

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
"""Gaussian window of SSIM: sigma 1.5 voxels truncated at 5 voxels (11 taps), as Wang et al. 2004."""
SSIM_K1, SSIM_K2 = 0.01, 0.03

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Weights of the 5 scales of MS-SSIM (Wang, Simoncelli and Bovik 2003)."""

PRO_MAX_FPR = 0.3
"""Integration limit of the PRO curve (MVTec AD, BMAD)."""

PAPER_ORGANS: dict[str, dict[str, tuple[str, ...]]] = {
    "head_neck": {"brain": ("brain",), "skull": ("skull",)},
    "chest": {
        "lung": (
            "lung_upper_lobe_left",
            "lung_lower_lobe_left",
            "lung_upper_lobe_right",
            "lung_middle_lobe_right",
            "lung_lower_lobe_right",
        ),
        "heart": ("heart",),
        "aorta": ("aorta",),
    },
    "abdomen": {
        "spleen": ("spleen",),
        "kidney": ("kidney_right", "kidney_left"),
        "gallbladder": ("gallbladder",),
        "liver": ("liver",),
        "stomach": ("stomach",),
        "pancreas": ("pancreas",),
        "small_bowel": ("small_bowel",),
        "duodenum": ("duodenum",),
        "colon": ("colon",),
    },
}
"""The major organs whose Dice the paper reports per region (TotalSegmentator v2 class names).
The paper names "lung" and "kidney": here the five lobes and both kidneys are merged."""

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


# ----------------------------------------------------------------------------- intensity metrics


def ssim_map(reference: np.ndarray, test: np.ndarray, window: WindowLike, per_slice: bool = False) -> np.ndarray:
    """Local SSIM of every voxel (Gaussian window, Wang et al. 2004), on images scaled to ``[0, 1]``.

    ``per_slice`` filters within axial slices only (2D SSIM). Values within 5 voxels of a filtered
    face are affected by the border (reflection); :func:`ssim` leaves them out.
    """
    x, y = scaled_pair(reference, test, window)
    sigma = (0.0, SSIM_SIGMA, SSIM_SIGMA) if per_slice else SSIM_SIGMA
    truncate = SSIM_RADIUS / SSIM_SIGMA

    def blur(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(image, sigma, mode="reflect", truncate=truncate)

    mean_x, mean_y = blur(x), blur(y)
    var_x = blur(x * x) - mean_x**2
    var_y = blur(y * y) - mean_y**2
    cov_xy = blur(x * y) - mean_x * mean_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    return (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))


def ssim(
    reference: np.ndarray,
    test: np.ndarray,
    window: WindowLike,
    mask: np.ndarray | None = None,
    per_slice: bool = False,
) -> float:
    """Mean SSIM of ``test`` against ``reference`` (3D, or 2D per axial slice: see the module docstring).

    The mean is over the voxels where the 11-voxel window fits inside the image (5 voxels from
    every filtered face) and, when given, inside ``mask``. Without a mask the per-slice variant is
    exactly the average of the slices' 2D SSIMs. Identical images give 1.
    """
    filtered = np.shape(reference)[int(per_slice) :]
    if len(np.shape(reference)) != 3 or any(n <= 2 * SSIM_RADIUS for n in filtered):
        raise InputError(
            f"SSIM needs 3D images with at least {2 * SSIM_RADIUS + 1} voxels along each filtered axis; "
            f"got {np.shape(reference)}. For a thin volume use the per-slice (2D) SSIM."
        )
    values = ssim_map(reference, test, window, per_slice)
    mask = checked_mask(mask, values.shape)
    inner = tuple(slice(None) if axis < int(per_slice) else slice(SSIM_RADIUS, -SSIM_RADIUS) for axis in range(3))
    selected = mask[inner]
    if not selected.any():
        raise InputError("The mask lies entirely within 5 voxels of the border, where SSIM is not defined.")
    return float(values[inner][selected].mean())


def ms_ssim(
    reference: np.ndarray,
    test: np.ndarray,
    window: WindowLike,
    per_slice: bool = True,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
) -> float:
    """Multi-scale SSIM (Wang et al. 2003) through MONAI's ``MultiScaleSSIMMetric``.

    Images are windowed and scaled to ``[0, 1]`` (data range 1). MONAI's conventions, checked
    against this module's SSIM in the tests: 11-tap Gaussian window, sigma 1.5, K1 = 0.01,
    K2 = 0.03, only voxels where the window fits, 2x average pooling between scales, contrast-
    structure terms at every scale and the full SSIM at the coarsest, negative terms clamped to 0.
    ``per_slice`` (default) averages 2D MS-SSIM over axial slices; otherwise 3D. With the five
    standard weights every filtered axis needs at least 176 voxels; give fewer ``weights`` (scales)
    for smaller images. No mask: MS-SSIM is defined on whole images.
    """
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    x, y = scaled_pair(reference, test, window)
    if per_slice:
        x, y = x[:, None], y[:, None]
    else:
        x, y = x[None, None], y[None, None]
    metric = MultiScaleSSIMMetric(spatial_dims=x.ndim - 2, data_range=1.0, weights=tuple(weights), reduction="mean")
    try:
        values = metric(torch.from_numpy(y), torch.from_numpy(x))
    except ValueError as error:
        advice = "fewer scales (weights)" if per_slice else "fewer scales (weights) or the per-slice variant"
        raise InputError(
            f"MS-SSIM with {len(weights)} scales does not fit images of shape {np.shape(reference)} "
            f"(MONAI: {error}). Use {advice}."
        ) from None
    return float(values.mean())


# ------------------------------------------------------------------------------ anomaly detection


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (MONAI's ``compute_roc_auc``): the probability that a random positive
    scores above a random negative, ties counting one half."""
    import torch
    from monai.metrics import compute_roc_auc

    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(labels).ravel() != 0
    if scores.shape != positive.shape:
        raise InputError(f"{scores.size} scores but {positive.size} labels.")
    if not np.isfinite(scores).all():
        raise InputError("The scores contain NaN or infinite values.")
    if positive.all() or not positive.any():
        raise InputError("AUROC needs both positive and negative samples; only one class is present.")
    return float(compute_roc_auc(torch.from_numpy(scores), torch.from_numpy(positive.astype(np.float64))))


def pixel_auroc(anomaly_map: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Voxel-level AUROC of ``anomaly_map`` against the ground-truth anomaly mask ``truth``,
    over all voxels or those in ``mask`` (for example the inspected organ)."""
    anomaly_map, truth = np.asarray(anomaly_map), np.asarray(truth)
    mask = checked_mask(mask, truth.shape)
    if anomaly_map.shape != truth.shape:
        raise InputError(f"The anomaly map's shape {anomaly_map.shape} differs from the truth's {truth.shape}.")
    return auroc(anomaly_map[mask], truth[mask])


def image_auroc(
    anomaly_maps: Iterable[np.ndarray],
    truths: Iterable[np.ndarray],
    masks: Iterable[np.ndarray] | None = None,
) -> float:
    """Image-level AUROC: each image's score is the maximum of its map (inside its mask), its label
    whether its truth has any anomalous voxel (inside its mask).

    Images are the items of ``anomaly_maps`` and ``truths``: a list of volumes, or the axial
    slices of one pseudo-3D stack (iterate a ``[z, y, x]`` array), as in the paper's BMAD liver
    evaluation. Images whose mask is empty are skipped.
    """
    scores, labels = [], []
    for anomaly_map, truth, mask in zip(anomaly_maps, truths, repeat(None) if masks is None else masks):
        mask = np.ones(np.shape(truth), dtype=bool) if mask is None else np.asarray(mask) != 0
        if mask.any():
            scores.append(float(np.max(np.asarray(anomaly_map)[mask])))
            labels.append(bool(np.any(np.asarray(truth)[mask])))
    return auroc(np.array(scores), np.array(labels))


def _components(truth: np.ndarray, per_slice: bool) -> tuple[np.ndarray, int]:
    """Connected components of ``truth`` (full connectivity), numbered 1..n across the volume."""
    if not per_slice:
        return ndimage.label(truth, structure=np.ones((3,) * truth.ndim))
    components = np.zeros(truth.shape, dtype=np.int64)
    count = 0
    for index, plane in enumerate(truth):
        labelled, found = ndimage.label(plane, structure=np.ones((3,) * plane.ndim))
        components[index] = np.where(labelled > 0, labelled + count, 0)
        count += found
    return components, count


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under the piecewise-linear curve ``y(x)`` (``x`` non-decreasing from 0) from 0 to ``limit``."""
    inside = int(np.searchsorted(x, limit, side="right"))
    area = float(trapezoid(y[:inside], x[:inside]))
    if inside < x.size and x[inside - 1] < limit:
        fraction = (limit - x[inside - 1]) / (x[inside] - x[inside - 1])
        y_limit = y[inside - 1] + fraction * (y[inside] - y[inside - 1])
        area += (limit - x[inside - 1]) * (y[inside - 1] + y_limit) / 2
    return area


def pro(
    anomaly_map: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None = None,
    max_fpr: float = PRO_MAX_FPR,
    per_slice: bool = False,
) -> float:
    """Normalised area under the per-region-overlap curve up to ``max_fpr`` (MVTec AD, BMAD).

    At a threshold, PRO is the mean over ground-truth connected components (full connectivity;
    2D per axial slice when ``per_slice``, as for stacked 2D slices) of the fraction of each
    component above the threshold; the false-positive rate is the fraction of normal voxels above
    it. The curve is exact at every distinct score (no threshold sampling; tied scores form one
    step, joined linearly), integrated over FPR from 0 to ``max_fpr`` (trapezoids, interpolated
    at the limit) and divided by ``max_fpr``: 1 is perfect. BMAD's sampled variant (200 thresholds,
    normalised by the largest FPR reached below 0.3) approximates the same number.
    """
    anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
    truth = np.asarray(truth) != 0
    if anomaly_map.shape != truth.shape:
        raise InputError(f"The anomaly map's shape {anomaly_map.shape} differs from the truth's {truth.shape}.")
    if not 0.0 < max_fpr <= 1.0:
        raise InputError(f"max_fpr must lie in (0, 1], got {max_fpr}.")
    mask = checked_mask(mask, truth.shape)
    components, count = _components(truth & mask, per_slice)
    normal = ~truth[mask]
    if count == 0 or not normal.any():
        raise InputError("PRO needs at least one anomalous region and one normal voxel.")
    labels = components[mask]
    sizes = np.bincount(labels, minlength=count + 1).astype(np.float64)
    sizes[0] = np.inf
    overlap_step = 1.0 / (count * sizes[labels])
    fpr_step = normal / normal.sum()
    scores = anomaly_map[mask]
    order = np.argsort(-scores, kind="stable")
    ends = np.append(scores[order][1:] != scores[order][:-1], True)
    fpr = np.concatenate([[0.0], np.cumsum(fpr_step[order])[ends]])
    overlap = np.concatenate([[0.0], np.cumsum(overlap_step[order])[ends]])
    return _area_up_to(fpr, overlap, max_fpr) / max_fpr


# ------------------------------------------------------------------------------------------ Dice


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2 |A n B| / (|A| + |B|)`` of two binary masks (non-zero = inside).
    NaN when both are empty (undefined)."""
    prediction, truth = np.asarray(prediction) != 0, np.asarray(truth) != 0
    if prediction.shape != truth.shape:
        raise InputError(f"The masks differ in shape: {prediction.shape} vs {truth.shape}.")
    total = int(prediction.sum()) + int(truth.sum())
    return math.nan if total == 0 else 2.0 * int(np.sum(prediction & truth)) / total


def label_dice(labels: np.ndarray, reference: np.ndarray, values: Iterable[int] | None = None) -> dict[int, float]:
    """Dice of every label value of two integer label maps (``values``, default every non-zero
    value present in either map). A value absent from both maps gets NaN."""
    labels, reference = np.asarray(labels), np.asarray(reference)
    if labels.shape != reference.shape:
        raise InputError(f"The label maps differ in shape: {labels.shape} vs {reference.shape}.")
    if labels.size and min(labels.min(), reference.min()) < 0:
        raise InputError("Label values must be non-negative integers.")
    labels, reference = labels.astype(np.int64).ravel(), reference.astype(np.int64).ravel()
    size = int(max(labels.max(initial=0), reference.max(initial=0))) + 1
    in_labels = np.bincount(labels, minlength=size)
    in_reference = np.bincount(reference, minlength=size)
    in_both = np.bincount(labels[labels == reference], minlength=size)
    if values is None:
        values = [int(value) for value in np.flatnonzero(in_labels + in_reference) if value != 0]
    result = {}
    for value in values:
        total = int(in_labels[value] + in_reference[value]) if 0 <= value < size else 0
        result[int(value)] = math.nan if total == 0 else 2.0 * int(in_both[value]) / total
    return result


def organ_dice(labels: np.ndarray, reference: np.ndarray, region: str) -> dict[str, float]:
    """Dice of the paper's major organs of ``region`` (:data:`PAPER_ORGANS`) between two
    TotalSegmentator v2 label maps, for example TotalSegmentator run on a synthetic CT against the
    anatomy condition it was generated from. This module never runs TotalSegmentator."""
    if region not in PAPER_ORGANS:
        raise InputError(f"Unknown region '{region}'. Choose one of: {', '.join(PAPER_ORGANS)}.")
    labels, reference = np.asarray(labels), np.asarray(reference)
    result = {}
    for organ, names in PAPER_ORGANS[region].items():
        values = [label_of(name) for name in names]
        result[organ] = dice(np.isin(labels, values), np.isin(reference, values))
    return result


# ------------------------------------------------------------------------------------ FID and MMD


def _features(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise InputError(f"{name} must be a (samples, features) matrix with at least 2 samples, got {features.shape}.")
    if not np.isfinite(features).all():
        raise InputError(f"{name} contains NaN or infinite values.")
    return features


def _feature_pair(features_a: np.ndarray, features_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"The feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}.")
    return a, b


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between two Gaussians,
    ``|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` (MONAI's ``compute_frechet_distance``;
    rounding below 0 is returned as 0)."""
    import torch
    from monai.metrics.fid import compute_frechet_distance

    def tensor(value: np.ndarray, dimensions: int) -> torch.Tensor:
        array = np.atleast_1d(value) if dimensions == 1 else np.atleast_2d(value)
        return torch.from_numpy(array.astype(np.float64))

    distance = compute_frechet_distance(tensor(mean_a, 1), tensor(cov_a, 2), tensor(mean_b, 1), tensor(cov_b, 2))
    return max(float(distance), 0.0)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(samples, features)``
    (sample means, unbiased covariances; MONAI's ``get_fid_score``): FID when the features come
    from an image network."""
    import torch
    from monai.metrics.fid import get_fid_score

    a, b = _feature_pair(features_a, features_b)
    return max(float(get_fid_score(torch.from_numpy(a), torch.from_numpy(b))), 0.0)


def median_bandwidth(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Median heuristic: the median Euclidean distance between distinct samples of both sets (1 if 0)."""
    pooled = np.vstack(_feature_pair(features_a, features_b))
    distances = cdist(pooled, pooled)[np.triu_indices(len(pooled), k=1)]
    return float(np.median(distances)) or 1.0


def mmd(features_a: np.ndarray, features_b: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy (Gretton et al. 2012) between two
    feature sets with the Gaussian kernel ``exp(-|x - y|^2 / (2 bandwidth^2))``.

    ``bandwidth`` defaults to :func:`median_bandwidth`. Being unbiased, the estimate is near 0 (and
    can be slightly negative) for two samples of the same distribution.
    """
    a, b = _feature_pair(features_a, features_b)
    bandwidth = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    if not bandwidth > 0:
        raise InputError(f"The kernel bandwidth must be positive, got {bandwidth}.")

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.exp(-cdist(x, y, "sqeuclidean") / (2.0 * bandwidth**2))

    m, n = len(a), len(b)
    within_a = (kernel(a, a).sum() - m) / (m * (m - 1))
    within_b = (kernel(b, b).sum() - n) / (n * (n - 1))
    return float(within_a + within_b - 2.0 * kernel(a, b).mean())


def load_feature_extractor(weights: str | Path | None, depth: int = 10):
    """MedicalNet's 3D ResNet (the paper's FID/MMD feature extractor) built with MONAI, loaded from
    a local weights file (``.pth``/``.pt`` state dict, read without executing code, or
    ``.safetensors``). Keys may carry DataParallel's ``module.`` prefix; the segmentation head is
    ignored. We never download weights: without a file this is a :class:`WeightsError`.
    """
    import torch
    from monai.networks.nets import resnet

    if weights is None:
        raise WeightsError(
            "FID and MMD of images need a feature extractor's weights, and MedDiffFM never downloads any. "
            "Give a MedicalNet 3D ResNet weights file (.pth or .safetensors; the paper uses MedicalNet), "
            "or compute features elsewhere and pass them as .npy matrices."
        )
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"Feature-extractor weights '{path}' do not exist. Check the path.")
    builders = {10: resnet.resnet10, 18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50}
    if depth not in builders:
        raise InputError(f"Supported MedicalNet depths are {sorted(builders)}, got {depth}.")
    bias_downsample, shortcut_type = resnet.get_medicalnet_pretrained_resnet_args(depth)
    model = builders[depth](
        spatial_dims=3,
        n_input_channels=1,
        feed_forward=False,
        shortcut_type=shortcut_type,
        bias_downsample=bias_downsample,
    )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise WeightsError(
            f"'{path}' is not a MedicalNet ResNet-{depth}: {len(missing)} weights missing (e.g. {missing[0]})."
        )
    model.load_state_dict({key: state[key] for key in expected})
    return model.eval()


def volume_features(extractor, volumes: Iterable[np.ndarray]) -> np.ndarray:
    """One feature vector per volume ``[z, y, x]`` (``(volumes, channels)`` float64): each volume is
    standardised to zero mean and unit variance, as MedicalNet's inputs, then globally pooled."""
    import torch

    rows = []
    with torch.no_grad():
        for volume in volumes:
            array = np.asarray(volume, dtype=np.float32)
            array = (array - array.mean()) / (array.std() or 1.0)
            rows.append(extractor(torch.from_numpy(array)[None, None]).reshape(-1).double().numpy())
    return np.stack(rows)


# ------------------------------------------------------------------------------------ command line


def _read_on(path: str, grid: Volume, what: str) -> np.ndarray:
    """The array of the volume at ``path``, which must lie on ``grid``'s voxel grid."""
    volume = read_volume(path)
    if not volume.geometry.same_grid(grid.geometry):
        raise InputError(
            f"The {what} '{path}' is not on the grid of '{grid.metadata.get('source')}' "
            f"(shape {volume.array.shape} vs {grid.array.shape}, or different spacing/origin/direction)."
        )
    return volume.array


def _attempt(results: dict[str, float | str], name: str, compute) -> None:
    """Store ``compute()`` under ``name``, or the reason it is not applicable."""
    try:
        results[name] = compute()
    except InputError as error:
        results[name] = f"n/a: {error}"


def run_compare(args: argparse.Namespace) -> dict[str, float | str]:
    reference = read_volume(args.reference)
    output = _read_on(args.output, reference, "output")
    window = REGIONS[args.region] if args.region else tuple(args.window)
    mask = _read_on(args.mask, reference, "mask") != 0 if args.mask else None
    low, high = window_bounds(window)
    results: dict[str, float | str] = {"window (HU)": f"[{low:g}, {high:g}]"}
    _attempt(results, "PSNR (dB)", lambda: psnr(reference.array, output, window, mask))
    _attempt(results, "SSIM 3D", lambda: ssim(reference.array, output, window, mask))
    _attempt(results, "SSIM 2D (slice mean)", lambda: ssim(reference.array, output, window, mask, per_slice=True))
    if mask is None:
        _attempt(results, "MS-SSIM 2D (slice mean)", lambda: ms_ssim(reference.array, output, window))
        _attempt(results, "MS-SSIM 3D", lambda: ms_ssim(reference.array, output, window, per_slice=False))
    return results


def run_anomaly(args: argparse.Namespace) -> dict[str, float | str]:
    truth_volume = read_volume(args.truth)
    truth = truth_volume.array != 0
    anomaly_map = _read_on(args.map, truth_volume, "anomaly map").astype(np.float64)
    scores = anomaly_map if args.signed else np.abs(anomaly_map)
    organ = _read_on(args.organ_mask, truth_volume, "organ mask") != 0 if args.organ_mask else None
    results: dict[str, float | str] = {}
    _attempt(results, "image AUROC (per slice)", lambda: image_auroc(scores, truth, organ))
    _attempt(results, "pixel AUROC", lambda: pixel_auroc(scores, truth, organ))
    _attempt(results, "PRO (FPR <= 0.3)", lambda: pro(scores, truth, organ, per_slice=args.per_slice))
    if args.prediction:
        prediction = _read_on(args.prediction, truth_volume, "prediction") != 0
    elif args.threshold is not None:
        prediction = scores > args.threshold
    else:
        results["Dice"] = "n/a: give --prediction or --threshold"
        return results
    if organ is not None:
        prediction, truth = prediction & organ, truth & organ
    results["Dice"] = dice(prediction, truth)
    return results


def run_anatomy(args: argparse.Namespace) -> dict[str, float | str]:
    reference = read_volume(args.reference)
    labels = _read_on(args.labels, reference, "label map")
    if args.region:
        scores: dict = organ_dice(labels, reference.array, args.region)
    else:
        scores = {_label_name(value): score for value, score in label_dice(labels, reference.array).items()}
    defined = [score for score in scores.values() if not math.isnan(score)]
    return {**{f"Dice {name}": score for name, score in scores.items()}, "Dice mean": _mean_or_nan(defined)}


def _label_name(value: int) -> str:
    return f"{value} {CLASS_NAMES[value]}" if value < len(CLASS_NAMES) else str(value)


def _mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _volume_files(source: str) -> list[Path] | None:
    """The volume files of a folder, or None when ``source`` is a ``.npy`` feature matrix."""
    path = Path(source)
    if path.suffix == ".npy":
        if not path.is_file():
            raise InputError(f"'{path}' does not exist.")
        return None
    if not path.is_dir():
        raise InputError(f"'{path}' is neither a .npy feature matrix nor a folder of volumes.")
    files = sorted(p for p in path.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES))
    if not files:
        raise InputError(f"No volume files ({', '.join(VOLUME_SUFFIXES)}) in '{path}'.")
    return files


def run_distribution(args: argparse.Namespace) -> dict[str, float | str]:
    sources = [args.set_a, args.set_b]
    files = [_volume_files(source) for source in sources]
    extractor = None
    if any(f is not None for f in files):
        extractor = load_feature_extractor(args.weights, args.depth)
    a, b = (
        np.load(source, allow_pickle=False)
        if found is None
        else volume_features(extractor, (read_volume(f).array for f in found))
        for source, found in zip(sources, files)
    )
    return {"samples": f"{len(a)} vs {len(b)}", "FID": fid(a, b), "MMD^2 (unbiased, RBF median)": mmd(a, b)}


def _json_value(value: float | str) -> float | str | None:
    """Strict JSON has no NaN or infinity: NaN becomes null, infinities the strings "inf"/"-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def format_table(results: dict[str, float | str]) -> str:
    """Two aligned columns: metric name and value (4 decimals; text as is)."""
    width = max(len(name) for name in results)
    lines = []
    for name, value in results.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m Training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("compare", help="PSNR / SSIM / MS-SSIM of an output volume against a reference")
    p.add_argument("output", help="volume to score (NIfTI/NRRD/MHA/DICOM folder)")
    p.add_argument("reference", help="reference volume on the same grid")
    windows = p.add_mutually_exclusive_group()
    windows.add_argument(
        "--window", nargs=2, type=float, metavar=("LOW", "HIGH"), default=(-160.0, 240.0), help="HU window"
    )
    windows.add_argument("--region", choices=tuple(REGIONS), help="use the region's model window")
    p.add_argument("--mask", help="score only voxels inside this mask (no MS-SSIM then)")

    p = commands.add_parser("anomaly", help="image/pixel AUROC, PRO and Dice of an anomaly map")
    p.add_argument("map", help="anomaly map (higher |value| = more anomalous)")
    p.add_argument("truth", help="ground-truth anomaly mask")
    p.add_argument("--organ-mask", help="evaluate inside this mask only (for example the liver)")
    p.add_argument("--signed", action="store_true", help="score the map's values, not their magnitude")
    p.add_argument("--per-slice", action="store_true", help="PRO regions per axial slice (stacked 2D images)")
    dice_source = p.add_mutually_exclusive_group()
    dice_source.add_argument("--prediction", help="binary anomaly mask for the Dice score")
    dice_source.add_argument("--threshold", type=float, help="Dice of |map| > THRESHOLD")

    p = commands.add_parser("anatomy", help="Dice of two label maps (TotalSegmentator v2 values)")
    p.add_argument("labels", help="label map to score (for example TotalSegmentator on a synthetic CT)")
    p.add_argument("reference", help="reference label map (for example the anatomy condition)")
    p.add_argument("--region", choices=tuple(PAPER_ORGANS), help="the paper's major organs of this region")

    p = commands.add_parser("distribution", help="FID and MMD between two sets")
    p.add_argument("set_a", help=".npy (samples x features) matrix or a folder of volumes")
    p.add_argument("set_b", help=".npy (samples x features) matrix or a folder of volumes")
    p.add_argument("--weights", help="MedicalNet 3D ResNet weights (needed for folders of volumes)")
    p.add_argument("--depth", type=int, default=10, help="MedicalNet ResNet depth (default 10)")
    return parser


COMMANDS = {"compare": run_compare, "anomaly": run_anomaly, "anatomy": run_anatomy, "distribution": run_distribution}


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the metrics and returns the exit code (2 on a usage or input error)."""
    args = build_parser().parse_args(argv)
    try:
        results = COMMANDS[args.command](args)
    except MedDiffFMError as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({name: _json_value(value) for name, value in results.items()}))
    else:
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
