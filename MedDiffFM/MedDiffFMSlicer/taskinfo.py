"""The tasks as the panel sees them: which rows each shows, and the panel's choice labels.

Everything about a task comes from its definition in the library (:data:`MedDiffFMLib.task_spec.TASKS`),
which imports only the standard library, so the module can describe its tasks before the Python
dependencies (torch, MONAI, ...) are installed. Nothing here imports Qt, MRML or torch.
"""

from __future__ import annotations

from MedDiffFMLib.task_spec import TASKS, TaskSpec

REGION_LABELS = {"Auto": None, "Head & neck": "head_neck", "Chest": "chest", "Abdomen": "abdomen"}
DEVICE_LABELS = {"Auto": "auto", "GPU (CUDA)": "cuda", "Apple GPU (MPS)": "mps", "CPU": "cpu"}

SAMPLER_LABELS = {"DDIM": "ddim", "DDPM": "ddpm", "DPM-Solver++": "dpm++2m"}
START_LABELS = {"Automatic": "auto", "Noise": "noise", "Anatomy (typical HU)": "anatomy"}

REGION_KEYS = ("head_neck", "chest", "abdomen")

TASK_ROWS = {
    "inputVolume": ("inputVolumeLabel", "inputVolumeSelector"),
    "anatomy": ("anatomyLabel", "anatomyRow"),
    "lesion": ("lesionLabel", "lesionSegmentSelector"),
    "organs": ("organsLabel", "organsComboBox"),
    "spacing": ("spacingLabel", "spacingSpinBox"),
    "sampler": ("samplerLabel", "samplerComboBox"),
    "eta": ("etaLabel", "etaSpinBox"),
    "start_from": ("startFromLabel", "startFromComboBox"),
    "typicalHu": ("typicalHuLabel", "typicalHuLineEdit"),
    "sigma": ("sigmaLabel", "sigmaRow"),
    "lambda": ("lambdaLabel", "lambdaSpinBox"),
    "timestep": ("timestepLabel", "timestepSpinBox"),
    "threshold": ("thresholdLabel", "thresholdRow"),
    "jumpLength": ("jumpLengthLabel", "jumpLengthSpinBox"),
    "jumpCount": ("jumpCountLabel", "jumpCountSpinBox"),
    "margin": ("marginLabel", "marginSpinBox"),
    "draws": ("drawsLabel", "drawsSpinBox"),
    "organOnly": ("organOnlyLabel", "organOnlyCheckBox"),
    "volumes": ("extraVolumesLabel", "extraVolumesComboBox"),
    "controlNet": ("controlNetLabel", "controlNetComboBox"),
}
"""The panel's rows shown only for some tasks: (label, field) object names in the .ui. A setting's
``panel`` names its row; rows that every task shows (``steps``) are not listed."""


def rows_of_task(task: str) -> set[str]:
    """The rows of :data:`TASK_ROWS` that ``task`` shows: its inputs, settings and ControlNet."""
    spec = TASKS[task]
    rows = {"inputVolume"}
    rows |= {role.name for role in spec.inputs if role.name in ("anatomy", "lesion")}
    if spec.role("ct") is not None and anatomy_use(spec) != "required" and spec.role("lesion") is None:
        rows.add("volumes")  # not where the anatomy or lesion drawn on the first CT would be reused
    rows |= {setting.panel for setting in spec.settings if setting.panel in TASK_ROWS}
    if spec.controlnet_task:
        rows.add("controlNet")
    return rows


def panel_settings(state, spec: TaskSpec) -> dict:
    """The task's settings from the panel's state (the parameter node, or anything with its field names).

    Each row is read the same way for every task that shows it. None leaves a setting to the task
    (its default, or the fast preview's value): a row left at the task's default, 0 steps or lambda,
    and a checked "auto" box of a setting that has no automatic value.
    """
    readers = {
        "steps": lambda setting: state.steps or None,
        "sampler": lambda setting: SAMPLER_LABELS[state.sampler],
        "eta": lambda setting: state.eta,
        "start_from": lambda setting: START_LABELS[state.startFrom],
        "typicalHu": lambda setting: state.typicalHu.strip() or None,
        "sigma": lambda setting: ("auto" if setting.auto else None) if state.sigmaAuto else state.sigma,
        "lambda": lambda setting: state.lam or None,
        "timestep": lambda setting: state.t,
        "threshold": lambda setting: None if state.thresholdAuto else state.threshold,
        "organs": lambda setting: list(state.organs),
        "spacing": lambda setting: state.spacing,
        "jumpLength": lambda setting: state.jumpLength,
        "jumpCount": lambda setting: state.jumpCount,
        "margin": lambda setting: state.margin,
        "draws": lambda setting: state.draws,
        "organOnly": lambda setting: state.organOnly,
    }
    values = {setting.name: readers[setting.panel](setting) for setting in spec.settings if setting.panel}
    return {name: None if value == spec.setting(name).default else value for name, value in values.items()}


def anatomy_use(spec: TaskSpec) -> str:
    """``no``, ``optional`` or ``required``: how the task uses an anatomy segmentation."""
    role = spec.role("anatomy")
    return "no" if role is None else "required" if role.required else "optional"


def task_for_label(label: str) -> str:
    """The task key of a task label (``\"Detect anomalies\"`` -> ``\"detect_anomalies\"``)."""
    for key, spec in TASKS.items():
        if spec.label == label:
            return key
    raise KeyError(f"Unknown task '{label}'")
