"""The repository's own method reference is what the code cites, and every cited section exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    p
    for folder in ("MedDiffFMLib", "MedDiffFM", "Training", "Testing", "benchmarks")
    for p in (ROOT / folder).rglob("*.py")
]


def test_citations_name_sections_of_docs_method_md():
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "Docs" / "METHOD.md").read_text(), re.MULTILINE))
    cited = 0
    for path in SOURCES + [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]:
        text = path.read_text()
        assert "DESIGN" + ".md" not in text, f"{path} cites a file outside the repository"
        for first, last in re.findall(r"METHOD\.md (\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?", text):
            cited += 1
            assert first in sections and (not last or last in sections), (path, first, last)
    assert cited >= 15
