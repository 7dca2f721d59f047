"""One definition per task: its inputs, settings, outputs and the function that runs it.

A :class:`TaskSpec` is what the command line's subcommands and flags, the Slicer panel's rows and
defaults, the background job file (``meddiff-fm run JOB.json``) and the tests are generated from.
The six tasks are defined at the end of this module (:data:`TASKS`); each one's computation is a
``run(engine, inputs, settings, context) -> TaskResult`` function in its module under
:mod:`MedDiffFMLib.tasks` (``context``: a :class:`RunContext` with the region, seed, progress
callback and cancel token), named by :attr:`TaskSpec.runner` and imported only when the task runs.

This module imports nothing beyond the standard library, so that the Slicer module can describe
the tasks before PyTorch is installed. A new task is a new module under ``tasks/`` plus its
:class:`TaskSpec` here (or passed to :func:`register`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .class_names import canonical_name
from .errors import InputError

REGION_NAMES = ("head_neck", "chest", "abdomen")
"""The model's regions (``MedDiffFMLib.preprocessing.REGIONS``; a test keeps the two in step)."""
SAMPLER_NAMES = ("ddpm", "ddim", "dpm++2m")
"""The generative samplers (``MedDiffFMLib.diffusion.samplers.SAMPLERS``)."""
START_FROM = ("auto", "noise", "anatomy")
"""Where synthesis starts: pure noise (the method's), the anatomy painted with the model card's
typical HU and noised to the start timestep (Docs/METHOD.md 1.1), or ``auto`` (the default): the
anatomy where the card has the typical HU of a structure other than the body in the region, else
noise."""
LESION_SCOPES = ("volume", "lesion")
"""What the lesion ControlNet generates in lesion generation: the whole volume (the synthesis is
conditioned on the mask, the paper's method) or only the lesion (the CT is synthesised without it,
then the lesion is RePainted into it, so every other voxel is exactly the lesion-free synthesis)."""

PREVIEW_OVERLAP = 0.25
"""Window overlap of the fast preview: half the windows of the default 0.5, no visible seams
(benchmarks/README.md #5)."""

KINDS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "names": list, "table": dict}


@dataclass(frozen=True)
class Setting:
    """One setting of a task: a keyword of its library function and a key of job files.

    Attributes:
        name: the keyword (``sigma_n``); also the job file's key.
        default: value when not given; None means "automatic" or "the task decides" (see ``help``).
        help: one line for ``--help``, tooltips and documentation, with the unit.
        kind: ``int``, ``float``, ``str``, ``bool``, ``names`` (a list of strings, repeatable flag) or
            ``table`` (``{name: number}``, given as ``NAME=NUMBER`` items: a repeatable flag, or one
            string with items separated by commas).
        flag: the command-line flag when it is not ``--`` + the name with dashes.
        choices: the allowed values of a ``str`` setting.
        minimum, maximum: the allowed range of a number (inclusive).
        auto: the value may also be the string ``auto`` (estimated from the data).
        required: the command line requires it (the Slicer panel asks for it).
        structures: the names (a ``names`` setting's items, a ``table``'s keys) are anatomy classes
            (TotalSegmentator v2), checked and made canonical (``Liver`` -> ``liver``) before
            anything is loaded; a table's key may also be a label value (digits).
        panel: the Slicer panel's row that edits it; empty: command line and Python only.
    """

    name: str
    default: Any
    help: str
    kind: str = "float"
    flag: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    auto: bool = False
    required: bool = False
    structures: bool = False
    panel: str = ""

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """``value`` converted to the setting's kind, or an :class:`InputError` saying what is allowed."""
        if value is None or (self.auto and value == "auto"):
            return value
        try:
            if self.kind == "names":
                value = [value] if isinstance(value, str) else [str(item) for item in value]
            elif self.kind == "table":
                value = _table(value)
            elif self.kind == "bool":
                if not isinstance(value, bool):
                    raise TypeError(value)
            elif self.kind == "int":
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError(value)
                value = int(float(value))
            else:
                value = KINDS[self.kind](value)
        except (TypeError, ValueError, OverflowError):
            if self.kind == "table":
                given = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                raise InputError(f"{self.cli_flag} takes NAME=NUMBER items (e.g. liver=100), got '{given}'.") from None
            allowed = f"{self.kind} or 'auto'" if self.auto else self.kind
            raise InputError(f"{self.cli_flag} must be a {allowed}, got {value!r}.") from None
        if self.choices and value not in self.choices:
            raise InputError(f"{self.cli_flag} must be one of {', '.join(self.choices)}, got '{value}'.")
        if self.structures:
            value = self._canonical(value)
        for number in value.values() if self.kind == "table" else (value,):
            self._check_range(number)
        return value

    def _canonical(self, value: list[str] | dict[str, float]) -> list[str] | dict[str, float]:
        try:
            if self.kind == "table":
                return {name if name.isdigit() else canonical_name(name): number for name, number in value.items()}
            return [canonical_name(name) for name in value]
        except InputError as error:
            raise InputError(f"{self.cli_flag}: {error}") from None

    def _check_range(self, value: float) -> None:
        low = self.minimum is not None and value < self.minimum
        if low or (self.maximum is not None and value > self.maximum):
            if self.maximum is None:
                allowed = f"at least {self.minimum:g}"
            elif self.minimum is None:
                allowed = f"at most {self.maximum:g}"
            else:
                allowed = f"within [{self.minimum:g}, {self.maximum:g}]"
            raise InputError(f"{self.cli_flag} must be {allowed}, got {value}.")


def _table(value: Any) -> dict[str, float]:
    """``{name: number}`` from a mapping, a ``NAME=NUMBER`` string (items separated by commas) or a
    list of such strings; raises ValueError or TypeError when it is none of these."""
    if isinstance(value, Mapping):
        items = [(str(name), number) for name, number in value.items()]
    else:
        texts = [value] if isinstance(value, str) else list(value)
        items = []
        for text in texts:
            for item in str(text).split(","):
                if item.strip():
                    name, separator, number = item.partition("=")
                    if not separator:
                        raise ValueError(item)
                    items.append((name, number))
    table = {name.strip(): float(number) for name, number in items}
    if not table or "" in table or not all(math.isfinite(number) for number in table.values()):
        raise ValueError(value)
    return table


@dataclass(frozen=True)
class Role:
    """An input volume of a task.

    Attributes:
        name: ``ct``, ``anatomy`` or ``lesion`` (the key in ``inputs`` and in job files).
        help: its description for ``--help``.
        required: the task cannot run without it.
        positional: the command line takes it as its first argument (else as ``--<name>``).
    """

    name: str
    help: str
    required: bool = True
    positional: bool = False

    @property
    def cli_flag(self) -> str:
        return "--" + self.name


@dataclass(frozen=True)
class Output:
    """An output volume of a task.

    Attributes:
        name: the key in :attr:`TaskResult.volumes` and in job files (``volume``, ``map``, ``mask``).
        suffix: the Slicer node's name after the input's name (``"denoised"``).
        help: its description for ``--help``.
        flag: the command-line flag of a second output (its default path is the first output's with
            ``_<name>`` before the extension); empty: the positional ``output``.
        kind: ``image`` (CT in HU), ``difference`` (signed HU map, shown with a diverging colour
            map) or ``mask`` (0/1, a segmentation in Slicer whose segment is named ``segment``).
    """

    name: str
    suffix: str
    help: str = "output file (.nii.gz, .nii, .nrrd, .mha)"
    flag: str = ""
    kind: str = "image"
    segment: str = ""


def _no_progress(done: int, total: int, message: str) -> None:
    return None


@dataclass(frozen=True)
class RunContext:
    """What every task's run gets besides its inputs and settings.

    Attributes:
        region: ``head_neck``, ``chest``, ``abdomen``, or None (detected where the task can).
        seed: random seed (None: a random one).
        progress: ``progress(done, total, message)``, called as the work advances.
        cancel: a :class:`~MedDiffFMLib.progress.CancelToken` checked between steps, or None.
    """

    region: str | None = None
    seed: int | None = 0
    progress: Callable[[int, int, str], None] = _no_progress
    cancel: Any = None

    def keywords(self) -> dict[str, Any]:
        """The four as keyword arguments of a task function."""
        return dict(region=self.region, seed=self.seed, progress=self.progress, cancel=self.cancel)


@dataclass
class TaskResult:
    """What a task produced: named volumes (on the input's grid or the anatomy's), fields, a summary."""

    volumes: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def summary(self) -> str:
        """One line for people: the task's message and the first volume's note (carried-over voxels)."""
        notes = [volume.metadata.get("MedDiffFM_note", "") for volume in self.volumes.values()]
        return "; ".join(part for part in (self.message, *notes[:1]) if part)


@dataclass(frozen=True)
class TaskSpec:
    """Everything about one task that is not its computation.

    Attributes:
        key: Python name (``detect_anomalies``); also the Slicer module's task key.
        command: command-line subcommand (``detect-anomalies``).
        label: the Slicer panel's name for it.
        help: one line for ``meddiff-fm --help``.
        description: one line under the panel's task selector.
        runner: ``module:function`` (a module of ``MedDiffFMLib.tasks``) that runs it, imported when
            the task first runs, or the function itself (a task defined outside the library):
            ``run(engine, inputs, settings, context: RunContext) -> TaskResult``.
        inputs, outputs, settings: see :class:`Role`, :class:`Output`, :class:`Setting`.
        region_required: the region cannot be detected from the CT (synthesis): the command line
            requires ``--region``; Slicer reads it from the anatomy or asks.
        controlnet_task: the ControlNet it needs (``controlnet-sr``), if any.
        grid_from_volume: in Slicer, a chosen volume (not an input) may give the result's grid.
        preview: the settings of the fast preview (``--preview``, the panel's "Fast preview"), as
            ``(name, value)`` pairs; it also lowers the window overlap to :data:`PREVIEW_OVERLAP`.
    """

    key: str
    command: str
    label: str
    help: str
    description: str
    runner: str | Callable[..., TaskResult]
    inputs: tuple[Role, ...]
    outputs: tuple[Output, ...]
    settings: tuple[Setting, ...]
    region_required: bool = False
    controlnet_task: str | None = None
    grid_from_volume: bool = False
    preview: tuple[tuple[str, Any], ...] = ()

    def preview_settings(self, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``settings`` with the fast preview's values for the settings that are not given (None)."""
        result = dict(settings or {})
        for name, value in self.preview:
            if result.get(name) is None:
                result[name] = value
        return result

    def setting(self, name: str) -> Setting:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise KeyError(name)

    def role(self, name: str) -> Role | None:
        return next((role for role in self.inputs if role.name == name), None)

    def defaults(self) -> dict[str, Any]:
        return {setting.name: setting.default for setting in self.settings}

    def resolve(self, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults updated with ``settings`` (None values keep the default), each checked."""
        given = dict(settings or {})
        unknown = sorted(set(given) - {s.name for s in self.settings})
        if unknown:
            known = ", ".join(s.name for s in self.settings)
            raise InputError(f"Unknown setting(s) for {self.command}: {', '.join(unknown)}. Known: {known}.")
        resolved = {}
        for setting in self.settings:
            value = given.get(setting.name)
            resolved[setting.name] = setting.default if value is None else setting.check(value)
            if setting.required and resolved[setting.name] in (None, []):
                raise InputError(f"{self.label} needs {setting.cli_flag}: {setting.help}.")
        return resolved

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        names = {role.name for role in self.inputs}
        unknown = sorted(set(inputs) - names)
        if unknown:
            raise InputError(f"{self.label} takes no input(s) {', '.join(unknown)} (it takes {', '.join(names)}).")
        for role in self.inputs:
            if role.required and inputs.get(role.name) is None:
                raise InputError(f"{self.label} needs the {role.name} input: {role.help}.")

    def run(
        self,
        engine: Any,
        inputs: Mapping[str, Any],
        settings: Mapping[str, Any] | None = None,
        region: str | None = None,
        seed: int | None = 0,
        progress: Callable[[int, int, str], None] | None = None,
        cancel: Any = None,
    ) -> TaskResult:
        """Run the task: ``inputs`` are :class:`~MedDiffFMLib.volume.Volume` objects by role name,
        ``settings`` by name (missing ones take their defaults); ``region`` None: detected."""
        self.check_inputs(inputs)
        if region is not None and region not in REGION_NAMES:
            raise InputError(f"Unknown region '{region}'. Choose one of: {', '.join(REGION_NAMES)}.")
        if self.region_required and region is None:
            raise InputError(f"{self.label} needs the region ({', '.join(REGION_NAMES)}).")
        context = RunContext(region, seed, progress or _no_progress, cancel)
        given = {role: volume for role, volume in inputs.items() if volume is not None}
        return self.runner_function()(engine, given, self.resolve(settings), context)

    def runner_function(self) -> Callable[..., TaskResult]:
        """The function that runs the task (raises AttributeError/ImportError when the library lacks it)."""
        if callable(self.runner):
            return self.runner
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(f".tasks.{module}", __package__), function)


TASKS: dict[str, TaskSpec] = {}
"""Every task by key, in the order the command line and the panel list them."""


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task (the command line and the Slicer panel offer it from then on)."""
    if spec.key in TASKS or any(other.command == spec.command for other in TASKS.values()):
        raise ValueError(f"A task '{spec.key}' or command '{spec.command}' exists already.")
    TASKS[spec.key] = spec
    return spec


def task_by_command(command: str) -> TaskSpec:
    for spec in TASKS.values():
        if spec.command == command:
            return spec
    raise KeyError(command)


# --- the six tasks ---------------------------------------------------------------------------------

_CT = Role("ct", "CT file or DICOM folder (HU)", positional=True)
_ANATOMY_GRID = Role("anatomy", "anatomy label map; its grid fixes the output's size and spacing", positional=True)
_OPTIONAL_ANATOMY = Role("anatomy", "anatomy label map (TotalSegmentator v2 values) for conditioning", required=False)
_STEPS_OF_SAMPLER = Setting(
    "steps",
    None,
    "steps of ddim (default 50) or dpm++2m (default 20); ddpm always runs all 1000. Above about 40, dpm++2m "
    "merges steps that fall on the same integer timestep",
    kind="int",
    minimum=1,
    panel="steps",
)
_SAMPLER = Setting("sampler", "ddim", "sampler", kind="str", choices=SAMPLER_NAMES, panel="sampler")
_START_FROM = Setting(
    "start_from",
    "auto",
    "where sampling starts: noise (the method's) or anatomy (the label map painted with the model card's typical "
    "HU of each structure, noised to --start); auto (default): anatomy where the card has the region's "
    "typical HU of a structure other than the body",
    kind="str",
    choices=START_FROM,
    panel="start_from",
)
_START = Setting(
    "start",
    None,
    "timestep to start at with --start-from anatomy (default: where the noise is 1.65 times the window's "
    "half-width, 649 of 1000 for the cosine schedule); lower keeps more of the painted anatomy",
    kind="int",
    minimum=1,
    maximum=999,
)

_TYPICAL_HU = Setting(
    "label_hu",
    None,
    "typical HU of structures for the painted start, NAME=HU items (TotalSegmentator v2 names in any case, or "
    "label values; repeatable or comma-separated, e.g. liver=100,aorta=160): they replace the model card's "
    "values (native CT) of those structures, e.g. for a contrast phase, and each structure is shifted to its value "
    "(its median) "
    "after sampling; with --start-from auto they select the painted start",
    kind="table",
    flag="--typical-hu",
    structures=True,
    minimum=-1024.0,
    maximum=3071.0,
    panel="typicalHu",
)


def _margin(prefix: str, panel: str = "margin") -> Setting:
    return Setting(
        "margin_mm",
        0.0,
        prefix + "blend generated and original voxels in a band this wide (mm) around the lesion mask; default 0: "
        "only the mask changes",
        flag="--margin",
        minimum=0.0,
        maximum=30.0,
        panel=panel,
    )


def _eta(help_text: str) -> Setting:
    return Setting("eta", 1.0, help_text, minimum=0.0, maximum=1.0, panel="eta")


DENOISE_NOISE_GAIN = 3.0
"""DiffPIR runs at this multiple of the noise level. Low-dose CT noise is spatially correlated
(filtered back-projection texture, streaks), so it holds more low-frequency power than white noise
of the same standard deviation, and a white-noise DiffPIR at the true level leaves much of it. On
simulated low dose of two training scans (chest CTA, chest and abdomen windows; 1 mm model,
lambda 10, 4 steps) PSNR rose from gain 1 to a peak at 2.5-3 and fell beyond 4 (benchmarks/README.md)."""

register(
    TaskSpec(
        "synthesize",
        "synthesize",
        "Synthesize",
        "generate a CT from an anatomy label map",
        "Generate a CT from an anatomy segmentation (its grid, or the chosen volume's grid).",
        "synthesize:run",
        inputs=(_ANATOMY_GRID,),
        outputs=(Output("volume", "synthetic CT"),),
        settings=(
            _SAMPLER,
            _STEPS_OF_SAMPLER,
            _eta("DDIM stochasticity (0 deterministic, default 1)"),
            _START_FROM,
            _START,
            _TYPICAL_HU,
        ),
        region_required=True,
        grid_from_volume=True,
        preview=(("sampler", "dpm++2m"), ("steps", 10)),
    )
)
register(
    TaskSpec(
        "denoise",
        "denoise",
        "Denoise",
        "low-dose CT denoising (DiffPIR)",
        "Low-dose CT denoising (DiffPIR, zero-shot).",
        "denoise:run",
        inputs=(_CT, _OPTIONAL_ANATOMY),
        outputs=(Output("volume", "denoised"),),
        settings=(
            Setting(
                "sigma_n",
                "auto",
                "noise std in the model's [-1, 1] scale (1 = half the region's HU window), or 'auto' (default: "
                "estimated from the scan)",
                flag="--sigma",
                minimum=1e-4,
                maximum=2.0,
                auto=True,
                panel="sigma",
            ),
            Setting(
                "noise_gain",
                DENOISE_NOISE_GAIN,
                f"DiffPIR runs at this multiple of the noise std: CT noise is correlated (default "
                f"{DENOISE_NOISE_GAIN:g}; 1 for white noise)",
                minimum=1e-3,
            ),
            Setting("lam", 10.0, "DiffPIR lambda (default 10)", minimum=0.0, panel="lambda"),
            Setting("steps", 10, "network evaluations (default 10)", kind="int", minimum=1, panel="steps"),
            Setting("zeta", 0.0, "fresh-noise share (default 0)", minimum=0.0, maximum=1.0),
        ),
        preview=(("steps", 4),),
    )
)
register(
    TaskSpec(
        "detect_anomalies",
        "detect-anomalies",
        "Detect anomalies",
        "anomaly map and mask inside an organ",
        "Anomaly map and mask inside the chosen organs (zero-shot).",
        "anomaly:run",
        inputs=(_CT, Role("anatomy", "anatomy label map containing the organ")),
        outputs=(
            Output("map", "anomaly map", "anomaly map file (HU difference)", kind="difference"),
            Output(
                "mask",
                "anomalies",
                "anomaly mask file (default: OUTPUT with '_mask' before the extension)",
                flag="--mask-output",
                kind="mask",
                segment="anomaly",
            ),
        ),
        settings=(
            Setting(
                "organs",
                None,
                "organ name, a TotalSegmentator v2 class, e.g. liver (repeatable)",
                kind="names",
                flag="--organ",
                structures=True,
                required=True,
                panel="organs",
            ),
            Setting(
                "t",
                600,
                "noise timestep (default 600, tuned on a training CT; the paper, showing the organ alone: 950)",
                kind="int",
                minimum=0,
                maximum=999,
                panel="timestep",
            ),
            Setting(
                "threshold",
                None,
                "HU threshold on |map| (default: from the map's statistics)",
                minimum=0.0,
                panel="threshold",
            ),
            Setting("draws", 1, "noise draws to average (default 1)", kind="int", minimum=1, maximum=64, panel="draws"),
            Setting(
                "organ_only",
                False,
                "show the model the organ alone, the rest set to air, as the paper does "
                "(default: the CT around the organ is kept as context)",
                kind="bool",
                panel="organOnly",
            ),
        ),
    )
)
register(
    TaskSpec(
        "super_resolve",
        "super-resolve",
        "Super-resolve",
        "thin slices from a thick-slice CT (ControlNet + DiffPIR)",
        "Thick-slice to thin-slice CT along z (ControlNet + DiffPIR).",
        "super_resolution:run",
        inputs=(Role("ct", "thick-slice CT file or DICOM folder (HU)", positional=True),),
        outputs=(Output("volume", "super-resolved"),),
        settings=(
            Setting(
                "spacing",
                1.0,
                "slice spacing of the result in mm (default 1.0)",
                minimum=0.1,
                maximum=10.0,
                panel="spacing",
            ),
            Setting(
                "steps",
                20,
                "network evaluations (default 20, tuned on a training scan: 100, the paper's, did worse there)",
                kind="int",
                minimum=1,
                panel="steps",
            ),
            Setting(
                "sigma_n",
                0.3,
                "DiffPIR noise level of the start, in the model's [-1, 1] scale (1 = half the region's HU window; "
                "default 0.3, tuned on training scans; the paper: 1)",
                flag="--sigma",
                minimum=1e-4,
                maximum=2.0,
                panel="sigma",
            ),
            Setting("lam", 1.0, "DiffPIR lambda (default 1)", minimum=0.0, panel="lambda"),
            Setting("zeta", 1.0, "fresh-noise share (default 1, tuned on training scans)", minimum=0.0, maximum=1.0),
            Setting(
                "draws",
                1,
                "posterior samples averaged into the result (default 1; more: lower error, draws x the time)",
                kind="int",
                minimum=1,
                maximum=64,
                panel="draws",
            ),
        ),
        controlnet_task="controlnet-sr",
        preview=(("steps", 10),),
    )
)
register(
    TaskSpec(
        "generate_lesion",
        "generate-lesion",
        "Generate lesion",
        "synthesise a CT with a lesion where a mask says",
        "Synthesize a CT with a lesion where the lesion segment is (lesion ControlNet).",
        "lesion:run_generate",
        inputs=(_ANATOMY_GRID, Role("lesion", "lesion mask (non-zero = lesion)")),
        outputs=(Output("volume", "synthetic lesion CT"),),
        settings=(
            _SAMPLER,
            _STEPS_OF_SAMPLER,
            _eta("DDIM stochasticity (default 1)"),
            _START_FROM,
            _START,
            _TYPICAL_HU,
            Setting(
                "scope",
                "volume",
                "what the lesion ControlNet generates: volume (default; the whole synthesis is conditioned on the "
                "mask, the paper's method) or lesion (the CT is synthesised without the lesion, then the lesion is "
                "RePainted into it, so every voxel outside the mask and --margin is the lesion-free synthesis with "
                "the same seed)",
                kind="str",
                choices=LESION_SCOPES,
            ),
            Setting(
                "lesion_steps",
                50,
                "with --scope lesion: RePaint steps of the lesion (default 50, one re-noising jump of 10 steps)",
                kind="int",
                minimum=1,
            ),
            _margin("with --scope lesion: ", panel=""),
        ),
        region_required=True,
        controlnet_task="controlnet-lesion",
        grid_from_volume=True,
        preview=(("sampler", "dpm++2m"), ("steps", 10), ("lesion_steps", 20)),
    )
)
register(
    TaskSpec(
        "inpaint_lesion",
        "inpaint-lesion",
        "Inpaint lesion",
        "paint a lesion into a real CT (RePaint); other voxels unchanged",
        "Paint a lesion into a real CT inside the lesion segment (RePaint); voxels outside stay.",
        "lesion:run_inpaint",
        inputs=(
            _CT,
            Role("lesion", "lesion mask (non-zero = lesion), any overlapping grid"),
            Role("anatomy", "anatomy label map for conditioning", required=False),
        ),
        outputs=(Output("volume", "lesion inpainted"),),
        settings=(
            Setting("steps", 50, "reverse steps (default 50)", kind="int", minimum=1, panel="steps"),
            Setting(
                "jump_length",
                10,
                "RePaint jump length in steps (default 10; 0: no jumps)",
                kind="int",
                minimum=0,
                panel="jumpLength",
            ),
            Setting(
                "jump_count",
                1,
                "RePaint re-noising jumps per position (default 1; 0: no jumps)",
                kind="int",
                minimum=0,
                panel="jumpCount",
            ),
            _margin(""),
        ),
        controlnet_task="controlnet-lesion",
        preview=(("steps", 20), ("jump_count", 0)),
    )
)
