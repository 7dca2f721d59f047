"""The module's logic: MedDiff-FM tasks on MRML nodes, in this process or in a child process.

:class:`TaskLogic` is free of Qt (it imports only MRML, numpy and MedDiffFMLib), so it runs in the
Slicer application, in ``Slicer --no-main-window --python-script`` and headlessly with ``slicer-core``.
The module's ``MedDiffFMLogic`` (in ``MedDiffFM.py``) adds Slicer's parameter node on top of it.

Every task is described by a :class:`TaskParameters` and can run two ways that create the same nodes:

* in this process (:meth:`TaskLogic.run`, and one method per task such as :meth:`TaskLogic.denoise`):
  nodes -> :class:`~MedDiffFMLib.volume.Volume` -> library task -> new nodes;
* in a child process (:meth:`TaskLogic.start` then :meth:`TaskLogic.finish`, used by the panel): the
  inputs are written as NRRD into the job's temporary folder, ``python -m MedDiffFMLib.cli`` runs there
  (see :mod:`.runner`), and the outputs are read back onto the input's exact grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import slicer

import MedDiffFMLib.tasks as library_tasks
from MedDiffFMLib.errors import CancelledError, InputError, MedDiffFMError
from MedDiffFMLib.preprocessing import REGIONS
from MedDiffFMLib.progress import CancelToken, no_progress
from MedDiffFMLib.region import region_from_anatomy
from MedDiffFMLib.tasks.engine import EngineOptions, build_engine
from MedDiffFMLib.volume import Volume, read_volume, write_volume

from . import nodes
from .runner import ChildJob, RunOutcome
from .taskinfo import TASKS, TaskInfo

logger = logging.getLogger(__name__)


ANOMALY_COLOR_NODES = (
    "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
    "vtkMRMLProceduralColorNodeRedGreenBlue",
    "vtkMRMLColorTableNodeRainbow",
)
ANOMALY_COLOR = (1.0, 0.2, 0.1)
LESION_COLOR = (0.9, 0.8, 0.1)


def task_available(task: str) -> bool:
    """True when the installed MedDiffFMLib provides the task's function."""
    return hasattr(library_tasks, TASKS[task].function)


def available_tasks() -> list[str]:
    return [key for key in TASKS if task_available(key)]


def _given(**settings: Any) -> dict[str, Any]:
    """The settings that are not None: the others are left to the library's defaults."""
    return {name: value for name, value in settings.items() if value is not None}


@dataclass
class TaskParameters:
    """Inputs and settings of one task run (``None`` means "the task's default" or "automatic")."""

    task: str
    volume: Any = None
    anatomy: Any = None
    lesion_segmentation: Any = None
    lesion_segment_id: str = ""
    organs: list[str] = field(default_factory=list)
    region: str | None = None
    steps: int | None = None
    sampler: str = "ddim"
    eta: float = 1.0
    sigma: float | str | None = None
    lam: float | None = None
    zeta: float | None = None
    t: int = 950
    threshold: float | None = None
    draws: int = 1
    spacing: float = 1.0
    jump_length: int = 10
    jump_count: int = 1
    margin_mm: float = 0.0
    seed: int = 0
    device: str = "auto"
    overlap: float = 0.5
    batch_size: int = 4
    compile: bool = False
    model: str | None = None
    controlnet: str | None = None
    untrained: str | None = None

    @property
    def info(self) -> TaskInfo:
        return TASKS[self.task]

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
        info = parameters.info
        if not task_available(parameters.task):
            raise InputError(
                f"'{info.label}' needs a newer MedDiffFMLib (it has no '{info.function}' yet). Update the extension."
            )
        if info.needs_volume and parameters.volume is None:
            raise InputError(f"'{info.label}' needs a CT volume: choose one under Inputs.")
        if parameters.volume is not None and not parameters.volume.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"'{parameters.volume.GetName()}' is not a scalar volume.")
        if info.anatomy == "required" and parameters.anatomy is None:
            raise InputError(
                f"'{info.label}' needs an anatomy segmentation: choose one, or compute it with TotalSegmentator."
            )
        if info.needs_lesion and (parameters.lesion_segmentation is None or not parameters.lesion_segment_id):
            raise InputError(f"'{info.label}' needs a lesion segment: draw it in the Segment Editor and choose it.")
        if info.needs_organs and not parameters.organs:
            raise InputError("Choose at least one organ to inspect (for example liver).")
        if parameters.region is not None and parameters.region not in REGIONS:
            raise InputError(f"Unknown region '{parameters.region}'. Choose one of: {', '.join(REGIONS)}.")

    def prepare(self, parameters: TaskParameters) -> PreparedInputs:
        """Convert the input nodes to library volumes on the right grids."""
        self.validate(parameters)
        info = parameters.info
        prepared = PreparedInputs(region=parameters.region)
        volume_node = parameters.volume
        if volume_node is not None and (info.needs_volume or info.volume_is_grid_only):
            if info.needs_volume:
                prepared.ct = nodes.volume_from_node(volume_node)
            prepared.reference_node = volume_node
            prepared.base_name = volume_node.GetName()
        if parameters.anatomy is not None and info.anatomy != "no":
            reference = volume_node if (info.needs_volume or info.volume_is_grid_only) else None
            prepared.anatomy = nodes.anatomy_from_node(parameters.anatomy, reference, self.scene)
            if prepared.reference_node is None:
                prepared.reference_node = parameters.anatomy
                prepared.base_name = parameters.anatomy.GetName()
        if info.needs_lesion:
            grid = prepared.ct if prepared.ct is not None else prepared.anatomy
            grid_node = volume_node if prepared.ct is not None else None
            prepared.lesion = self._mask_on(
                parameters.lesion_segmentation, parameters.lesion_segment_id, grid, grid_node, prepared.reference_node
            )
        if info.region_required and prepared.region is None:
            prepared.region = region_from_anatomy(prepared.anatomy.array) if prepared.anatomy is not None else None
            if prepared.region is None:
                raise InputError(
                    f"'{info.label}' needs the region: the anatomy does not show it, so choose Head & neck, Chest "
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
        options = EngineOptions(
            model=parameters.model,
            untrained=parameters.untrained,
            controlnet_task=parameters.info.controlnet_task,
            controlnet=parameters.controlnet,
            device=parameters.device,
            overlap=parameters.overlap,
            batch_size=parameters.batch_size,
            compile=parameters.compile,
            seed=parameters.seed if parameters.untrained else None,
        )
        if options not in self._engines:
            self._engines.clear()
            self._engines[options] = build_engine(options)
        return self._engines[options]

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
        volumes, summary = self._call_library(parameters, inputs, engine, progress, cancel)
        return self._create_outputs(parameters, inputs, volumes, summary)

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

    def _call_library(self, p: TaskParameters, inputs: PreparedInputs, engine, progress, cancel):
        info = p.info
        function = getattr(library_tasks, info.function)
        steps = p.steps or info.default_steps
        common = dict(seed=p.seed, progress=progress, cancel=cancel)
        if p.task == "synthesize":
            volume = function(
                inputs.anatomy, inputs.region, engine, sampler=p.sampler, steps=steps, eta=p.eta, **common
            )
            return {"volume": volume}, f"synthesised a {inputs.region} CT of shape {volume.array.shape}"
        if p.task == "denoise":
            result = function(
                inputs.ct,
                engine,
                region=inputs.region,
                anatomy=inputs.anatomy,
                steps=steps,
                **_given(sigma_n=p.sigma, lam=p.lam, zeta=p.zeta),
                **common,
            )
            summary = (
                f"region {result.region} ({result.region_source}), sigma_n {result.sigma_n:.4f}, t_start "
                f"{result.t_start}, {result.network_evaluations} window evaluations"
            )
            return {"volume": result.volume}, summary
        if p.task == "detect_anomalies":
            result = function(
                inputs.ct,
                inputs.anatomy,
                list(p.organs),
                engine,
                region=inputs.region,
                t=p.t,
                threshold=p.threshold,
                draws=p.draws,
                **common,
            )
            summary = f"threshold {result.threshold:.1f} HU, {int(result.anomaly_mask.array.sum())} anomalous voxels"
            return {"map": result.anomaly_map, "mask": result.anomaly_mask}, summary
        if p.task == "super_resolve":
            volume = function(
                inputs.ct,
                engine,
                spacing=p.spacing,
                steps=steps,
                **_given(sigma_n=None if p.sigma == "auto" else p.sigma, lam=p.lam, zeta=p.zeta),
                region=inputs.region,
                **common,
            )
            return {"volume": volume}, f"super-resolved to {volume.spacing[2]:g} mm slices, shape {volume.array.shape}"
        if p.task == "generate_lesion":
            volume = function(
                inputs.anatomy,
                inputs.lesion,
                inputs.region,
                engine,
                sampler=p.sampler,
                steps=steps,
                eta=p.eta,
                **common,
            )
            return {"volume": volume}, f"generated a {inputs.region} CT with a lesion"
        if p.task == "inpaint_lesion":
            volume = function(
                inputs.ct,
                inputs.lesion,
                engine,
                region=inputs.region,
                anatomy=inputs.anatomy,
                steps=steps,
                jump_length=p.jump_length,
                jump_count=p.jump_count,
                margin_mm=p.margin_mm,
                **common,
            )
            return {"volume": volume}, f"inpainted a lesion of {int(inputs.lesion.array.sum())} voxels"
        raise InputError(f"Unknown task '{p.task}'.")

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
            positional, options, outputs = self._command_line(parameters, inputs, job)
            job.start(parameters.info.command, positional, options)
        except BaseException:
            job.cleanup()
            raise
        return RunningTask(parameters, inputs, job, outputs)

    def _command_line(self, p: TaskParameters, inputs: PreparedInputs, job: ChildJob):
        info = p.info
        files: dict[str, str] = {}
        for role, volume in (("ct", inputs.ct), ("anatomy", inputs.anatomy), ("lesion", inputs.lesion)):
            if volume is not None:
                files[role] = str(write_volume(volume, job.path(f"{role}.nrrd")))
        outputs = {"volume": job.path("output.nrrd")}
        options: dict[str, Any] = {}
        steps = p.steps or info.default_steps
        if p.task == "synthesize":
            positional = [files["anatomy"], outputs["volume"]]
            options.update({"--region": inputs.region, "--sampler": p.sampler, "--steps": steps, "--eta": p.eta})
        elif p.task == "denoise":
            positional = [files["ct"], outputs["volume"]]
            options.update(
                {
                    "--anatomy": files.get("anatomy"),
                    "--region": inputs.region,
                    "--sigma": "auto" if p.sigma is None else p.sigma,
                    "--lam": p.lam,
                    "--steps": steps,
                    "--zeta": p.zeta,
                }
            )
        elif p.task == "detect_anomalies":
            outputs = {"map": job.path("anomaly_map.nrrd"), "mask": job.path("anomaly_mask.nrrd")}
            positional = [files["ct"], outputs["map"]]
            options.update(
                {
                    "--anatomy": files["anatomy"],
                    "--organ": list(p.organs),
                    "--mask-output": outputs["mask"],
                    "--region": inputs.region,
                    "--t": p.t,
                    "--threshold": p.threshold,
                    "--draws": p.draws,
                }
            )
        elif p.task == "super_resolve":
            positional = [files["ct"], outputs["volume"]]
            options.update(
                {
                    "--spacing": p.spacing,
                    "--steps": steps,
                    "--sigma": None if p.sigma in (None, "auto") else p.sigma,
                    "--lam": p.lam,
                    "--zeta": p.zeta,
                    "--controlnet": p.controlnet,
                    "--region": inputs.region,
                }
            )
        elif p.task == "generate_lesion":
            positional = [files["anatomy"], outputs["volume"]]
            options.update(
                {
                    "--lesion": files["lesion"],
                    "--region": inputs.region,
                    "--controlnet": p.controlnet,
                    "--sampler": p.sampler,
                    "--steps": steps,
                    "--eta": p.eta,
                }
            )
        else:  # inpaint_lesion
            positional = [files["ct"], outputs["volume"]]
            options.update(
                {
                    "--lesion": files["lesion"],
                    "--anatomy": files.get("anatomy"),
                    "--region": inputs.region,
                    "--controlnet": p.controlnet,
                    "--steps": steps,
                    "--jump-length": p.jump_length,
                    "--jump-count": p.jump_count,
                    "--margin": p.margin_mm,
                }
            )
        options.update(
            {
                "--model": None if p.untrained else p.model,
                "--untrained": p.untrained,
                "--device": p.device,
                "--overlap": p.overlap,
                "--batch-size": p.batch_size,
                "--compile": p.compile,
                "--seed": p.seed,
            }
        )
        return positional, options, outputs

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
        base = inputs.base_name or "MedDiffFM"
        outputs: dict[str, Any] = {}
        reference = inputs.reference_node
        if p.task == "detect_anomalies":
            anomaly_map = self._on_input_grid(volumes["map"], inputs)
            map_node = nodes.node_from_volume(
                anomaly_map.with_array(anomaly_map.array.astype(np.float32)), f"{base} anomaly map", scene=self.scene
            )
            self._show_anomaly_map(map_node, anomaly_map)
            mask = self._on_input_grid(volumes["mask"], inputs)
            organs = ", ".join(p.organs)
            mask_node = nodes.segmentation_from_masks(
                [(f"{organs} anomaly", mask, ANOMALY_COLOR)], f"{base} anomalies", reference, self.scene
            )
            outputs = {"map": map_node, "mask": mask_node}
        else:
            suffix = {
                "synthesize": "synthetic CT",
                "denoise": "denoised",
                "super_resolve": "super-resolved",
                "generate_lesion": "synthetic lesion CT",
                "inpaint_lesion": "lesion inpainted",
            }[p.task]
            volume = self._on_input_grid(volumes["volume"], inputs)
            node = nodes.node_from_volume(volume, f"{base} {suffix}", scene=self.scene)
            self._copy_window(node, reference, inputs.region)
            outputs = {"volume": node}
        for node in outputs.values():
            nodes.place_next_to(node, reference)
            node.SetAttribute("MedDiffFM.summary", summary)
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

    def _show_anomaly_map(self, node, volume: Volume) -> None:
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

    def _task(self, task: str, engine=None, progress=no_progress, cancel=None, **settings) -> TaskResult:
        known = {f.name for f in fields(TaskParameters)}
        unknown = set(settings) - known
        if unknown:
            raise TypeError(f"Unknown setting(s) for {task}: {', '.join(sorted(unknown))}")
        return self.run(TaskParameters(task=task, **settings), engine=engine, progress=progress, cancel=cancel)

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
