"""Build hook: a wheel carries the shipped models and the sample scan in MedDiffFMLib/data/.

Everything else is in pyproject.toml. In a checkout the files stay where they are (``models/``,
``Testing/Data/``); ``MedDiffFMLib/resources.py`` finds them in either place.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {
    "models": ["*.safetensors", "*.json"],
    "Testing/Data/totalsegmentator_example": ["**/*"],
}


class BuildWithData(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout's own files
            return
        target = Path(self.build_lib) / "MedDiffFMLib" / "data"
        shutil.rmtree(target, ignore_errors=True)  # nothing left over from an earlier build
        copied = 0
        for folder, patterns in SHIPPED.items():
            for pattern in patterns:
                for path in (ROOT / folder).glob(pattern):
                    if path.is_file():
                        destination = target / path.relative_to(ROOT)
                        destination.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, destination)
                        copied += 1
        if not copied:
            raise RuntimeError(f"No shipped models or sample scans under {ROOT}: build from a checkout or the sdist.")


setup(cmdclass={"build_py": BuildWithData})
