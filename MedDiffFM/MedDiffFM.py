"""MedDiffFM: the MedDiff-FM diffusion foundation model for CT in 3D Slicer.

The module is thin on purpose. What it does lives in ``MedDiffFMSlicer`` (no Qt): task descriptions
(``taskinfo``), MRML <-> volume conversion (``nodes``), the task logic (``logic``), the child-process
runner (``runner``), model management (``models``) and dependency installation (``dependencies``).
This file holds the Slicer module, the panel (loaded from ``Resources/UI/MedDiffFM.ui``), the logic
with the scene's parameter node, and the module test that runs inside Slicer.

Headless use (Slicer's Python console, or ``Slicer --no-main-window --python-script``)::

    import MedDiffFM
    logic = MedDiffFM.MedDiffFMLogic()  # or slicer.util.getModuleLogic("MedDiffFM") when the panel exists
    denoised = logic.denoise(slicer.util.getNode("CT"), steps=10)
    anomalyMap, anomalies = logic.detectAnomalies(ctNode, anatomySegmentationNode, ["liver"])
"""

import dataclasses
import inspect
import logging
import os
import shutil
import sys
import time
from typing import Annotated, Union

import qt
import slicer
import vtk
from MedDiffFMSlicer import dependencies
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

dependencies.put_library_on_path(os.path.dirname(os.path.abspath(__file__)))

from MedDiffFMSlicer.taskinfo import (  # noqa: E402 - the task definitions come from MedDiffFMLib, put on the path above
    DEVICE_LABELS,
    REGION_LABELS,
    SAMPLER_LABELS,
    START_LABELS,
    TASK_ROWS,
    TASKS,
    anatomy_use,
    panel_settings,
    rows_of_task,
    task_for_label,
)

SETTINGS = "MedDiffFM"
TIMER_INTERVAL_MS = 200
PAPER = (
    'Yongrui Yu, Yannian Gu, Shaoting Zhang, Xiaofan Zhang: "MedDiff-FM: A Diffusion-based Foundation Model for '
    'Versatile Medical Image Applications".'
)


#
# Module
#


class MedDiffFM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDiff-FM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDiffFM developers (https://github.com/meddifffm/SlicerMedDiffFM)"]
        self.parent.helpText = _(
            "A diffusion foundation model for CT: synthesize a CT from an anatomy segmentation, denoise low-dose CT, "
            "detect anomalies in an organ, super-resolve thick slices, generate a lesion, or paint a lesion into a "
            "real CT (drawn as a segment in the Segment Editor).<br>"
            "Choose a task and its inputs and press Apply: the work runs in the background (Apply becomes Cancel) "
            "and the results arrive as new nodes next to the input. "
            'See the <a href="https://github.com/meddifffm/SlicerMedDiffFM">documentation</a>, including '
            "Troubleshooting."
        )
        self.parent.acknowledgementText = _(
            "MedDiffFM implements the method of {paper} If you use it in your research, please cite that paper. "
            "Built on PyTorch and MONAI; the anatomy conditions follow TotalSegmentator v2 classes."
        ).format(paper=PAPER)


#
# Parameter node
#


@parameterNodeWrapper
class MedDiffFMParameterNode:
    """The panel's state, saved with the scene. Names match the ``SlicerParameterName`` properties in the .ui."""

    task: Annotated[str, Choice([info.label for info in TASKS.values()]), Default("Denoise")]
    inputVolume: vtkMRMLScalarVolumeNode
    anatomy: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007 - wrapper needs Union
    lesionSegmentation: vtkMRMLSegmentationNode
    lesionSegmentID: str
    organs: list[str]
    region: Annotated[str, Choice(list(REGION_LABELS)), Default("Auto")]
    spacing: Annotated[float, WithinRange(0.1, 10.0), Default(1.0)]
    steps: Annotated[int, WithinRange(0, 1000), Default(0)]
    sampler: Annotated[str, Choice(list(SAMPLER_LABELS)), Default("DDIM")]
    eta: Annotated[float, WithinRange(0.0, 1.0), Default(1.0)]
    startFrom: Annotated[str, Choice(list(START_LABELS)), Default("Automatic")]
    typicalHu: str
    sigmaAuto: Annotated[bool, Default(True)]
    sigma: Annotated[float, WithinRange(0.0001, 2.0), Default(0.03)]
    lam: Annotated[float, WithinRange(0.0, 1000.0), Default(0.0)]
    t: Annotated[int, WithinRange(0, 999), Default(600)]
    thresholdAuto: Annotated[bool, Default(True)]
    threshold: Annotated[float, WithinRange(0.0, 4000.0), Default(50.0)]
    jumpLength: Annotated[int, WithinRange(0, 100), Default(10)]
    jumpCount: Annotated[int, WithinRange(0, 20), Default(1)]
    margin: Annotated[float, WithinRange(0.0, 30.0), Default(0.0)]
    draws: Annotated[int, WithinRange(1, 64), Default(1)]
    organOnly: Annotated[bool, Default(False)]
    seed: Annotated[int, WithinRange(0, 2147483647), Default(0)]
    device: Annotated[str, Choice(list(DEVICE_LABELS)), Default("Auto")]
    overlap: Annotated[float, WithinRange(0.0, 0.9), Default(0.5)]
    batchSize: Annotated[int, WithinRange(1, 64), Default(4)]
    compileNetwork: Annotated[bool, Default(False)]
    preview: Annotated[bool, Default(False)]
    model: str
    controlNet: str


#
# Widget
#


class MedDiffFMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = None
        self._queue = []
        self._batch = {"count": 1, "failed": []}
        self._installer = None
        self._startTime = 0.0
        self._updatingGui = False

    # ----------------------------------------------------------------------------------------------
    # Set-up
    # ----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDiffFM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDiffFMLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(TIMER_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.updateTaskRows)
        self.ui.lesionSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onLesionChanged)
        self.ui.lesionSegmentSelector.connect("currentSegmentChanged(QString)", self.onLesionChanged)
        self.ui.organsComboBox.connect("checkedIndexesChanged()", self.onOrgansChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.controlNetComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.sigmaAutoCheckBox.connect("toggled(bool)", self.updateEnabled)
        self.ui.thresholdAutoCheckBox.connect("toggled(bool)", self.updateEnabled)
        self.ui.computeAnatomyButton.connect("clicked(bool)", self.onComputeAnatomy)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.installModelButton.connect("clicked(bool)", self.onInstallModel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.cacheFolderButton.connect("directoryChanged(QString)", self.onCacheFolderChanged)
        self.ui.openCacheFolderButton.connect("clicked(bool)", self.onOpenCacheFolder)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.showLogButton.connect("toggled(bool)", self.ui.logTextEdit.setVisible)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.ui.computeAnatomyButton.enabled = hasattr(slicer.modules, "totalsegmentator")
        if not self.ui.computeAnatomyButton.enabled:
            self.ui.computeAnatomyButton.toolTip = _(
                "Install the TotalSegmentator extension (Extensions Manager) to compute the anatomy here."
            )
        cacheFolder = slicer.util.settingsValue(f"{SETTINGS}/CacheFolder", "")
        if cacheFolder:
            os.environ["MEDDIFFFM_HOME"] = cacheFolder
        self.updateDependencyStatus()
        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        if self._running is not None and not self._running.finished:
            self._running.cancel()
        self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._queue = []
        if self._running is not None and not self._running.finished:
            self._running.cancel()
            self._finishRun()
            self.setStatus(_("Cancelled because the scene was closed; nothing was created."))
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        isNew = slicer.mrmlScene.GetSingletonNode(self.logic.moduleName, "vtkMRMLScriptedModuleNode") is None
        parameterNode = self.logic.getParameterNode()
        if isNew:  # a new scene starts from the last run's model and device; a loaded one keeps its own
            parameterNode.model = slicer.util.settingsValue(f"{SETTINGS}/Model", "")
            lastDevice = slicer.util.settingsValue(f"{SETTINGS}/Device", "Auto")
            parameterNode.device = lastDevice if lastDevice in DEVICE_LABELS else "Auto"
        if not parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                parameterNode.inputVolume = first
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.syncUnboundWidgets()
            self.updateTaskRows()

    def onParameterNodeModified(self, *args) -> None:
        """A scene loaded or a script set the parameters: show them in the widgets connectGui does not bind."""
        if not self._updatingGui:
            self.syncUnboundWidgets()
        self.updateEnabled()

    def syncUnboundWidgets(self) -> None:
        """The lesion segment, organ checks and model choices from the parameter node (bound by hand)."""
        p = self._parameterNode
        self._updatingGui = True
        try:
            selector = self.ui.lesionSegmentSelector
            if selector.currentNode() != p.lesionSegmentation:
                selector.setCurrentNode(p.lesionSegmentation)
            if p.lesionSegmentID and selector.currentSegmentID() != p.lesionSegmentID:
                selector.setCurrentSegmentID(p.lesionSegmentID)
            self.updateOrganChecks()
            for combo, wanted in ((self.ui.modelComboBox, p.model), (self.ui.controlNetComboBox, p.controlNet)):
                index = combo.findText(wanted) if wanted else -1
                if index >= 0 and combo.currentIndex != index:
                    combo.currentIndex = index
        finally:
            self._updatingGui = False

    # ----------------------------------------------------------------------------------------------
    # Showing what the task needs
    # ----------------------------------------------------------------------------------------------

    def currentTask(self) -> str:
        return task_for_label(self.ui.taskComboBox.currentText) if self.ui.taskComboBox.currentText else "denoise"

    def updateTaskRows(self, *args) -> None:
        task = self.currentTask()
        spec = TASKS[task]
        visible = rows_of_task(task)
        for row, names in TASK_ROWS.items():
            for name in names:
                getattr(self.ui, name).visible = row in visible
        has_steps = any(setting.panel == "steps" for setting in spec.settings)
        self.ui.stepsLabel.visible = self.ui.stepsSpinBox.visible = has_steps
        fields = {row: names[1] for row, names in TASK_ROWS.items()}
        fields["steps"] = "stepsSpinBox"
        for setting in spec.settings:
            if setting.panel in fields:
                getattr(self.ui, fields[setting.panel]).toolTip = setting.help[:1].upper() + setting.help[1:] + "."
        self.ui.inputVolumeLabel.text = _("Output grid:") if spec.grid_from_volume else _("CT volume:")
        self.ui.anatomyLabel.text = _("Anatomy (optional):") if anatomy_use(spec) == "optional" else _("Anatomy:")
        self.ui.taskDescriptionLabel.text = spec.description
        sigma = next((setting for setting in spec.settings if setting.panel == "sigma"), None)
        p = self._parameterNode
        if p is not None and p.sigmaAuto and sigma is not None and not isinstance(sigma.default, str):
            p.sigma = sigma.default  # unticking "auto" starts from the value "auto" stands for
        self.refreshControlNets()
        self.updateEnabled()

    def updateEnabled(self, *args) -> None:
        if self._parameterNode is None:
            self.ui.applyButton.enabled = False
            return
        spec = TASKS[self.currentTask()]
        self.ui.sigmaSpinBox.enabled = not self.ui.sigmaAutoCheckBox.checked  # auto: estimated, or the task's default
        self.ui.thresholdSpinBox.enabled = not self.ui.thresholdAutoCheckBox.checked
        if self._running is not None and not self._running.finished:
            self.ui.applyButton.enabled = True
            return
        p = self._parameterNode
        missing = []
        if spec.role("ct") and not p.inputVolume:
            missing.append(_("a CT volume"))
        if anatomy_use(spec) == "required" and not p.anatomy:
            missing.append(_("an anatomy segmentation"))
        if spec.role("lesion") and not (p.lesionSegmentation and p.lesionSegmentID):
            missing.append(_("a lesion segment"))
        if any(setting.name == "organs" and setting.required for setting in spec.settings) and not p.organs:
            missing.append(_("an organ"))
        self.ui.applyButton.enabled = not missing
        self.ui.applyButton.toolTip = (
            _("Choose {inputs}.").format(inputs=", ".join(missing))
            if missing
            else _("Run {task}.").format(task=spec.label)
        )

    def onLesionChanged(self, *args) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        self._parameterNode.lesionSegmentation = self.ui.lesionSegmentSelector.currentNode()
        self._parameterNode.lesionSegmentID = self.ui.lesionSegmentSelector.currentSegmentID() or ""

    def onOrgansChanged(self) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        self._parameterNode.organs = [index.data() for index in self.ui.organsComboBox.checkedIndexes()]

    def updateOrganChecks(self) -> None:
        """Fill the organ picker (the class names need only the standard library) and check the chosen ones."""
        combo = self.ui.organsComboBox
        if combo.count == 0:
            from MedDiffFMLib.class_names import TOTALSEGMENTATOR_CLASSES

            for name in TOTALSEGMENTATOR_CLASSES:
                combo.addItem(name)
        wanted = set(self._parameterNode.organs) if self._parameterNode else set()
        for row in range(combo.count):
            index = combo.model().index(row, 0)
            combo.setCheckState(index, qt.Qt.Checked if combo.itemText(row) in wanted else qt.Qt.Unchecked)

    # ----------------------------------------------------------------------------------------------
    # Models and dependencies
    # ----------------------------------------------------------------------------------------------

    def updateDependencyStatus(self) -> list:
        missing = dependencies.missing_packages()
        self.ui.dependenciesStatusLabel.text = (
            _("missing: {packages}").format(packages=", ".join(missing)) if missing else _("all installed")
        )
        self.ui.installDependenciesButton.enabled = bool(missing)
        return missing

    def ensureDependencies(self) -> bool:
        """Install missing Python packages after asking; False (with the reason shown) if that failed."""
        if not dependencies.missing_packages():
            return True

        def installTorch():
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                return None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.torchInstalled():
                return torchLogic.torch
            return torchLogic.installTorch(
                askConfirmation=False, torchVersionRequirement=f">={dependencies.MINIMUM_TORCH}"
            )

        def confirm(text, details):
            return slicer.util.confirmOkCancelDisplay(
                text, _("Install Python packages"), detailedText=details, parent=slicer.util.mainWindow()
            )

        try:
            with slicer.util.WaitCursor():
                dependencies.ensure(confirm, slicer.util.pip_install, installTorch, log=self.addLog)
        except dependencies.DependencyError as error:
            self.setStatus(str(error))
            slicer.util.errorDisplay(str(error), windowTitle=_("MedDiffFM"))
            return False
        finally:
            self.updateDependencyStatus()
        self.updateOrganChecks()
        self.refreshModels()
        return True

    def onInstallDependencies(self) -> None:
        if self.ensureDependencies():
            self.setStatus(_("Python packages are installed."))

    def refreshModels(self) -> None:
        if dependencies.missing_packages():
            self.ui.cacheFolderButton.directory = slicer.util.settingsValue(f"{SETTINGS}/CacheFolder", "")
            return
        from MedDiffFMSlicer import models

        self._updatingGui = True
        try:
            self.ui.cacheFolderButton.directory = str(models.cache_folder())
            wanted = self._parameterNode.model if self._parameterNode else ""
            choices = [models.AUTOMATIC_CHOICE, *models.installed("base"), models.UNTRAINED_CHOICE]
            self._fillCombo(self.ui.modelComboBox, choices, wanted)
            self.ui.catalogueComboBox.clear()
            try:
                entries = models.catalogue()
            except Exception as error:  # noqa: BLE001 - a broken catalogue must not break the panel
                entries = []
                self.addLog(str(error))
            for entry in entries:
                self.ui.catalogueComboBox.addItem(entry)
            self.ui.installModelButton.enabled = bool(entries)
            if not entries:
                self.ui.catalogueComboBox.addItem(_("(no downloadable models listed; use Import from file)"))
        finally:
            self._updatingGui = False
        self.refreshControlNets()
        self.onModelChanged()

    def refreshControlNets(self) -> None:
        task = TASKS[self.currentTask()].controlnet_task
        if not task or dependencies.missing_packages():
            return
        from MedDiffFMSlicer import models

        self._updatingGui = True
        try:
            wanted = self._parameterNode.controlNet if self._parameterNode else ""
            self._fillCombo(self.ui.controlNetComboBox, [models.AUTOMATIC_CHOICE, *models.installed(task)], wanted)
        finally:
            self._updatingGui = False

    @staticmethod
    def _fillCombo(combo, items, wanted) -> None:
        combo.clear()
        for item in items:
            combo.addItem(item)
        if wanted in items:
            combo.currentIndex = items.index(wanted)

    def onModelChanged(self, *args) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        self._parameterNode.model = self.ui.modelComboBox.currentText
        self._parameterNode.controlNet = self.ui.controlNetComboBox.currentText

    def onInstallModel(self) -> None:
        from MedDiffFMSlicer import models

        if self._installer is not None and not self._installer.finished:
            return
        try:
            self._installer = models.ModelInstaller(self.ui.catalogueComboBox.currentText).start()
        except Exception as error:  # noqa: BLE001
            slicer.util.errorDisplay(_("Model download failed: {error}").format(error=error))
            return
        self.ui.installModelButton.enabled = False
        self.setStatus(_("Downloading {name}...").format(name=self._installer.entry.name))
        self.timer.start()

    def onImportModel(self) -> None:
        from MedDiffFMSlicer import models

        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Import MedDiffFM model"), "", _("MedDiffFM weights (*.safetensors)")
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Import failed."), waitCursor=True):
            target = models.import_model(path)
            self.setStatus(
                _("Imported {name} into {folder}.").format(name=os.path.basename(path), folder=target.parent)
            )
            self.refreshModels()

    def onCacheFolderChanged(self, folder) -> None:
        if self._updatingGui:
            return
        os.environ["MEDDIFFFM_HOME"] = folder
        qt.QSettings().setValue(f"{SETTINGS}/CacheFolder", folder)
        self.refreshModels()

    def onOpenCacheFolder(self) -> None:
        folder = self.ui.cacheFolderButton.directory
        os.makedirs(folder, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    # ----------------------------------------------------------------------------------------------
    # Anatomy with TotalSegmentator
    # ----------------------------------------------------------------------------------------------

    def onComputeAnatomy(self) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is None:
            slicer.util.errorDisplay(_("Choose the CT volume first."))
            return
        import TotalSegmentator

        with slicer.util.tryWithErrorDisplay(_("TotalSegmentator failed."), waitCursor=True):
            totalSegmentator = TotalSegmentator.TotalSegmentatorLogic()
            totalSegmentator.logCallback = self.addLog
            totalSegmentator.setupPythonRequirements()
            options = {"task": "total", "interactive": True}
            if "fast" in inspect.signature(totalSegmentator.process).parameters:
                options["fast"] = False  # older versions default to their 3 mm "fast" model
            segmentation = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(f"{volume.GetName()} anatomy")
            )
            try:
                totalSegmentator.process(volume, segmentation, **options)
            except Exception:
                slicer.mrmlScene.RemoveNode(segmentation)  # no empty "anatomy" node left behind
                raise
            self._parameterNode.anatomy = segmentation
            self.setStatus(_("Anatomy computed with TotalSegmentator."))

    # ----------------------------------------------------------------------------------------------
    # Running
    # ----------------------------------------------------------------------------------------------

    def taskParameters(self):
        """The :class:`TaskParameters` for the panel's current state."""
        from MedDiffFMSlicer.logic import TaskParameters
        from MedDiffFMSlicer.models import AUTOMATIC_CHOICE, UNTRAINED_CHOICE

        p = self._parameterNode
        task = self.currentTask()
        model = self.ui.modelComboBox.currentText
        controlnet = self.ui.controlNetComboBox.currentText
        return TaskParameters(
            task=task,
            volume=p.inputVolume,
            anatomy=p.anatomy if anatomy_use(TASKS[task]) != "no" else None,
            lesion_segmentation=p.lesionSegmentation,
            lesion_segment_id=p.lesionSegmentID,
            settings=panel_settings(p, TASKS[task]),
            region=REGION_LABELS[p.region],
            seed=p.seed,
            device=DEVICE_LABELS[p.device],
            overlap=p.overlap,
            batch_size=p.batchSize,
            compile=p.compileNetwork,
            model=None if model in (UNTRAINED_CHOICE, AUTOMATIC_CHOICE) else (model or None),
            controlnet=None if controlnet == AUTOMATIC_CHOICE else (controlnet or None),
            untrained="tiny" if model == UNTRAINED_CHOICE else None,
            preview=p.preview,
        )

    def onApplyButton(self) -> None:
        if self._running is not None and not self._running.finished:
            self.onCancel()
            return
        self.ui.logTextEdit.clear()
        if not self.ensureDependencies():
            return
        from MedDiffFMSlicer import models

        parameters = self.taskParameters()
        if parameters.untrained is None and not models.installed("base"):
            slicer.util.errorDisplay(
                _(
                    "No MedDiffFM model is installed. Open the Model section and Install one (or Import from file when "
                    "offline). To check the set-up without a model, choose '{choice}' as base model."
                ).format(choice=models.UNTRAINED_CHOICE)
            )
            return
        qt.QSettings().setValue(f"{SETTINGS}/Device", self._parameterNode.device)
        qt.QSettings().setValue(f"{SETTINGS}/Model", self.ui.modelComboBox.currentText)
        extra = []
        if "volumes" in rows_of_task(parameters.task):
            extra = [node for node in self.ui.extraVolumesComboBox.checkedNodes() if node is not parameters.volume]
        self._queue = [dataclasses.replace(parameters, volume=node, anatomy=None) for node in extra]
        self._batch = {"count": 1 + len(extra), "failed": []}
        self._startRun(parameters)

    def _startRun(self, parameters) -> None:
        """Start one volume's run in a child process; the next queued volume starts when it ends."""
        number = self._batch["count"] - len(self._queue)
        where = (
            "" if self._batch["count"] == 1 else f" {parameters.volume.GetName()} ({number} of {self._batch['count']})"
        )
        try:
            with slicer.util.WaitCursor():
                self._running = self.logic.start(parameters, python=pythonCommand(), launcher=launchChild)
        except Exception as error:  # noqa: BLE001 - shown to the user with the library's message
            self._running = None
            self._reportFailure(str(error), where)
            self._startNext()
            return
        self._startTime = time.time()
        self.ui.applyButton.text = _("Cancel")
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress line
        self.setStatus(
            _("Running {task}{where} in the background (process {pid})...").format(
                task=TASKS[parameters.task].label, where=where, pid=self._running.job.process.pid
            )
        )
        self.addLog(" ".join(self._running.job.arguments))
        self.timer.start()

    def _startNext(self) -> None:
        if self._queue:
            self._startRun(self._queue.pop(0))
            return
        failed = self._batch["failed"]
        if self._batch["count"] > 1 and failed:
            slicer.util.errorDisplay(
                _("{failed} of {count} volumes failed:").format(failed=len(failed), count=self._batch["count"]),
                windowTitle=_("MedDiffFM"),
                detailedText="\n\n".join(failed),
            )

    def _reportFailure(self, message: str, where: str, log=None) -> None:
        """One run failed: a dialog for a single volume; for several, a log entry and a list at the end."""
        self.setStatus(_("Failed{where}: {error}").format(where=where, error=message))
        if self._batch["count"] > 1:
            self._batch["failed"].append(f"{where.strip()}: {message}")
            self.addLog(f"FAILED{where}: {message}")
            return
        self.ui.showLogButton.checked = True
        slicer.util.errorDisplay(message, windowTitle=_("MedDiffFM"), detailedText="\n".join(log or []))

    def onCancel(self) -> None:
        self._queue = []
        self._running.cancel()  # the timer keeps running while a model download needs it (onTimer stops it)
        self._finishRun()
        self.setStatus(_("Cancelled; nothing was created and the temporary files were removed."))

    def onTimer(self) -> None:
        if self._installer is not None:
            self._pollInstaller()
        if self._running is not None and not self._running.finished:
            for event in self._running.poll():
                kind = event["event"]
                if kind == "progress":
                    self.ui.progressBar.setRange(0, max(1, int(event["total"])))
                    self.ui.progressBar.value = int(event["done"])
                    self.setStatus(
                        _("{task}: {message} ({done}/{total})").format(
                            task=event.get("task", ""),
                            message=event.get("message", ""),
                            done=event["done"],
                            total=event["total"],
                        )
                    )
                elif kind == "log":
                    self.addLog(event["message"])
                    if "No GPU found" in event["message"]:
                        self.setStatus(_("No GPU found: running on the CPU, which is slow for whole volumes."))
                elif kind == "finished":
                    self._importResults()
        if (self._running is None or self._running.finished) and (self._installer is None or self._installer.finished):
            self.timer.stop()

    def _importResults(self) -> None:
        running = self._running
        self._finishRun()
        number = self._batch["count"] - len(self._queue)
        where = (
            ""
            if self._batch["count"] == 1
            else f" {running.parameters.volume.GetName()} ({number} of {self._batch['count']})"
        )
        try:
            with slicer.util.WaitCursor():
                result = self.logic.finish(running)
        except Exception as error:  # noqa: BLE001 - the child's own message, with advice
            self._reportFailure(str(error), where, running.job.outcome.log[-40:])
        else:
            self.showResult(result, running.parameters)
            self.setStatus(
                _("Done{where} in {seconds:.1f} s: {summary}").format(
                    where=where, seconds=time.time() - self._startTime, summary=result.summary
                )
            )
        self._startNext()

    def _finishRun(self) -> None:
        self.ui.applyButton.text = _("Apply")
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = 0
        self.updateEnabled()

    def showResult(self, result, parameters) -> None:
        if "map" in result.outputs:
            # The map is 0 outside the organs, which its diverging colours show as an opaque white: over
            # the CT it would veil every slice. The anomalies segmentation is shown; the map is one
            # foreground choice away.
            slicer.util.setSliceViewerLayers(background=parameters.volume, foreground=None)
            result.outputs["mask"].GetDisplayNode().SetVisibility(True)
        else:
            slicer.util.setSliceViewerLayers(background=result.outputs["volume"], foreground=None, fit=True)

    def _pollInstaller(self) -> None:
        for event in self._installer.poll():
            if event[0] == "progress":
                done, total, message = event[1:]
                self.ui.progressBar.setRange(0, max(1, int(total)))
                self.ui.progressBar.value = int(done)
                self.setStatus(
                    _("Downloading {name}: {message}").format(name=self._installer.entry.name, message=message)
                )
            elif event[0] == "done":
                self.setStatus(_("Installed {name} (checksum verified).").format(name=self._installer.entry.name))
                self.ui.progressBar.setRange(0, 100)
                self.ui.progressBar.value = 0
                self.refreshModels()
            else:
                self.setStatus(event[1])
                slicer.util.errorDisplay(event[1], windowTitle=_("Model download failed"))
                self.ui.installModelButton.enabled = True

    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        logging.info("MedDiffFM: %s", text)

    def addLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)


def pythonCommand() -> list:
    """The interpreter for the child process: Slicer's ``PythonSlicer`` launcher (it sets up the environment)."""
    pythonSlicer = shutil.which("PythonSlicer")
    return [pythonSlicer] if pythonSlicer else [sys.executable]


def launchChild(arguments, environment):
    """Start the child like the best Slicer AI extensions do (console hidden, stderr merged into stdout)."""
    return slicer.util.launchConsoleProcess(arguments, updateEnvironment=environment)


#
# Logic
#


TASK_LOGIC_METHODS = frozenset(
    (
        "synthesize",
        "denoise",
        "detectAnomalies",
        "superResolve",
        "generateLesion",
        "inpaintLesion",
        "run",
        "run_on_volumes",
        "start",
        "finish",
        "prepare",
        "validate",
        "engine",
    )
)
"""Methods of :class:`MedDiffFMSlicer.logic.TaskLogic` offered by :class:`MedDiffFMLogic`."""


class MedDiffFMLogic(ScriptedLoadableModuleLogic):
    """The module's logic: the scene's parameter node plus every task of
    :class:`MedDiffFMSlicer.logic.TaskLogic` (``denoise``, ``synthesize``, ``detectAnomalies``, ``superResolve``,
    ``generateLesion``, ``inpaintLesion``, ``run``, ``start``, ``finish``), which take and return MRML nodes.

    The task logic imports torch, so it is created on first use (the module loads without torch installed).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._taskLogic = None

    def getParameterNode(self):
        return MedDiffFMParameterNode(super().getParameterNode())

    @property
    def taskLogic(self):
        if self._taskLogic is None:
            missing = dependencies.missing_packages()
            if missing:
                raise RuntimeError(
                    "MedDiffFM needs these Python packages: {packages}. Open the MedDiffFM module and press Apply "
                    "(or Model > Python packages > Install) to install them.".format(packages=", ".join(missing))
                )
            from MedDiffFMSlicer.logic import TaskLogic

            self._taskLogic = TaskLogic()
        return self._taskLogic

    def __getattr__(self, name):
        if name not in TASK_LOGIC_METHODS:
            raise AttributeError(f"'MedDiffFMLogic' object has no attribute '{name}'")
        return getattr(self.taskLogic, name)


#
# Test (runs inside Slicer: Slicer's self-test runner and the build's ctest)
#


class MedDiffFMTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # The panel needs no Python packages: it is tested everywhere, the extension build server included.
        self.setUp()
        self.test_panel_shows_the_inputs_of_each_task()
        missing = dependencies.missing_packages()
        if missing:
            message = (
                "MedDiffFM: the panel passed; the processing tests were SKIPPED because these Python packages are "
                "not installed: {packages}. Install them from the MedDiffFM panel and run the test again."
            ).format(packages=", ".join(missing))
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_denoise_in_process_and_in_a_child_process()
        self.setUp()
        self.test_anomalies_and_lesion_inpainting()

    def _phantom(self):
        """An abdomen-like phantom CT on an oblique, anisotropic, left-handed grid, with a liver segment."""
        import numpy as np

        rng = np.random.default_rng(0)
        z, y, x = np.mgrid[0:16, 0:40, 0:48]
        body = ((y - 20) / 17.0) ** 2 + ((x - 24) / 21.0) ** 2 < 1
        liver = body & (((y - 17) / 8.0) ** 2 + ((x - 16) / 9.0) ** 2 < 1) & (z > 2) & (z < 13)
        ct = np.where(body, 40.0, -1000.0) + 20.0 * liver + rng.normal(0, 25, body.shape)
        ijkToRas = np.array(
            [[0.0, 3.0, 0.3, -60.0], [-3.1, 0.0, 0.0, 40.0], [0.0, -0.2, -3.5, 100.0], [0.0, 0.0, 0.0, 1.0]]
        )
        volume = slicer.util.addVolumeFromArray(ct.astype(np.int16), ijkToRAS=ijkToRas, name="Phantom CT")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Phantom anatomy")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        liverId = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
        slicer.util.updateSegmentBinaryLabelmapFromArray(liver.astype(np.uint8), segmentation, liverId, volume)
        return volume, segmentation, liver

    def _assertSameGrid(self, node, reference):
        import numpy as np
        from MedDiffFMSlicer.nodes import ijk_to_ras

        self.assertTrue(np.array_equal(ijk_to_ras(node), ijk_to_ras(reference)))
        self.assertEqual(slicer.util.arrayFromVolume(node).shape, slicer.util.arrayFromVolume(reference).shape)

    def test_denoise_in_process_and_in_a_child_process(self):
        from MedDiffFMSlicer.logic import TaskParameters

        self.delayDisplay("Denoise a phantom with an untrained tiny network, in Slicer and in a child process")
        volume, anatomy, _ = self._phantom()
        logic = MedDiffFMLogic()
        denoised = logic.denoise(volume, anatomy, steps=2, untrained="tiny", device="cpu")
        self.assertEqual(denoised.GetName(), "Phantom CT denoised")
        self._assertSameGrid(denoised, volume)

        parameters = TaskParameters(
            "denoise", volume=volume, anatomy=anatomy, settings={"steps": 2}, untrained="tiny", device="cpu"
        )
        running = logic.start(parameters, python=pythonCommand(), launcher=launchChild)
        folder = running.job.folder
        running.job.wait(timeout=600)
        result = logic.finish(running)
        self._assertSameGrid(result.outputs["volume"], volume)
        self.assertFalse(folder.exists())
        self.delayDisplay("Denoising test passed")

    def test_anomalies_and_lesion_inpainting(self):
        import numpy as np

        self.delayDisplay("Anomaly detection and lesion inpainting with untrained tiny networks")
        volume, anatomy, liver = self._phantom()
        logic = MedDiffFMLogic()
        anomalyMap, anomalies = logic.detectAnomalies(volume, anatomy, ["liver"], untrained="tiny", device="cpu")
        self.assertEqual(anomalyMap.GetName(), "Phantom CT anomaly map")
        self.assertEqual(anomalies.GetName(), "Phantom CT anomalies")
        self._assertSameGrid(anomalyMap, volume)
        self.assertFalse(slicer.util.arrayFromVolume(anomalyMap)[~liver].any())

        lesions = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Lesions")
        lesions.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        lesionId = lesions.GetSegmentation().AddEmptySegment("tumour", "tumour")
        lesion = np.zeros(liver.shape, np.uint8)
        lesion[7:10, 15:19, 14:18] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(lesion, lesions, lesionId, volume)
        inpainted = logic.inpaintLesion(
            volume, lesions, lesionId, steps=2, margin_mm=0.0, untrained="tiny", device="cpu"
        )
        before, after = slicer.util.arrayFromVolume(volume), slicer.util.arrayFromVolume(inpainted)
        self.assertTrue(np.array_equal(before[lesion == 0], after[lesion == 0]))
        self.delayDisplay("Anomaly and inpainting tests passed")

    def test_panel_shows_the_inputs_of_each_task(self):
        self.delayDisplay("Panel: each task shows only its inputs")
        slicer.util.selectModule("MedDiffFM")
        widget = slicer.modules.MedDiffFMWidget
        for task, info in TASKS.items():
            widget.ui.taskComboBox.currentText = info.label
            self.assertEqual(widget.currentTask(), task)
            for row, names in TASK_ROWS.items():
                shown = not getattr(widget.ui, names[1]).isHidden()
                self.assertEqual(shown, row in rows_of_task(task), (task, row))
        # A loaded scene or a script sets the parameters: the widgets bound by hand follow them.
        widget._parameterNode.organs = ["liver", "spleen"]
        checked = sorted(index.data() for index in widget.ui.organsComboBox.checkedIndexes())
        self.assertEqual(checked, ["liver", "spleen"])
        missing = dependencies.missing_packages()
        self.assertEqual(widget.ui.installDependenciesButton.enabled, bool(missing))
        for package in missing:
            self.assertIn(package, widget.ui.dependenciesStatusLabel.text)
        self.delayDisplay("Panel test passed")
