"""The code Slicer loads works with the oldest Python, numpy and MONAI that a supported Slicer has.

Slicer 5.8 runs Python 3.9 with numpy 1.26 and can install MONAI up to 1.5.2; Slicer 5.10 runs
Python 3.12. ``.ci/run`` provides a Python 3.9 environment with Slicer 5.8's numpy stack
(``MEDDIFFFM_PYTHON39``) and the oldest MONAI wheel ``pyproject.toml`` allows
(``MEDDIFFFM_OLDEST_MONAI``); without them the tests use a ``python3.9`` found on this machine, or
skip and say why.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "Testing" / "compat"
OLDEST_MONAI = "1.4.0"


def python39() -> str | None:
    """A working Python 3.9 (a pyenv shim may exist and still refuse to run)."""
    candidates = [os.environ.get("MEDDIFFFM_PYTHON39"), shutil.which("python3.9")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            check = subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"], capture_output=True
            )
            if check.returncode == 0:
                return candidate
    return None


def test_slicer_loaded_code_imports_and_runs_under_python39():
    interpreter = python39()
    if interpreter is None:
        pytest.skip("no Python 3.9 interpreter here (set MEDDIFFFM_PYTHON39, as .ci/run does)")
    result = subprocess.run(
        [interpreter, str(COMPAT / "import_all.py")], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    imported, total = map(int, re.search(r"(\d+) of (\d+) modules import", result.stdout).groups())
    assert "Python 3.9" in result.stdout and imported == total >= 40
    if os.environ.get("MEDDIFFFM_PYTHON39"):
        assert "numpy 1.26" in result.stdout, result.stdout[-2000:]


def test_shipped_weights_give_the_same_outputs_with_the_oldest_monai(tmp_path):
    wheel = os.environ.get("MEDDIFFFM_OLDEST_MONAI")
    if not wheel or not Path(wheel).exists():
        pytest.skip(f"no MONAI {OLDEST_MONAI} wheel given (MEDDIFFFM_OLDEST_MONAI, as .ci/run does)")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    runs = {"current": environment, "oldest": {**environment, "PYTHONPATH": wheel}}
    outputs = {}
    for name, env in runs.items():
        result = subprocess.run(
            [sys.executable, str(COMPAT / "shipped_outputs.py"), str(tmp_path / f"{name}.npz")],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[name] = np.load(tmp_path / f"{name}.npz")
    assert str(outputs["oldest"]["monai"]) == OLDEST_MONAI != str(outputs["current"]["monai"])
    for model in ("base", "sr", "lesion"):
        np.testing.assert_allclose(outputs["oldest"][model], outputs["current"][model], atol=1e-5)
