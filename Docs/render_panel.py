"""Render the MedDiffFM panel (``MedDiffFM/Resources/UI/MedDiffFM.ui``) to ``Docs/panel.png`` without Slicer.

The Slicer-only widget classes (CTK, qMRML) are replaced by plain Qt stand-ins that look alike
(collapsible sections become group boxes, node selectors become combo boxes), the task rows are shown as
the module shows them for one task, and the window is grabbed offscreen. Needs PySide6 (not a project
dependency; use a throwaway environment)::

    python -m venv /tmp/pyside && /tmp/pyside/bin/pip install pyside6-essentials
    QT_QPA_PLATFORM=offscreen /tmp/pyside/bin/python Docs/render_panel.py [TASK_LABEL] [OUTPUT.png]
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "MedDiffFM" / "Resources" / "UI" / "MedDiffFM.ui"
sys.path.insert(0, str(ROOT / "MedDiffFM"))
sys.path.insert(0, str(ROOT))

from MedDiffFMSlicer.taskinfo import (  # noqa: E402
    DEVICE_LABELS,
    REGION_LABELS,
    TASK_ROWS,
    TASKS,
    rows_of_task,
    task_for_label,
)

STAND_INS = {
    "qMRMLWidget": "QWidget",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLCheckableNodeComboBox": "QComboBox",
    "qMRMLSegmentSelectorWidget": "QComboBox",
    "ctkCheckableComboBox": "QComboBox",
    "ctkDirectoryButton": "QPushButton",
    "ctkCollapsibleButton": "QGroupBox",
}
SLICER_ONLY_PROPERTIES = {
    "nodeTypes",
    "showChildNodeTypes",
    "noneEnabled",
    "addEnabled",
    "removeEnabled",
    "noneDisplay",
    "editEnabled",
    "collapsed",
}
EXAMPLE_CONTENT = {
    "inputVolumeSelector": ["CT chest"],
    "extraVolumesComboBox": ["(none)"],
    "anatomySelector": ["CT chest anatomy (TotalSegmentator)"],
    "lesionSegmentSelector": ["Lesions: tumour"],
    "organsComboBox": ["liver"],
    "samplerComboBox": ["DDIM", "DDPM"],
    "regionComboBox": list(REGION_LABELS),
    "deviceComboBox": list(DEVICE_LABELS),
    "modelComboBox": ["untrained tiny network (pipeline test only)"],
    "controlNetComboBox": ["(install a ControlNet)"],
    "catalogueComboBox": ["(no downloadable models listed; use Import from file)"],
}


def stand_in_ui() -> tuple[bytes, set[str]]:
    """The .ui XML with stand-in classes; also the names of the sections that start collapsed."""
    root = ET.parse(UI).getroot()
    collapsed = set()
    for element in root.iter("widget"):
        cls = element.get("class")
        for prop in list(element.findall("property")):
            name = prop.get("name")
            if name == "collapsed" and prop.find("bool").text == "true":
                collapsed.add(element.get("name"))
            if name in SLICER_ONLY_PROPERTIES:
                element.remove(prop)
            elif cls == "ctkCollapsibleButton" and name == "text":
                prop.set("name", "title")
        if cls in STAND_INS:
            element.set("class", STAND_INS[cls])
    for tag in ("customwidgets", "connections"):
        for child in root.findall(tag):
            root.remove(child)
    return ET.tostring(root), collapsed


def render(task_label: str = "Detect anomalies", output: Path = ROOT / "Docs" / "panel.png") -> Path:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QWidget

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    xml, collapsed = stand_in_ui()
    buffer = QBuffer()
    buffer.setData(QByteArray(xml))
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    if panel is None:
        raise RuntimeError("QUiLoader could not load the stand-in .ui")

    def find(name):
        return panel.findChild(QWidget, name)

    task_combo = find("taskComboBox")
    task_combo.addItems([info.label for info in TASKS.values()])
    task_combo.setCurrentText(task_label)
    for name, items in EXAMPLE_CONTENT.items():
        combo = find(name)
        if isinstance(combo, QComboBox):
            combo.addItems(items)
    task = task_for_label(task_label)
    find("taskDescriptionLabel").setText(TASKS[task].description)
    find("cacheFolderButton").setText(str(Path("~/.cache/meddifffm")))
    find("dependenciesStatusLabel").setText("all installed")
    find("installDependenciesButton").setEnabled(False)
    find("applyButton").setEnabled(True)
    find("statusLabel").setText("Choose the inputs and press Apply; the task runs in the background.")
    shown = rows_of_task(task)
    for row, names in TASK_ROWS.items():
        for name in names:
            find(name).setVisible(row in shown)
    for name in collapsed:
        section = find(name)
        section.setTitle("\u25b8 " + section.title())
        for child in section.findChildren(QWidget):
            child.setVisible(False)
        section.setMaximumHeight(28)
    for name in ("inputsCollapsibleButton", "modelCollapsibleButton"):
        find(name).setTitle("\u25be " + find(name).title())
    panel.resize(440, 10)
    panel.adjustSize()
    panel.resize(440, panel.sizeHint().height())
    output.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(output)):
        raise RuntimeError(f"could not write {output}")
    return output


if __name__ == "__main__":
    arguments = sys.argv[1:]
    print(render(*arguments[:1], *(Path(a) for a in arguments[1:2])))
