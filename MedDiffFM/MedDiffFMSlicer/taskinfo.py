"""The six MedDiff-FM tasks as the panel and the logic see them: labels, inputs, defaults.

Plain Python (no MedDiffFMLib, torch, Qt or MRML), so the module can describe its tasks before the
Python dependencies are installed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    """What a task needs and produces."""

    key: str
    label: str
    command: str
    function: str
    needs_volume: bool = False
    volume_is_grid_only: bool = False
    anatomy: str = "no"  # "no", "optional" or "required"
    needs_lesion: bool = False
    needs_organs: bool = False
    region_required: bool = False
    controlnet_task: str | None = None
    default_steps: int | None = 10  # None: the sampler's own default (DDIM 50, DPM-Solver++ 20)
    description: str = ""


TASKS: dict[str, TaskInfo] = {
    info.key: info
    for info in (
        TaskInfo(
            "synthesize",
            "Synthesize",
            "synthesize",
            "synthesize",
            volume_is_grid_only=True,
            anatomy="required",
            region_required=True,
            default_steps=None,
            description="Generate a CT from an anatomy segmentation (its grid, or the chosen volume's grid).",
        ),
        TaskInfo(
            "denoise",
            "Denoise",
            "denoise",
            "denoise",
            needs_volume=True,
            anatomy="optional",
            default_steps=10,
            description="Low-dose CT denoising (DiffPIR, zero-shot).",
        ),
        TaskInfo(
            "detect_anomalies",
            "Detect anomalies",
            "detect-anomalies",
            "detect_anomalies",
            needs_volume=True,
            anatomy="required",
            needs_organs=True,
            default_steps=1,
            description="Anomaly map and mask inside the chosen organs (zero-shot).",
        ),
        TaskInfo(
            "super_resolve",
            "Super-resolve",
            "super-resolve",
            "super_resolve",
            needs_volume=True,
            controlnet_task="controlnet-sr",
            default_steps=100,
            description="Thick-slice to thin-slice CT along z (ControlNet + DiffPIR).",
        ),
        TaskInfo(
            "generate_lesion",
            "Generate lesion",
            "generate-lesion",
            "generate_lesion",
            volume_is_grid_only=True,
            anatomy="required",
            needs_lesion=True,
            region_required=True,
            controlnet_task="controlnet-lesion",
            default_steps=None,
            description="Synthesize a CT with a lesion where the lesion segment is (lesion ControlNet).",
        ),
        TaskInfo(
            "inpaint_lesion",
            "Inpaint lesion",
            "inpaint-lesion",
            "inpaint_lesion",
            needs_volume=True,
            anatomy="optional",
            needs_lesion=True,
            controlnet_task="controlnet-lesion",
            default_steps=50,
            description="Paint a lesion into a real CT inside the lesion segment (RePaint); voxels outside stay.",
        ),
    )
}

REGION_LABELS = {"Auto": None, "Head & neck": "head_neck", "Chest": "chest", "Abdomen": "abdomen"}
DEVICE_LABELS = {"Auto": "auto", "GPU (CUDA)": "cuda", "Apple GPU (MPS)": "mps", "CPU": "cpu"}

SAMPLER_LABELS = {"DDIM": "ddim", "DDPM": "ddpm", "DPM-Solver++": "dpm++2m"}

REGION_KEYS = ("head_neck", "chest", "abdomen")


def task_for_label(label: str) -> str:
    """The task key of a task label (``\"Detect anomalies\"`` -> ``\"detect_anomalies\"``)."""
    for key, info in TASKS.items():
        if info.label == label:
            return key
    raise KeyError(f"Unknown task '{label}'")
