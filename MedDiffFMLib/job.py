"""A task run on files, as one JSON document: ``meddiff-fm run JOB.json``.

A :class:`Job` names the task, its input and output files by role, its settings, the region,
the seed and how to build the engine. The command line's task subcommands make one from their
arguments; the Slicer module writes one into its temporary folder for the background process.
:func:`run_job` checks everything it can before any work (settings, outputs writable and
distinct), reads the inputs, runs the task and writes the outputs atomically: a failed or
cancelled job writes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, ReadError
from .task_spec import PREVIEW_OVERLAP, TASKS, TaskResult, TaskSpec
from .volume import WRITE_EXTENSIONS, Volume, check_writable, read_volume, write_volume

if TYPE_CHECKING:
    from .tasks.engine import Engine, EngineOptions

JOB_VERSION = 1


def _engine_options(values: dict | None = None) -> EngineOptions:
    from .tasks.engine import EngineOptions

    known = {f.name for f in fields(EngineOptions)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise InputError(
            f"Unknown engine option(s) in the job: {', '.join(unknown)}. Known: {', '.join(sorted(known))}."
        )
    return EngineOptions(**(values or {}))


@dataclass
class Job:
    """One task run on files.

    Attributes:
        task: the task's key (:data:`~MedDiffFMLib.task_spec.TASKS`), e.g. ``denoise``.
        inputs: input file or DICOM folder by role (``ct``, ``anatomy``, ``lesion``).
        outputs: output file by name (``volume``; anomaly detection: ``map`` and ``mask``).
        settings: the task's settings by name; missing ones take their defaults.
        region: ``head_neck``, ``chest``, ``abdomen``, or None (detected where the task can).
        seed: random seed (None: a random one).
        series_uid: the DICOM series of the ``ct`` input when its folder holds several.
        engine: how to build the engine (:class:`~MedDiffFMLib.tasks.engine.EngineOptions`; its
            ``controlnet_task``, ``task_key`` and ``preview`` are the job's).
        overwrite: replace existing output files.
        preview: the fast preview (:attr:`~MedDiffFMLib.task_spec.TaskSpec.preview`: fewer steps,
            window overlap at most :data:`~MedDiffFMLib.task_spec.PREVIEW_OVERLAP`, and, when no
            model is named, the catalogue's preview model: the 3 mm one).
    """

    task: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)
    region: str | None = None
    seed: int | None = 0
    series_uid: str | None = None
    engine: EngineOptions = field(default_factory=_engine_options)
    overwrite: bool = False
    preview: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"Unknown task '{self.task}'. Choose one of: {', '.join(TASKS)}.")
        if isinstance(self.engine, dict):
            self.engine = _engine_options(self.engine)
        wanted = [output.name for output in self.spec.outputs]
        if sorted(self.outputs) != sorted(wanted):
            raise InputError(f"A {self.spec.command} job writes the outputs {', '.join(wanted)}.")
        self.inputs = {role: str(path) for role, path in self.inputs.items() if path is not None}
        self.outputs = {name: str(path) for name, path in self.outputs.items()}

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["engine"] = asdict(self.engine)
        return {"version": JOB_VERSION, **data}

    def write(self, path: str | Path) -> Path:
        """Write the job as JSON (atomically)."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
        temporary.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(temporary, path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> Job:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ReadError(f"Cannot read the job file '{path}': {error}") from None
        if not isinstance(data, dict) or data.pop("version", None) != JOB_VERSION:
            raise InputError(f"'{path}' is not a MedDiffFM job file (version {JOB_VERSION}).")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"Unknown key(s) in the job file '{path}': {', '.join(unknown)}.")
        return cls(**data)


def output_path_beside(output: str | Path, name: str) -> Path:
    """``output`` with ``_<name>`` before its extension (``map.nii.gz`` -> ``map_mask.nii.gz``)."""
    path = Path(output)
    for extension in WRITE_EXTENSIONS:
        if path.name.lower().endswith(extension):
            return path.with_name(path.name[: -len(extension)] + f"_{name}" + extension)
    return path.with_name(f"{path.name}_{name}")


def write_all(outputs: list[tuple[Volume, str | Path]], overwrite: bool) -> None:
    """Write every output atomically; if one fails, remove those already written by this call."""
    written: list[Path] = []
    try:
        for volume, path in outputs:
            written.append(write_volume(volume, path, overwrite))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def run_job(
    job: Job,
    engine_factory: Callable[[EngineOptions], Engine],
    progress: Callable[[int, int, str], None] | None = None,
    cancel: Any = None,
) -> TaskResult:
    """Run ``job``: check, read, run (engine from ``engine_factory``), write. Returns the result."""
    spec = job.spec
    engine_options = replace(job.engine, controlnet_task=spec.controlnet_task).for_task(spec.key, job.preview)
    settings = spec.resolve(spec.preview_settings(job.settings) if job.preview else job.settings)
    if job.preview:
        engine_options = replace(engine_options, overlap=min(engine_options.overlap, PREVIEW_OVERLAP))
    spec.check_inputs(job.inputs)
    resolved = {Path(path).resolve() for path in job.outputs.values()}
    if len(resolved) < len(job.outputs):
        raise InputError(f"The {' and '.join(job.outputs)} of {spec.command} need different output files.")
    for path in job.outputs.values():
        check_writable(path, job.overwrite)
    inputs = {
        role: read_volume(path, job.series_uid if role == "ct" else None) for role, path in job.inputs.items() if path
    }
    engine = engine_factory(engine_options)
    result = spec.run(engine, inputs, settings, job.region, job.seed, progress, cancel)
    result.message = "; ".join(part for part in (f"model {engine.name}", result.message) if part)
    write_all([(result.volumes[name], path) for name, path in job.outputs.items()], job.overwrite)
    return result
