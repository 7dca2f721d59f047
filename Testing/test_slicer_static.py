"""Static checks of the Slicer extension: CMake file lists, the .ui file and the names the code uses in it.

These need neither Slicer nor slicer-core: they read the files. A Python file or resource missing from
``MedDiffFM/CMakeLists.txt`` is silently not installed by Slicer's build, and a widget name that is not in
the .ui file fails only when a user opens the panel, so both are checked here.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedDiffFM"
UI = MODULE / "Resources" / "UI" / "MedDiffFM.ui"
WIDGET_SOURCE = MODULE / "MedDiffFM.py"

sys.path.insert(0, str(MODULE))

from MedDiffFMSlicer.taskinfo import (  # noqa: E402
    SAMPLER_LABELS,
    START_LABELS,
    TASK_ROWS,
    TASKS,
    anatomy_use,
    panel_settings,
    rows_of_task,
)


def cmake_sets(path: Path) -> dict[str, list[str]]:
    """``set(NAME values...)`` of a CMake file, with ``${VAR}`` expanded from earlier sets."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    values: dict[str, list[str]] = {}
    for name, body in re.findall(r"\bset\(\s*(\w+)\s+(.*?)\)", text, flags=re.S):
        items = re.findall(r'"[^"]*"|\S+', body)
        expanded = []
        for item in items:
            item = item.strip('"')
            for variable, replacement in values.items():
                item = item.replace("${" + variable + "}", " ".join(replacement))
            expanded.append(item)
        values[name] = expanded
    return values


def module_files() -> set[str]:
    """Every file under MedDiffFM/ that belongs to the module (not caches, not the CMake file itself)."""
    return {
        path.relative_to(MODULE).as_posix()
        for path in MODULE.rglob("*")
        if path.is_file() and not _is_cache(path.relative_to(MODULE)) and path.name != "CMakeLists.txt"
    }


def _is_cache(relative: Path) -> bool:
    """Generated folders (``__pycache__``, ``.ruff_cache``, ...) that are never part of the sources."""
    return any(part == "__pycache__" or part.startswith(".") for part in relative.parts[:-1])


def test_every_module_file_is_listed_in_its_cmakelists_and_every_listed_file_exists():
    sets = cmake_sets(MODULE / "CMakeLists.txt")
    scripts, resources = sets["MODULE_PYTHON_SCRIPTS"], sets["MODULE_PYTHON_RESOURCES"]
    listed = set(scripts) | set(resources)
    assert len(listed) == len(scripts) + len(resources), "a file is listed twice"
    assert module_files() - listed == set(), "files under MedDiffFM/ that CMake would not install"
    assert listed - module_files() == set(), "files listed in CMake that do not exist"
    assert all(name.endswith(".py") for name in scripts)
    assert not any(name.endswith(".py") for name in resources)


def test_module_cmakelists_builds_a_tested_scripted_module():
    text = (MODULE / "CMakeLists.txt").read_text()
    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, flags=re.S).group(1)
    for keyword in (
        "NAME ${MODULE_NAME}",
        "SCRIPTS ${MODULE_PYTHON_SCRIPTS}",
        "RESOURCES ${MODULE_PYTHON_RESOURCES}",
        "WITH_GENERIC_TESTS",
    ):
        assert keyword in build
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT \$\{MODULE_NAME\}\.py\s*\)", text)
    assert cmake_sets(MODULE / "CMakeLists.txt")["MODULE_NAME"] == ["MedDiffFM"]


def test_extension_cmakelists():
    sets = cmake_sets(ROOT / "CMakeLists.txt")
    assert sets["EXTENSION_HOMEPAGE"] == ["https://github.com/meddifffm/SlicerMedDiffFM"]
    for field in ("EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert " ".join(sets[field]).strip(), field
    assert sets["EXTENSION_DEPENDS"] == ["PyTorch"]
    icon_url, screenshot_url = sets["EXTENSION_ICONURL"][0], sets["EXTENSION_SCREENSHOTURLS"][0]
    assert icon_url.endswith("/main/MedDiffFM.png") and (ROOT / "MedDiffFM.png").exists()
    assert screenshot_url.endswith("/main/Docs/panel.png") and (ROOT / "Docs" / "panel.png").exists()
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"add_subdirectory\(MedDiffFM\)", text)
    assert "find_package(Slicer REQUIRED)" in text and "Slicer_EXTENSION_CPACK" in text


def test_the_library_is_installed_with_the_extension():
    """The top-level CMake globs MedDiffFMLib's .py and .json files: every library file must match one."""
    text = (ROOT / "CMakeLists.txt").read_text()
    patterns = re.findall(r"CONFIGURE_DEPENDS (MedDiffFMLib/\*\.\w+)", text)
    assert sorted(patterns) == ["MedDiffFMLib/*.json", "MedDiffFMLib/*.py"]
    files = [p for p in (ROOT / "MedDiffFMLib").rglob("*") if p.is_file() and not _is_cache(p.relative_to(ROOT))]
    unmatched = [p.relative_to(ROOT).as_posix() for p in files if p.suffix not in (".py", ".json")]
    assert unmatched == [], "library files that the extension would not install"
    assert (ROOT / "MedDiffFMLib" / "cli.py").exists()


def test_the_extension_ships_the_catalogued_models_where_the_library_looks():
    text = (ROOT / "CMakeLists.txt").read_text()
    listed = cmake_sets(ROOT / "CMakeLists.txt")["MedDiffFM_SHIPPED_MODELS"]
    catalogue = json.loads((ROOT / "MedDiffFMLib" / "model" / "catalogue.json").read_text())["models"]
    shipped = [f"models/{m['name']}-{m['version']}{suffix}" for m in catalogue for suffix in (".safetensors", ".json")]
    assert sorted(listed) == sorted(shipped) and all((ROOT / path).exists() for path in shipped)
    destination = "DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/models"
    assert f"install(FILES ${{MedDiffFM_SHIPPED_MODELS}} {destination}" in text
    assert "DESTINATION ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/models" in text
    # The library is installed into the same folder, and looks for models/ beside itself.
    from MedDiffFMLib import resources

    assert resources.MODELS == "models" and resources.PACKAGE_DIR.parent in resources.roots()
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text


@pytest.mark.parametrize("path", [ROOT / "MedDiffFM.png", MODULE / "Resources" / "Icons" / "MedDiffFM.png"])
def test_icons_are_128_pixel_pngs(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (128, 128)


# --------------------------------------------------------------------------------------------------
# The .ui file and the widget code
# --------------------------------------------------------------------------------------------------


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()  # raises on invalid XML
    assert root.tag == "ui" and root.find("class").text == "MedDiffFM"
    widgets = {}
    for element in root.iter("widget"):
        name = element.get("name")
        assert name not in widgets, f"duplicate objectName {name}"
        widgets[name] = element
    return widgets


def widget_source() -> ast.Module:
    return ast.parse(WIDGET_SOURCE.read_text())


def test_ui_is_valid_xml_with_declared_custom_widgets():
    widgets = ui_widgets()
    root = ET.parse(UI).getroot()
    declared = {element.find("class").text for element in root.iter("customwidget")}
    qt_classes = {
        "QWidget",
        "QLabel",
        "QComboBox",
        "QPushButton",
        "QSpinBox",
        "QDoubleSpinBox",
        "QCheckBox",
        "QProgressBar",
        "QPlainTextEdit",
        "QLineEdit",
    }
    used = {element.get("class") for element in widgets.values()}
    assert used - qt_classes <= declared, "custom widget classes used without a <customwidget> declaration"
    for connection in root.iter("connection"):
        assert connection.find("receiver").text in widgets


def test_every_widget_name_the_code_uses_exists_in_the_ui():
    widgets = ui_widgets()
    used = {
        node.attr
        for node in ast.walk(widget_source())
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and not node.attr.startswith("_")
    }
    assert used, "the widget code should use self.ui.<name>"
    assert used - set(widgets) == set(), "names used as self.ui.<name> but missing from the .ui file"


def _module_constant(name: str):
    for node in widget_source().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in MedDiffFM.py")


def test_task_rows_name_ui_widgets_and_cover_every_task():
    widgets = ui_widgets()
    for label, field in TASK_ROWS.values():
        assert label in widgets and field in widgets
        assert widgets[label].get("class") == "QLabel"
    for task, spec in TASKS.items():
        shown = rows_of_task(task)
        assert shown <= set(TASK_ROWS), task
        assert ("anatomy" in shown) == (anatomy_use(spec) != "no"), task
        assert ("lesion" in shown) == (spec.role("lesion") is not None), task
        assert ("organs" in shown) == any(s.name == "organs" for s in spec.settings), task
        assert ("controlNet" in shown) == bool(spec.controlnet_task), task
        panel = {setting.panel for setting in spec.settings if setting.panel}
        assert panel <= set(TASK_ROWS) | {"steps"}, task
    # The rows each task showed before its rows were derived from its definition, plus draws, organ
    # only, the synthesis start and its typical HU.
    assert rows_of_task("denoise") == {"inputVolume", "volumes", "anatomy", "sigma", "lambda"}
    assert rows_of_task("synthesize") == {"inputVolume", "anatomy", "sampler", "eta", "start_from", "typicalHu"}
    assert {"start_from", "typicalHu"} <= rows_of_task("generate_lesion")
    assert rows_of_task("super_resolve") == {
        "inputVolume",
        "volumes",
        "spacing",
        "sigma",
        "lambda",
        "draws",
        "controlNet",
    }
    assert {"draws", "organOnly", "timestep", "threshold"} <= rows_of_task("detect_anomalies")
    # Other volumes only where the first CT's anatomy or lesion would not be reused for them.
    assert "volumes" not in rows_of_task("detect_anomalies") | rows_of_task("inpaint_lesion")


def _parameter_node_annotations(name: str) -> dict[str, tuple]:
    """The arguments of the ``name`` annotation (``Default``, ``WithinRange``) of each parameter node field."""
    found = {}
    for node in widget_source().body:
        if isinstance(node, ast.ClassDef) and node.name == "MedDiffFMParameterNode":
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign):
                    for call in ast.walk(statement.annotation):
                        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == name:
                            found[statement.target.id] = tuple(ast.literal_eval(a) for a in call.args)
    return found


def _parameter_node_defaults() -> dict:
    return {field: arguments[0] for field, arguments in _parameter_node_annotations("Default").items()}


def test_the_panel_s_defaults_give_each_task_its_library_defaults():
    """With the panel as it starts (no organ chosen), every task runs with the settings its definition has."""
    import types

    state = types.SimpleNamespace(**_parameter_node_defaults(), organs=[], typicalHu="")
    for task, spec in TASKS.items():
        read = panel_settings(state, spec)
        resolved = spec.resolve(
            {**{k: v for k, v in read.items() if v is not None}, "organs": ["liver"]}
            if task == "detect_anomalies"
            else read
        )
        expected = spec.defaults() | ({"organs": ["liver"]} if task == "detect_anomalies" else {})
        assert resolved == expected, task
    state.steps, state.sigmaAuto, state.sigma, state.thresholdAuto, state.threshold = 7, False, 0.2, False, 40.0
    assert (
        panel_settings(state, TASKS["denoise"])["steps"] == 7
        and panel_settings(state, TASKS["denoise"])["sigma_n"] == 0.2
    )
    assert panel_settings(state, TASKS["detect_anomalies"])["threshold"] == 40.0


PANEL_NUMBERS = {
    "timestep": ("t", "timestepSpinBox"),
    "spacing": ("spacing", "spacingSpinBox"),
    "jumpLength": ("jumpLength", "jumpLengthSpinBox"),
    "jumpCount": ("jumpCount", "jumpCountSpinBox"),
    "margin": ("margin", "marginSpinBox"),
    "draws": ("draws", "drawsSpinBox"),
    "eta": ("eta", "etaSpinBox"),
    "sigma": ("sigma", "sigmaSpinBox"),
    "lambda": ("lam", "lambdaSpinBox"),
    "threshold": ("threshold", "thresholdSpinBox"),
}
"""Panel rows of a number: the parameter node field and the spin box (``steps`` is left out: its 0
means the task's default)."""


def test_the_panel_allows_exactly_the_library_s_range_of_each_number():
    """A limit the library does not have (jumps of 0, t = 0) would contradict the tooltips, which are
    the library's help; a wider one would only fail after Apply."""
    ranges, widgets = _parameter_node_annotations("WithinRange"), ui_widgets()
    for spec in TASKS.values():
        for setting in spec.settings:
            if setting.panel not in PANEL_NUMBERS:
                continue
            field, widget = PANEL_NUMBERS[setting.panel]
            spin = {
                prop.get("name"): float(prop[0].text)
                for prop in widgets[widget].findall("property")
                if prop.get("name") in ("minimum", "maximum")
            }
            for bound, index, value in (("minimum", 0, setting.minimum), ("maximum", 1, setting.maximum)):
                if value is not None:
                    assert ranges[field][index] == value, (spec.key, setting.name, bound)
                    assert spin[bound] == value, (widget, bound)


def test_the_panel_offers_every_sampler_of_the_library():
    from MedDiffFMLib.diffusion.samplers import SAMPLERS

    assert sorted(SAMPLER_LABELS.values()) == sorted(SAMPLERS)


def test_the_panel_offers_every_synthesis_start_and_reads_the_chosen_one():
    from MedDiffFMLib.task_spec import START_FROM

    assert sorted(START_LABELS.values()) == sorted(START_FROM)
    state = SimpleNamespace(steps=0, sampler="DDIM", eta=1.0, startFrom="Anatomy (typical HU)", typicalHu=" ")
    assert panel_settings(state, TASKS["synthesize"])["start_from"] == "anatomy"
    assert (
        panel_settings(SimpleNamespace(**{**vars(state), "startFrom": "Noise"}), TASKS["synthesize"])["start_from"]
        == "noise"
    )
    assert (
        panel_settings(SimpleNamespace(**{**vars(state), "startFrom": "Automatic"}), TASKS["synthesize"])["start_from"]
        is None
    )  # the default: left to the task
    assert panel_settings(state, TASKS["synthesize"])["label_hu"] is None  # blank: the model's values
    state.typicalHu = "liver=100, aorta = 160"
    read = panel_settings(state, TASKS["generate_lesion"])["label_hu"]
    assert TASKS["generate_lesion"].resolve({"label_hu": read})["label_hu"] == {"liver": 100.0, "aorta": 160.0}


def test_parameter_names_in_the_ui_are_parameter_node_fields():
    """Widgets bound with the ``SlicerParameterName`` property need a field of that name and a suitable type."""
    fields: dict[str, str] = {}
    for node in widget_source().body:
        if isinstance(node, ast.ClassDef) and node.name == "MedDiffFMParameterNode":
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign):
                    fields[statement.target.id] = ast.unparse(statement.annotation)
    assert fields, "MedDiffFMParameterNode not found"
    expected_type = {
        "QComboBox": "str",
        "QSpinBox": "int",
        "QDoubleSpinBox": "float",
        "QCheckBox": "bool",
        "QLineEdit": "str",
        "qMRMLNodeComboBox": "vtkMRML",
    }
    bound = {}
    for name, element in ui_widgets().items():
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = (prop.find("string").text, element.get("class"))
    assert len(bound) >= 20
    for widget_name, (parameter, cls) in bound.items():
        assert parameter in fields, f"{widget_name} is bound to unknown parameter {parameter}"
        assert expected_type[cls] in fields[parameter], (widget_name, parameter, fields[parameter])
        if cls == "QComboBox":
            assert "Choice(" in fields[parameter], f"{parameter}: a combo box needs a Choice validator"


def test_module_metadata_cites_the_paper_and_has_a_slicer_test():
    source = WIDGET_SOURCE.read_text()
    assert "MedDiff-FM: A Diffusion-based Foundation Model for" in source
    assert "Versatile Medical Image Applications" in source
    classes = {node.name: node for node in widget_source().body if isinstance(node, ast.ClassDef)}
    for name in ("MedDiffFM", "MedDiffFMWidget", "MedDiffFMLogic", "MedDiffFMTest"):
        assert name in classes
    test_methods = [n.name for n in classes["MedDiffFMTest"].body if isinstance(n, ast.FunctionDef)]
    assert "runTest" in test_methods and sum(name.startswith("test_") for name in test_methods) >= 3


def test_module_file_imports_no_torch_or_library_at_load_time():
    """Slicer loads MedDiffFM.py at start-up, before the Python dependencies may be installed."""
    top_level = [node for node in widget_source().body if isinstance(node, (ast.Import, ast.ImportFrom))]
    modules = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name) for node in top_level for alias in node.names
    }
    assert not any(m and (m.startswith("torch") or m.startswith("MedDiffFMLib")) for m in modules)
    heavy = {"MedDiffFMSlicer.logic", "MedDiffFMSlicer.nodes", "MedDiffFMSlicer.models"}
    assert not modules & heavy
    for light in ("taskinfo", "dependencies"):
        tree = ast.parse((MODULE / "MedDiffFMSlicer" / f"{light}.py").read_text())
        imported = {
            (node.module if isinstance(node, ast.ImportFrom) else alias.name) or ""
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        imported -= {"MedDiffFMLib.task_spec"}  # the task definitions: standard library only (below)
        assert not any(name.split(".")[0] in ("torch", "MedDiffFMLib", "qt", "slicer") for name in imported), light
    code = (
        f"import sys; sys.path.insert(0, {str(MODULE)!r}); sys.path.insert(0, {str(ROOT)!r}); "
        "import MedDiffFMSlicer.taskinfo; "
        "print(sorted(m for m in ('numpy', 'SimpleITK', 'torch', 'monai') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def _method_source(name: str) -> str:
    tree = ast.parse(WIDGET_SOURCE.read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedDiffFMWidget")
    return ast.unparse(next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == name))


def test_cancel_leaves_the_timer_to_a_running_download_and_closing_the_scene_cancels_the_run():
    """One QTimer polls both the child process and a model download; onTimer stops it when both are done."""
    assert "self.timer.stop()" not in _method_source("onCancel")
    assert "self._installer is None or self._installer.finished" in _method_source("onTimer")
    close = _method_source("onSceneStartClose")
    assert "self._running.cancel()" in close and close.index("cancel") < close.index("setParameterNode")


def test_the_self_test_checks_the_panel_before_it_needs_the_python_packages():
    """On the extension build server (no torch) the self-test must test the panel and say what it skipped."""
    tree = ast.parse(WIDGET_SOURCE.read_text())
    test = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedDiffFMTest")
    run = ast.unparse(next(n for n in test.body if isinstance(n, ast.FunctionDef) and n.name == "runTest"))
    assert run.index("test_panel_shows_the_inputs_of_each_task") < run.index("missing_packages")
    assert "SKIPPED" in run and "logging.warning" in run
