"""Import every module Slicer loads (MedDiffFMLib, MedDiffFMSlicer, MedDiffFM.py) under this Python.

    python3.9 Testing/compat/import_all.py

Run with the oldest Python a supported Slicer ships (Slicer 5.8: Python 3.9), so syntax and
module-level code (type aliases, defaults, dataclasses) that need a newer Python fail here, not in
a user's Slicer. Packages this interpreter does not have (torch, MONAI, Slicer, Qt, ...) are
replaced by permissive stand-ins, so only our own module-level code is exercised; where a package
is installed (e.g. numpy 1.26 in a Slicer-like environment) the real one is used.
Prints one line per module and exits non-zero if any fails.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = ("MedDiffFMLib", "MedDiffFMSlicer", "MedDiffFM")


def _stand_in(name: str) -> type:
    """A distinct stand-in class per name (two of them can be base classes of one class)."""
    if name not in _CLASSES:
        _CLASSES[name] = _StandInMeta(name, (_StandIn,), {})
    return _CLASSES[name]


class _StandInMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{cls.__name__}.{name}")

    def __getitem__(cls, item):
        return _StandIn

    def __or__(cls, other):
        return _StandIn

    __ror__ = __or__

    def __iter__(cls):
        return iter(())


class _StandIn(metaclass=_StandInMeta):
    """A class that is also every attribute, call result and subscript of a missing package."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _StandIn()

    def __getattr__(self, name):
        return _StandIn()

    def __iter__(self):
        return iter(())


_CLASSES: dict[str, type] = {}


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{self.__name__}.{name}")


class _MissingPackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds stand-ins for third-party modules this interpreter does not have."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OURS or name.split(".")[0] in sys.stdlib_module_names_:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def main() -> int:
    sys.stdlib_module_names_ = getattr(sys, "stdlib_module_names", set(sys.builtin_module_names)) | {
        "__future__",
        "abc",
        "argparse",
        "ast",
        "bz2",
        "collections",
        "contextlib",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "enum",
        "functools",
        "gzip",
        "hashlib",
        "importlib",
        "io",
        "itertools",
        "json",
        "logging",
        "math",
        "os",
        "pathlib",
        "platform",
        "queue",
        "random",
        "re",
        "shlex",
        "shutil",
        "signal",
        "socket",
        "string",
        "struct",
        "subprocess",
        "sys",
        "tarfile",
        "tempfile",
        "textwrap",
        "threading",
        "time",
        "traceback",
        "types",
        "typing",
        "unittest",
        "urllib",
        "uuid",
        "warnings",
        "weakref",
        "xml",
        "zipfile",
        "zlib",
        "concurrent",
        "codecs",
        "locale",
        "inspect",
        "numbers",
        "operator",
        "pickle",
        "pprint",
        "select",
        "errno",
        "stat",
        "glob",
        "fnmatch",
        "heapq",
        "bisect",
        "array",
        "base64",
        "binascii",
        "hmac",
        "secrets",
    }
    sys.meta_path.append(_MissingPackages())
    sys.path[:0] = [str(ROOT), str(ROOT / "MedDiffFM")]
    names = sorted(
        ".".join(path.relative_to(base).with_suffix("").parts).replace(".__init__", "")
        for base, folder in ((ROOT, "MedDiffFMLib"), (ROOT / "MedDiffFM", "MedDiffFMSlicer"))
        for path in (base / folder).rglob("*.py")
    ) + ["MedDiffFM"]
    failed = 0
    for name in names:
        try:
            importlib.import_module(name)
            print(f"ok      {name}")
        except Exception:  # noqa: BLE001 - report every failure, then exit non-zero
            failed += 1
            print(f"FAILED  {name}\n{traceback.format_exc()}")
    print(f"Python {sys.version.split()[0]}: {len(names) - failed} of {len(names)} modules import")
    if not failed and not isinstance(sys.modules["numpy"], _StandInModule):
        exercise()
    return 1 if failed else 0


def exercise() -> None:
    """With the real numpy stack present: file formats, corruption checks, resampling, windows, anatomy, settings."""
    import tempfile

    import numpy as np

    from MedDiffFMLib import anatomy, metrics
    from MedDiffFMLib import preprocessing as pp
    from MedDiffFMLib.errors import InputError, ReadError
    from MedDiffFMLib.task_spec import TASKS
    from MedDiffFMLib.volume import Volume, read_volume, write_volume

    hu = np.full((6, 40, 40), -1000, dtype=np.int16)
    hu[:, 8:32, 8:32] = 40
    volume = Volume(hu, spacing=(0.7, 0.7, 5.0), origin=(-10.0, 5.0, 30.0))
    with tempfile.TemporaryDirectory() as folder:
        for extension in (".nii.gz", ".nii", ".nrrd", ".mha"):
            path = write_volume(volume, Path(folder) / f"ct{extension}")
            back = read_volume(path)
            assert np.array_equal(back.array, hu) and back.geometry.same_grid(volume.geometry), extension
            path.write_bytes(path.read_bytes()[:-200])
            try:
                read_volume(path)
            except ReadError:
                continue
            raise AssertionError(f"a truncated {extension} file was read")
    working = pp.resample(volume, pp.isotropic_geometry(volume.geometry, 1.0))
    scaled = pp.hu_to_model(working.array, "abdomen")
    assert np.allclose(pp.model_to_hu(scaled, "abdomen")[working.array == 40], 40, atol=0.01)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[:, 12:28, 12:28] = anatomy.label_of("Liver")
    table = TASKS["synthesize"].setting("label_hu")
    assert table.check(["Right kidney=150,5=90"]) == {"kidney_right": 150.0, "5": 90.0}
    try:
        table.check(["liver=high"])
    except InputError as error:
        assert "got 'liver=high'" in str(error)
    else:
        raise AssertionError("a table item without a number was accepted")
    assert anatomy.derived_body(labels, volume.spacing).sum() > (labels > 0).sum()
    assert anatomy.body_mask(hu).sum() == (hu > -500).sum()
    assert metrics.psnr(hu, hu + 1, pp.Window(40.0, 400.0)) > 40
    print(f"numpy {np.__version__}: file formats, corruption checks, resampling, windows and anatomy work")


if __name__ == "__main__":
    raise SystemExit(main())
