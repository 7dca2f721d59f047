"""The module's logic: MedDiff-FM tasks on MRML nodes, in this process or in a child process.

:class:`TaskLogic` is free of Qt (it imports only MRML, numpy and MedDiffFMLib), so it runs in the
Slicer application, in ``Slicer --no-main-window --python-script`` and headlessly with ``slicer-core``.
The module's ``MedDiffFMLogic`` (in ``MedDiffFM.py``) adds Slicer's parameter node on top of it.

Every task is defined once in the library (:data:`MedDiffFMLib.task_spec.TASKS`: inputs, settings,
outputs); a run is described by a :class:`TaskParameters` and can go two ways that create the same nodes:

* in this process (:meth:`TaskLogic.run`, and one method per task such as :meth:`TaskLogic.denoise`):
  nodes -> :class:`~MedDiffFMLib.volume.Volume` -> the task's ``run`` -> new nodes;
* in a child process (:meth:`TaskLogic.start` then :meth:`TaskLogic.finish`, used by the panel): the
  inputs are written as NRRD and a :class:`~MedDiffFMLib.job.Job` file into the job's temporary folder,
  ``python -m MedDiffFMLib.cli run job.json`` runs there (see :mod:`.runner`), and the outputs are read
  back onto the input's exact grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import slicer

from MedDiffFMLib.errors import CancelledError, InputError, MedDiffFMError
from MedDiffFMLib.job import Job
from MedDiffFMLib.preprocessing import REGIONS
from MedDiffFMLib.progress import CancelToken, no_progress
from MedDiffFMLib.region import region_from_anatomy
from MedDiffFMLib.task_spec import PREVIEW_OVERLAP, TASKS, TaskSpec
from MedDiffFMLib.tasks.engine import EngineOptions, build_engine
from MedDiffFMLib.volume import Volume, read_volume, write_volume

from . import nodes
from .runner import ChildJob, RunOutcome

logger = logging.getLogger(__name__)


ANOMALY_COLOR_NODES = (
    "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
    "vtkMRMLProceduralColorNodeRedGreenBlue",
    "vtkMRMLColorTableNodeRainbow",
)
ANOMALY_COLOR = (1.0, 0.2, 0.1)
LESION_COLOR = (0.9, 0.8, 0.1)
REQUIRED_SETTING_MESSAGES = {"organs": "Choose at least one organ to inspect (for example liver)."}


def task_available(task: str) -> bool:
    """True when the installed MedDiffFMLib provides the task's ``run`` function."""
    try:
        TASKS[task].runner_function()
    except AttributeError:
        return False
    return True


def available_tasks() -> list[str]:
    return [key for key in TASKS if task_available(key)]


@dataclass
class TaskParameters:
    """One task run: the task, its input nodes, its ``settings`` and how to compute.

    ``settings`` holds the task's settings by name (:class:`~MedDiffFMLib.task_spec.Setting`: ``steps``,
    ``sigma_n``, ``organs``, ...); those missing or None take the task's defaults. ``region`` None:
    detected (or read from the anatomy where the task needs it). ``preview``: the task's fast preview
    (:attr:`~MedDiffFMLib.task_spec.TaskSpec.preview`).
    """

    task: str
    volume: Any = None
    anatomy: Any = None
    lesion_segmentation: Any = None
    lesion_segment_id: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    region: str | None = None
    seed: int = 0
    device: str = "auto"
    overlap: float = 0.5
    batch_size: int = 4
    compile: bool = False
    model: str | None = None
    controlnet: str | None = None
    untrained: str | None = None
    preview: bool = False

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    def given_settings(self) -> dict[str, Any]:
        """The settings that are set (not None): the others are the task's defaults."""
        return {name: value for name, value in self.settings.items() if value is not None}

    def run_settings(self) -> dict[str, Any]:
        """The settings a run uses: the given ones, with the fast preview's where asked for."""
        given = self.given_settings()
        return self.spec.preview_settings(given) if self.preview else given

    def with_changes(self, **changes) -> TaskParameters:
        return replace(self, **changes)


@dataclass
class TaskResult:
    """The nodes a task created (``outputs`` by role: ``volume``, ``map``, ``mask``) and a one-line summary."""

    task: str
    outputs: dict[str, Any]
    summary: str = ""
    log: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> list:
        return list(self.outputs.values())


@dataclass
class PreparedInputs:
    """The task's inputs as library volumes, plus the node that results are placed next to."""

    ct: Volume | None = None
    anatomy: Volume | None = None
    lesion: Volume | None = None
    region: str | None = None
    reference_node: Any = None
    base_name: str = ""

    def volumes(self) -> dict[str, Volume]:
        """The inputs by role (``ct``, ``anatomy``, ``lesion``) that are given."""
        given = {"ct": self.ct, "anatomy": self.anatomy, "lesion": self.lesion}
        return {role: volume for role, volume in given.items() if volume is not None}


@dataclass
class RunningTask:
    """A task running in a child process (see :meth:`TaskLogic.start`)."""

    parameters: TaskParameters
    inputs: PreparedInputs
    job: ChildJob
    outputs: dict[str, str]

    def poll(self) -> list[dict]:
        return self.job.poll()

    @property
    def finished(self) -> bool:
        return self.job.finished

    @property
    def progress(self) -> tuple[int, int, str] | None:
        return self.job.progress

    def cancel(self) -> None:
        self.job.cancel()


class TaskLogic:
    """MedDiff-FM tasks on MRML nodes (see the module docstring). ``scene`` defaults to ``slicer.mrmlScene``."""

    def __init__(self, scene=None) -> None:
        self._scene = scene
        self._engines: dict[tuple, Any] = {}

    @property
    def scene(self):
        return self._scene or slicer.mrmlScene

    # ----------------------------------------------------------------------------------------------
    # Checking and converting inputs
    # ----------------------------------------------------------------------------------------------

    def validate(self, parameters: TaskParameters) -> None:
        """Raise :class:`InputError` naming what is missing, before any work starts."""
        if parameters.task not in TASKS:
            raise InputError(f"Unknown task '{parameters.task}'. Choose one of: {', '.join(TASKS)}.")
        spec = parameters.spec
        if not task_available(parameters.task):
            raise InputError(f"'{spec.label}' needs a newer MedDiffFMLib (it has no '{spec.runner}' yet). Update it.")
        if spec.role("ct") and parameters.volume is None:
            raise InputError(f"'{spec.label}' needs a CT volume: choose one under Inputs.")
        if parameters.volume is not None and not parameters.volume.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"'{parameters.volume.GetName()}' is not a scalar volume.")
        anatomy = spec.role("anatomy")
        if anatomy is not None and anatomy.required and parameters.anatomy is None:
            raise InputError(
                f"'{spec.label}' needs an anatomy segmentation: choose one, or compute it with TotalSegmentator."
            )
        if spec.role("lesion") and (parameters.lesion_segmentation is None or not parameters.lesion_segment_id):
            raise InputError(f"'{spec.label}' needs a lesion segment: draw it in the Segment Editor and choose it.")
        for setting in spec.settings:
            if setting.required and not parameters.settings.get(setting.name):
                raise InputError(REQUIRED_SETTING_MESSAGES.get(setting.name, f"'{spec.label}' needs {setting.help}."))
        spec.resolve(parameters.given_settings())
        if parameters.region is not None and parameters.region not in REGIONS:
            raise InputError(f"Unknown region '{parameters.region}'. Choose one of: {', '.join(REGIONS)}.")

    def prepare(self, parameters: TaskParameters) -> PreparedInputs:
        """Convert the input nodes to library volumes on the right grids."""
        self.validate(parameters)
        spec = parameters.spec
        takes_ct = spec.role("ct") is not None
        prepared = PreparedInputs(region=parameters.region)
        volume_node = parameters.volume
        if volume_node is not None and (takes_ct or spec.grid_from_volume):
            if takes_ct:
                prepared.ct = nodes.volume_from_node(volume_node)
            prepared.reference_node = volume_node
            prepared.base_name = volume_node.GetName()
        if parameters.anatomy is not None and spec.role("anatomy") is not None:
            reference = volume_node if (takes_ct or spec.grid_from_volume) else None
            prepared.anatomy = nodes.anatomy_from_node(parameters.anatomy, reference, self.scene)
            if prepared.reference_node is None:
                prepared.reference_node = parameters.anatomy
                prepared.base_name = parameters.anatomy.GetName()
        if spec.role("lesion") is not None:
            grid = prepared.ct if prepared.ct is not None else prepared.anatomy
            grid_node = volume_node if prepared.ct is not None else None
            prepared.lesion = self._mask_on(
                parameters.lesion_segmentation, parameters.lesion_segment_id, grid, grid_node, prepared.reference_node
            )
        if spec.region_required and prepared.region is None:
            prepared.region = region_from_anatomy(prepared.anatomy.array) if prepared.anatomy is not None else None
            if prepared.region is None:
                raise InputError(
                    f"'{spec.label}' needs the region: the anatomy does not show it, so choose Head & neck, Chest "
                    "or Abdomen."
                )
        return prepared

    def _mask_on(self, segmentation, segment_id: str, grid: Volume, grid_node, placed_with) -> Volume:
        """The segment as a mask on ``grid``: exported onto ``grid_node`` when that volume node has this grid,
        else onto a temporary node of the grid under the same transform as ``placed_with``."""
        if grid_node is not None:
            return nodes.mask_from_segment(segmentation, segment_id, grid_node)
        reference = nodes.node_from_volume(
            grid.with_array(np.zeros(grid.array.shape, np.uint8)),
            "MedDiffFM grid",
            "vtkMRMLLabelMapVolumeNode",
            self.scene,
        )
        if placed_with is not None:
            reference.SetAndObserveTransformNodeID(placed_with.GetTransformNodeID())
        try:
            return nodes.mask_from_segment(segmentation, segment_id, reference)
        finally:
            if reference.GetDisplayNode() is not None:
                self.scene.RemoveNode(reference.GetDisplayNode())
            self.scene.RemoveNode(reference)

    # ----------------------------------------------------------------------------------------------
    # In this process
    # ----------------------------------------------------------------------------------------------

    def engine(self, parameters: TaskParameters):
        """The :class:`~MedDiffFMLib.tasks.Engine` for the parameters' model, ControlNet and device (the last
        one is kept loaded)."""
        options = self.engine_options(parameters)
        if options not in self._engines:
            self._engines.clear()
            self._engines[options] = build_engine(options)
        return self._engines[options]

    @staticmethod
    def engine_options(parameters: TaskParameters) -> EngineOptions:
        """The engine ``parameters`` run on. A ControlNet chosen for another task (the panel keeps the
        hidden choice) is dropped, so that it cannot stop a task without one from picking its model."""
        return EngineOptions(
            model=parameters.model,
            untrained=parameters.untrained,
            controlnet_task=parameters.spec.controlnet_task,
            controlnet=parameters.controlnet if parameters.spec.controlnet_task else None,
            device=parameters.device,
            overlap=min(parameters.overlap, PREVIEW_OVERLAP) if parameters.preview else parameters.overlap,
            batch_size=parameters.batch_size,
            compile=parameters.compile,
            seed=parameters.seed if parameters.untrained else None,
        ).for_task(parameters.spec.key, parameters.preview)

    def run(
        self,
        parameters: TaskParameters,
        engine=None,
        progress: Callable[[int, int, str], None] = no_progress,
        cancel: CancelToken | None = None,
    ) -> TaskResult:
        """Run a task in this process (blocking) and create its output nodes."""
        inputs = self.prepare(parameters)
        engine = engine or self.engine(parameters)
        result = parameters.spec.run(
            engine, inputs.volumes(), parameters.run_settings(), inputs.region, parameters.seed, progress, cancel
        )
        return self._create_outputs(parameters, inputs, result.volumes, result.summary())

    def run_on_volumes(
        self,
        parameters: TaskParameters,
        volumes: list,
        progress: Callable[[int, int, str], None] = no_progress,
        cancel: CancelToken | None = None,
    ) -> list[tuple[Any, TaskResult | MedDiffFMError]]:
        """Run the same task, settings and anatomy/lesion on several CT volumes in turn (one engine).

        Returns ``(volume node, result or error)`` per volume: a volume that fails (wrong grid for the
        anatomy, not a CT, ...) is reported and the others still run. Cancelling stops the batch.
        ``progress`` gets ``(volume index, volume count, message)`` before each volume.
        """
        results = []
        engine = None
        for index, volume in enumerate(volumes):
            progress(index, len(volumes), f"{volume.GetName()} ({index + 1} of {len(volumes)})")
            try:
                single = replace(parameters, volume=volume)
                engine = engine or self.engine(single)
                results.append((volume, self.run(single, engine=engine, cancel=cancel)))
            except CancelledError:
                raise
            except MedDiffFMError as error:
                logger.error("%s: %s", volume.GetName(), error)
                results.append((volume, error))
        progress(len(volumes), len(volumes), "done")
        return results

    # ----------------------------------------------------------------------------------------------
    # In a child process
    # ----------------------------------------------------------------------------------------------

    def start(self, parameters: TaskParameters, python=None, launcher=None, temp_parent=None) -> RunningTask:
        """Write the inputs into a new job folder and start the command line in a child process.

        Call :meth:`RunningTask.poll` regularly (the panel uses a timer), then :meth:`finish`.
        The job folder is removed by :meth:`finish` and by :meth:`RunningTask.cancel`, also when anything fails.
        """
        inputs = self.prepare(parameters)
        job = ChildJob(python=python, launcher=launcher, temp_parent=temp_parent)
        try:
            job_file, outputs = self.write_job(parameters, inputs, job)
            job.start("run", [job_file])
        except BaseException:
            job.cleanup()
            raise
        return RunningTask(parameters, inputs, job, outputs)

    def write_job(self, p: TaskParameters, inputs: PreparedInputs, job: ChildJob) -> tuple[str, dict[str, str]]:
        """Write the inputs as NRRD and the :class:`~MedDiffFMLib.job.Job` file into the job's folder.

        Returns the job file and the output files by name.
        """
        files = {role: str(write_volume(volume, job.path(f"{role}.nrrd"))) for role, volume in inputs.volumes().items()}
        outputs = {output.name: job.path(f"{output.name}.nrrd") for output in p.spec.outputs}
        engine = self.engine_options(p)
        if p.untrained:
            engine = replace(engine, model=None)
        description = Job(
            p.task,
            files,
            outputs,
            p.given_settings(),
            region=inputs.region,
            seed=p.seed,
            engine=engine,
            preview=p.preview,
        )
        return str(description.write(job.path("job.json"))), outputs

    def _check_inputs_still_in_scene(self, parameters: TaskParameters) -> None:
        """Refuse to add results for inputs that left the scene during the run (e.g. the scene was closed)."""
        for node in (parameters.volume, parameters.anatomy, parameters.lesion_segmentation):
            if node is not None and not self.scene.IsNodePresent(node):
                raise InputError(
                    f"'{node.GetName()}' was removed from the scene while MedDiffFM ran (was the scene closed?); "
                    "the results were discarded. Load the data again and press Apply."
                )

    def finish(self, running: RunningTask) -> TaskResult:
        """Read a finished child run's outputs into new nodes; raises with the child's own error message.

        The job's temporary folder is removed in every case.
        """
        try:
            outcome: RunOutcome = running.job.outcome
            if not running.job.finished:
                raise RuntimeError("The MedDiffFM process is still running.")
            if outcome.cancelled:
                raise CancelledError("Cancelled by the user; nothing was written.")
            if not outcome.succeeded:
                raise MedDiffFMError(outcome.error or "The MedDiffFM process failed.")
            self._check_inputs_still_in_scene(running.parameters)
            volumes = {role: read_volume(path) for role, path in running.outputs.items()}
            result = self._create_outputs(running.parameters, running.inputs, volumes, outcome.message)
            result.log = list(outcome.log)
            return result
        finally:
            running.job.cleanup()

    # ----------------------------------------------------------------------------------------------
    # Output nodes
    # ----------------------------------------------------------------------------------------------

    def _on_input_grid(self, volume: Volume, inputs: PreparedInputs) -> Volume:
        """``volume`` with the input's exact geometry when it lies on the input's grid (avoids file round-off)."""
        source = inputs.ct if inputs.ct is not None else inputs.anatomy
        if source is not None and volume.geometry.same_grid(source.geometry):
            return Volume(volume.array, source.spacing, source.origin, source.direction, dict(volume.metadata))
        return volume

    def _create_outputs(self, p: TaskParameters, inputs: PreparedInputs, volumes: dict, summary: str) -> TaskResult:
        """One node per output of the task: a volume (images and difference maps) or a segmentation (masks)."""
        base = inputs.base_name or "MedDiffFM"
        outputs: dict[str, Any] = {}
        reference = inputs.reference_node
        for output in p.spec.outputs:
            volume = self._on_input_grid(volumes[output.name], inputs)
            name = f"{base} {output.suffix}"
            if output.kind == "mask":
                organs = ", ".join(p.settings.get("organs") or [])
                segment = f"{organs} {output.segment}" if organs else output.segment
                node = nodes.segmentation_from_masks([(segment, volume, ANOMALY_COLOR)], name, reference, self.scene)
            elif output.kind == "difference":
                node = nodes.node_from_volume(
                    volume.with_array(volume.array.astype(np.float32)), name, scene=self.scene
                )
                self._show_difference(node, volume)
            else:
                node = nodes.node_from_volume(volume, name, scene=self.scene)
                self._copy_window(node, reference, inputs.region)
            nodes.place_next_to(node, reference)
            node.SetAttribute("MedDiffFM.summary", summary)
            outputs[output.name] = node
        return TaskResult(p.task, outputs, summary)

    def _copy_window(self, node, reference, region: str | None) -> None:
        display = node.GetDisplayNode()
        if display is None:
            return
        source = (
            reference.GetDisplayNode() if reference is not None and reference.IsA("vtkMRMLScalarVolumeNode") else None
        )
        if source is not None and not reference.IsA("vtkMRMLLabelMapVolumeNode"):
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(source.GetWindow(), source.GetLevel())
        elif region in REGIONS:
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(REGIONS[region].width, REGIONS[region].level)

    def _show_difference(self, node, volume: Volume) -> None:
        display = node.GetDisplayNode()
        if display is None:
            return
        for color_id in ANOMALY_COLOR_NODES:
            if self.scene.GetNodeByID(color_id) is not None:
                display.SetAndObserveColorNodeID(color_id)
                break
        values = np.abs(np.asarray(volume.array))
        threshold = float(volume.metadata.get("MedDiffFM_threshold_hu", 0) or 0)
        extent = max(float(values.max()) if values.size else 0.0, threshold, 1.0)
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(2.0 * extent, 0.0)

    # ----------------------------------------------------------------------------------------------
    # One method per task (in this process; for scripts and the Python console)
    # ----------------------------------------------------------------------------------------------

    def _task(self, task: str, engine=None, progress=no_progress, cancel=None, **keywords) -> TaskResult:
        """Run ``task``; ``keywords`` are :class:`TaskParameters` fields and the task's settings by name."""
        own = {f.name for f in fields(TaskParameters)} - {"task", "settings"}
        if "sigma" in keywords and any(setting.name == "sigma_n" for setting in TASKS[task].settings):
            keywords["sigma_n"] = keywords.pop("sigma")  # the keyword's name before the task definitions
        settings = {name: value for name, value in keywords.items() if name not in own}
        unknown = set(settings) - {setting.name for setting in TASKS[task].settings}
        if unknown:
            known = ", ".join(sorted(own | {setting.name for setting in TASKS[task].settings}))
            raise TypeError(f"Unknown setting(s) for {task}: {', '.join(sorted(unknown))}. Known: {known}.")
        parameters = TaskParameters(task, settings=settings, **{k: v for k, v in keywords.items() if k in own})
        return self.run(parameters, engine=engine, progress=progress, cancel=cancel)

    def synthesize(self, anatomyNode, region=None, referenceVolumeNode=None, engine=None, **settings):
        """A synthetic CT node ("<anatomy> synthetic CT") from an anatomy segmentation or label map node."""
        return self._task(
            "synthesize", engine, anatomy=anatomyNode, region=region, volume=referenceVolumeNode, **settings
        ).outputs["volume"]

    def denoise(self, volumeNode, anatomyNode=None, region=None, engine=None, **settings):
        """A denoised copy of a CT node ("<CT> denoised")."""
        return self._task("denoise", engine, volume=volumeNode, anatomy=anatomyNode, region=region, **settings).outputs[
            "volume"
        ]

    def detectAnomalies(self, volumeNode, anatomyNode, organs, region=None, engine=None, **settings):
        """``(anomaly map volume node, anomaly segmentation node)``: "<CT> anomaly map" and "<CT> anomalies"."""
        outputs = self._task(
            "detect_anomalies",
            engine,
            volume=volumeNode,
            anatomy=anatomyNode,
            organs=[organs] if isinstance(organs, str) else list(organs),
            region=region,
            **settings,
        ).outputs
        return outputs["map"], outputs["mask"]

    def superResolve(self, volumeNode, spacing=1.0, engine=None, **settings):
        """A thin-slice CT node ("<CT> super-resolved") with ``spacing`` mm along z."""
        return self._task("super_resolve", engine, volume=volumeNode, spacing=spacing, **settings).outputs["volume"]

    def generateLesion(
        self,
        anatomyNode,
        lesionSegmentationNode,
        lesionSegmentId,
        region=None,
        referenceVolumeNode=None,
        engine=None,
        **settings,
    ):
        """A synthetic CT with a lesion in the given segment ("<anatomy> synthetic lesion CT")."""
        return self._task(
            "generate_lesion",
            engine,
            anatomy=anatomyNode,
            lesion_segmentation=lesionSegmentationNode,
            lesion_segment_id=lesionSegmentId,
            region=region,
            volume=referenceVolumeNode,
            **settings,
        ).outputs["volume"]

    def inpaintLesion(self, volumeNode, lesionSegmentationNode, lesionSegmentId, engine=None, **settings):
        """The CT with a lesion painted inside the segment ("<CT> lesion inpainted"); other voxels unchanged."""
        return self._task(
            "inpaint_lesion",
            engine,
            volume=volumeNode,
            lesion_segmentation=lesionSegmentationNode,
            lesion_segment_id=lesionSegmentId,
            **settings,
        ).outputs["volume"]
