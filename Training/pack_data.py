"""Pack a prepared cache small enough to carry to another machine, and unpack it there without SimpleITK.

A prepared cache (:mod:`Training.prepare_data`) holds each region crop resampled to 1 mm, which is
large: the three offline-installable CT scans take 79 MB of compressed NIfTI at 1 mm, against 20 MB
on their own grids. ``pack`` keeps instead, per case, the source CT on its own grid (only the voxels
its crops need, in its own data type), each crop's anatomy map (uint8, which compresses to almost
nothing) and, per axis, the map from a crop's voxel index ``i`` to the source's continuous index
``offset + scale * i``. ``unpack`` redoes the linear resampling with NumPy, as
:func:`MedDiffFMLib.preprocessing.resample` does it with SimpleITK (a point within half a voxel of
the source takes the linear interpolation of its clamped neighbours, one farther out -1024 HU; HU
rounded to int16), and writes a cache of ``.npy`` files with its ``manifest.json``, which
:mod:`Training.pretrain` reads like any prepared cache (``Training.dataset.read_array``). The
unpacked HU equal the prepared ones to within 1 HU (rounding of float32 ties;
``Testing/test_training.py``).

Usage::

    python -m Training.pack_data pack --data PREPARED --output PACK       # needs SimpleITK
    python -m Training.pack_data unpack --pack PACK --output PREPARED_NPY  # NumPy only

Only pre-training caches (CT and anatomy) are packed; a fine-tuning cache's conditions are not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from MedDiffFMLib.errors import InputError, MedDiffFMError

PACK_MANIFEST = "pack.json"
FILL_HU = -1024.0
"""HU of 1 mm voxels more than half a source voxel beyond the scan (as ``prepare_data`` fills them)."""


def crop_map(crop, source) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)`` per array axis ``(z, y, x)``: the source's continuous voxel index of a
    crop voxel ``i`` is ``offset + scale * i``. Both grids must share their direction cosines, as a
    prepared crop shares its source's (:func:`MedDiffFMLib.preprocessing.isotropic_geometry`)."""
    direction = np.asarray(source.direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction, np.asarray(crop.direction, dtype=np.float64).reshape(3, 3), atol=1e-6):
        raise InputError("A crop and its source CT have different directions; this cache cannot be packed.")
    shift = direction.T @ (np.asarray(crop.origin, np.float64) - np.asarray(source.origin, np.float64))
    offset_xyz = shift / np.asarray(source.spacing, np.float64)
    scale_xyz = np.asarray(crop.spacing, np.float64) / np.asarray(source.spacing, np.float64)
    return scale_xyz[::-1].copy(), offset_xyz[::-1].copy()


def _positions(scale: float, offset: float, count: int) -> np.ndarray:
    return offset + scale * np.arange(count, dtype=np.float64)


def _needed(scale: np.ndarray, offset: np.ndarray, shape: tuple[int, ...], source_shape: tuple[int, ...]) -> list:
    """Per axis, the slice of source voxels that interpolation onto a crop of ``shape`` reads."""
    ranges = []
    for axis in range(3):
        c = _positions(scale[axis], offset[axis], shape[axis])
        n = source_shape[axis]
        low = int(np.clip(np.floor(c.min()), 0, n - 1))
        high = int(np.clip(np.floor(c.max()) + 1, 0, n - 1)) + 1
        ranges.append(slice(low, high))
    return ranges


def resample_linear(
    source: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    shape: tuple[int, int, int],
    full_shape: tuple[int, int, int] | None = None,
    start: tuple[int, int, int] = (0, 0, 0),
    fill: float = FILL_HU,
) -> np.ndarray:
    """Linear resampling of ``source (Z, Y, X)`` onto ``shape``: output voxel ``i`` reads the
    source at the continuous index ``offset + scale * i`` (per axis ``z, y, x``).

    ``source`` may be a part of a larger scan of ``full_shape`` starting at voxel ``start``;
    positions are in the full scan's indices, and a position is inside it from -0.5 to
    ``n - 0.5`` (ITK's rule), where neighbours beyond the scan are clamped to its border; outside it
    the voxel gets ``fill``. Returns float32, as SimpleITK's linear resampler of a float32 image.
    """
    full_shape = tuple(source.shape) if full_shape is None else tuple(full_shape)
    values = source.astype(np.float64)
    inside = []
    for axis in range(3):
        n = full_shape[axis]
        c = _positions(scale[axis], offset[axis], shape[axis])
        base = np.floor(c)
        weight = c - base
        lower = np.clip(base, 0, n - 1).astype(np.int64) - start[axis]
        upper = np.clip(base + 1, 0, n - 1).astype(np.int64) - start[axis]
        if lower.min() < 0 or upper.max() >= values.shape[axis]:
            raise InputError("The packed source does not hold every voxel the crop needs.")
        view = [None, None, None]
        view[axis] = slice(None)
        weight = weight[tuple(view)]
        values = np.take(values, lower, axis=axis) * (1.0 - weight) + np.take(values, upper, axis=axis) * weight
        inside.append(((c >= -0.5) & (c < n - 0.5))[tuple(view)])
    return np.where(inside[0] & inside[1] & inside[2], values, fill).astype(np.float32)


def to_int16_hu(values: np.ndarray) -> np.ndarray:
    """HU as a prepared cache stores them: rounded, clipped to [-1024, 3071], int16."""
    return np.clip(np.round(values), -1024, 3071).astype(np.int16)


def pack(data: Path, output: Path) -> dict:
    """Write ``output/pack.json`` and one ``<case>.npz`` per finished case of the cache ``data``."""
    from MedDiffFMLib.volume import Volume, read_volume

    manifest_path = data / "manifest.json"
    if not manifest_path.exists():
        raise InputError(f"No manifest.json in '{data}'. Run 'python -m Training.prepare_data' first.")
    manifest = json.loads(manifest_path.read_text())
    output.mkdir(parents=True, exist_ok=True)
    packed = {"spacing_mm": manifest["spacing_mm"], "cases": {}}
    for name, case in sorted(manifest["cases"].items()):
        if case["status"] != "done":
            continue
        slices = {tuple(entry.get("source_slices", ())) for entry in case["regions"]}
        if len(slices) != 1 or len(next(iter(slices))) != 2:
            raise InputError(
                f"Case '{name}' of '{data}' does not record the source slices of its crops (prepared by an "
                "older version); prepare it again into a new folder."
            )
        (start, stop), source = next(iter(slices)), read_volume(case["source"])
        source = Volume.on_geometry(
            source.array[start:stop], source.geometry.subgrid((slice(start, stop), slice(None), slice(None)))
        )
        arrays, regions = {}, []
        maps = []
        for index, entry in enumerate(case["regions"]):
            if "condition" in entry:
                raise InputError(f"'{data}' is a fine-tuning cache; only pre-training caches are packed.")
            crop = read_volume(data / entry["image"])
            scale, offset = crop_map(crop.geometry, source.geometry)
            maps.append((scale, offset, crop.array.shape))
            arrays[f"anatomy_{index}"] = read_volume(data / entry["anatomy"]).array.astype(np.uint8)
            regions.append(
                {
                    "region": entry["region"],
                    "labels": entry.get("labels", ""),
                    "shape": list(crop.array.shape),
                    "scale": scale.tolist(),
                    "offset": offset.tolist(),
                }
            )
        needed = [_needed(scale, offset, shape, source.array.shape) for scale, offset, shape in maps]
        box = tuple(slice(min(n[axis].start for n in needed), max(n[axis].stop for n in needed)) for axis in range(3))
        arrays["source"] = source.array[box]
        np.savez_compressed(output / f"{name}.npz", **arrays)
        packed["cases"][name] = {
            "file": f"{name}.npz",
            "source_shape": list(source.array.shape),
            "start": [s.start for s in box],
            "regions": regions,
        }
    if not packed["cases"]:
        raise InputError(f"The cache '{data}' holds no prepared case.")
    (output / PACK_MANIFEST).write_text(json.dumps(packed, indent=2))
    return packed


def unpack(pack_folder: Path, output: Path) -> dict:
    """Resample every packed crop and write a prepared cache of ``.npy`` files; returns its manifest."""
    path = pack_folder / PACK_MANIFEST
    if not path.exists():
        raise InputError(f"No {PACK_MANIFEST} in '{pack_folder}'. Make it with 'python -m Training.pack_data pack'.")
    packed = json.loads(path.read_text())
    output.mkdir(parents=True, exist_ok=True)
    manifest = {"spacing_mm": packed["spacing_mm"], "cases": {}}
    for name, case in packed["cases"].items():
        with np.load(pack_folder / case["file"]) as arrays:
            source = arrays["source"]
            entries = []
            for index, region in enumerate(case["regions"]):
                stem = f"{name}_{region['region']}"
                hu = resample_linear(
                    source,
                    np.asarray(region["scale"]),
                    np.asarray(region["offset"]),
                    tuple(region["shape"]),
                    tuple(case["source_shape"]),
                    tuple(case["start"]),
                )
                np.save(output / f"{stem}_ct.npy", to_int16_hu(hu))
                np.save(output / f"{stem}_anatomy.npy", arrays[f"anatomy_{index}"])
                entries.append(
                    {
                        "region": region["region"],
                        "image": f"{stem}_ct.npy",
                        "anatomy": f"{stem}_anatomy.npy",
                        "shape": region["shape"],
                        "labels": region["labels"],
                    }
                )
        manifest["cases"][name] = {"status": "done", "source": case["file"], "regions": entries}
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="pack a prepared cache (needs SimpleITK)")
    packing.add_argument("--data", type=Path, required=True, help="prepared cache (folder with manifest.json)")
    packing.add_argument("--output", type=Path, required=True, help="folder for pack.json and the .npz files")
    unpacking = commands.add_parser("unpack", help="unpack to a cache of .npy files (NumPy only)")
    unpacking.add_argument("--pack", type=Path, required=True, help="folder written by 'pack'")
    unpacking.add_argument("--output", type=Path, required=True, help="folder for the unpacked cache")
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            result = pack(args.data, args.output)
        else:
            result = unpack(args.pack, args.output)
    except (MedDiffFMError, OSError, ValueError) as error:
        print(f"pack_data: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.command}ed {len(result['cases'])} cases into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
