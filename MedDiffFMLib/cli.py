"""The ``meddiff-fm`` command line: every task on NIfTI/NRRD/MHA files or DICOM folders.

Outputs are checked before any work starts (supported extension, no overwrite without
``--overwrite``) and written atomically at the end, so an interrupted or failed run writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from . import __version__, batch, resources
from .device import DEVICE_CHOICES
from .diffusion.sliding_window import BLEND_MODES
from .errors import CancelledError, MedDiffFMError, OutputExistsError
from .job import Job, output_path_beside, run_job, write_all
from .model import weights as model_weights
from .preprocessing import REGIONS, labels_on_grid
from .progress import CancelToken, JsonLinesProgress, TqdmProgress, emit_json
from .task_spec import PREVIEW_OVERLAP, TASKS, Setting, TaskSpec
from .tasks import Engine, denoise
from .tasks.engine import MEMORY_FORMATS, PRECISIONS, EngineOptions, build_engine
from .volume import Volume, check_writable, read_volume

logger = logging.getLogger("meddiff-fm")

SAMPLE_DIR = resources.find(resources.SAMPLE)
"""The bundled sample scans (None when not installed: the demo then says where it looked)."""
DEMO_CT, DEMO_LABELS = "example_ct_dicom", "example_seg_dicom.nii.gz"
"""The demo's scan: the bundled upper-abdomen DICOM series (0.98 x 0.98 x 2 mm), held out of the
training of every shipped 1 mm model (meddiff-fm-1mm@0.2 and later), and its TotalSegmentator labels."""
DEMO_EXTENT_MM = 256.0
DEMO_GAUSSIAN_SIGMA_MM = 1.25
"""The Gaussian filter the demo reports beside DiffPIR: the best of 0.5-2 mm on simulated low-dose
training slices of the chest CTA's upper abdomen, scored in the abdomen window (benchmarks/quality.py)."""
UNTRAINED_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  UNTRAINED MODEL: the '{preset}' network has random weights. The pipeline runs
!!  end to end, but the output is NOT a meaningful denoised/synthesised CT.
!!  Install trained weights: meddiff-fm models install NAME (or models import FILE).
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def _float_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got '{text}'") from None


def _add_engine_options(parser: argparse.ArgumentParser, overlap: float = 0.5) -> None:
    group = parser.add_argument_group("model and compute")
    models = group.add_mutually_exclusive_group()
    models.add_argument(
        "--model",
        help="installed model name[@version] or .safetensors path (default: the model the catalogue recommends "
        "for this command, see 'meddiff-fm models list'; else the newest installed)",
    )
    models.add_argument(
        "--untrained",
        metavar="PRESET",
        choices=("tiny", "demo", "paper"),
        help="use a randomly initialised network (pipeline check only; output is meaningless)",
    )
    group.add_argument(
        "--device", choices=DEVICE_CHOICES, default="auto", help="where the network runs (default auto: a GPU if any)"
    )
    group.add_argument("--overlap", type=float, default=overlap, help=f"window overlap fraction (default {overlap:g})")
    group.add_argument("--batch-size", type=int, default=4, help="windows per network call (default 4)")
    group.add_argument(
        "--blend",
        choices=BLEND_MODES,
        default="gaussian",
        help="how overlapping windows are weighted where they meet (default gaussian)",
    )
    group.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="auto",
        help="network precision (auto: bf16 where the GPU or CPU computes it natively, else fp32)",
    )
    group.add_argument(
        "--memory-format",
        choices=MEMORY_FORMATS,
        default="auto",
        help="layout of the network's weights (auto: channels-last on CPU and CUDA; same results either way)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="compile the network with torch.compile: slower first step, faster afterwards (long runs)",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--overwrite", action="store_true", help="replace existing output files")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group.add_argument(
        "--progress-format",
        choices=("bar", "json"),
        default="bar",
        help="'json' prints one JSON object per line on stdout (progress, result, error) for programs",
    )


def _setting_type(setting: Setting):
    if setting.auto:
        return _float_or_auto
    return {"int": int, "float": float, "str": str, "names": str, "table": str}[setting.kind]


def _setting_help(setting: Setting) -> str:
    """A setting's help, with its default where the help does not already say it."""
    if "default" in setting.help or setting.default in (None, False):
        return setting.help
    default = f"{setting.default:g}" if isinstance(setting.default, float) else setting.default
    return f"{setting.help} (default {default})"


def add_task_parser(commands, spec: TaskSpec) -> argparse.ArgumentParser:
    """The subcommand of a task, generated from its :class:`~MedDiffFMLib.task_spec.TaskSpec`."""
    p = commands.add_parser(spec.command, help=spec.help)
    for role in spec.inputs:
        if role.positional:
            p.add_argument("input" if role.name == "ct" else role.name, help=role.help)
    p.add_argument("output", help=spec.outputs[0].help)
    for role in spec.inputs:
        if not role.positional:
            p.add_argument(role.cli_flag, required=role.required, help=role.help)
    for output in spec.outputs[1:]:
        p.add_argument(output.flag, dest=f"output_{output.name}", metavar=output.name.upper(), help=output.help)
    for setting in spec.settings:
        if setting.kind == "bool":
            p.add_argument(setting.cli_flag, dest=setting.name, action="store_true", help=setting.help)
            continue
        p.add_argument(
            setting.cli_flag,
            dest=setting.name,
            metavar=None if setting.choices else setting.cli_flag[2:].upper().replace("-", "_"),
            type=_setting_type(setting),
            action="append" if setting.kind in ("names", "table") else "store",
            choices=setting.choices or None,
            required=setting.required,
            default=None,  # the task's default (TaskSpec.resolve): --preview can tell it from a given value
            help=_setting_help(setting),
        )
    if spec.role("ct") is not None:
        p.add_argument("--series-uid", help="DICOM series to read when the input folder holds several")
    p.add_argument(
        "--region",
        choices=tuple(REGIONS),
        required=spec.region_required,
        help="anatomical region" + ("" if spec.region_required else " (default: detected)"),
    )
    p.add_argument(
        "--preview",
        action="store_true",
        help="fast preview: "
        + (
            ", ".join(f"{name.replace('_', '-')} {value}" for name, value in spec.preview) + ", "
            if spec.preview
            else ""
        )
        + f"window overlap at most {PREVIEW_OVERLAP:g} (settings given on the command line are kept)",
    )
    if spec.controlnet_task:
        p.add_argument(
            "--controlnet",
            help=f"installed {spec.controlnet_task} ControlNet name[@version] or .safetensors path (default: with "
            "--model, the newest trained on that model; without, the one the catalogue recommends for this command "
            "and the base model it was trained on)",
        )
    _add_engine_options(p)
    p.set_defaults(spec=spec)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddiff-fm", description="MedDiff-FM diffusion foundation model for CT.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for spec in TASKS.values():
        add_task_parser(commands, spec)

    p = commands.add_parser("run", help="run a job file (JSON: task, inputs, outputs, settings, engine)")
    p.add_argument("job", help="job file, as MedDiffFMLib.job.Job.write makes it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress-format", choices=("bar", "json"), default="bar")

    p = commands.add_parser(
        "demo",
        help="simulate a low-dose scan of the bundled DICOM series, denoise it, compare with a Gaussian filter, "
        "write volumes and a PNG figure",
    )
    p.add_argument("output_dir", help="folder for the results (created if missing)")
    p.add_argument(
        "--target-psnr",
        type=float,
        default=23.0,
        help="low-dose PSNR in [-160, 240] HU that the photon count is calibrated to (default 23: Mayo quarter dose)",
    )
    steps = TASKS["denoise"].setting("steps").default
    p.add_argument("--steps", type=int, default=steps, help=f"DiffPIR steps (default {steps}, as meddiff-fm denoise)")
    p.add_argument("--with-anatomy", action="store_true", help="condition on the sample's TotalSegmentator labels")
    _add_engine_options(p, overlap=0.25)

    p = commands.add_parser("models", help="list, install and import model weights")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="catalogue and installed models")
    install = actions.add_parser("install", help="download a catalogued model (SHA-256 verified)")
    install.add_argument("name", help="catalogued model, NAME or NAME@VERSION (see 'meddiff-fm models list')")
    imported = actions.add_parser("import", help="install a local .safetensors file with its .json card (offline)")
    imported.add_argument("file", help=".safetensors file; its .json card must lie beside it")
    imported.add_argument("--sha256", help="expected SHA-256 of the file")
    imported.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    batch.add_parser(commands)
    return parser


def _engine_options(args: argparse.Namespace, controlnet_task: str | None = None) -> EngineOptions:
    return EngineOptions(
        model=args.model,
        untrained=args.untrained,
        controlnet_task=controlnet_task,
        controlnet=getattr(args, "controlnet", None),
        device=args.device,
        overlap=args.overlap,
        batch_size=args.batch_size,
        blend=args.blend,
        precision=args.precision,
        memory_format=args.memory_format,
        compile=args.compile,
        seed=args.seed if args.untrained else None,
    )


def _engine(args: argparse.Namespace, controlnet_task: str | None = None) -> Engine:
    """The engine for a command: base model (+ the ControlNet of ``controlnet_task`` if given)."""
    return _cached_engine(_engine_options(args, controlnet_task), getattr(args, "engine_cache", None))


def _cached_engine(options: EngineOptions, cache: dict | None) -> Engine:
    """Build the engine, or reuse it from ``cache`` (``meddiff-fm batch`` passes one: an engine per
    distinct model and compute setting)."""
    if cache is not None and options in cache:
        return cache[options]
    if options.untrained:
        print(UNTRAINED_BANNER.format(preset=options.untrained), file=sys.stderr)
    engine = build_engine(options)
    if cache is not None:
        cache[options] = engine
    return engine


def _progress(args: argparse.Namespace, description: str) -> TqdmProgress | JsonLinesProgress:
    if getattr(args, "progress_format", "bar") == "json":
        return JsonLinesProgress(description)
    return TqdmProgress(description, disable=args.quiet)


def _finish(args: argparse.Namespace, summary: str, outputs: list[str | Path]) -> None:
    """Report the result: text for people, a ``result`` JSON line for programs."""
    if getattr(args, "progress_format", "bar") == "json":
        emit_json(event="result", message=summary, outputs=[str(p) for p in outputs])
    print(summary)
    print(f"wrote {', '.join(str(p) for p in outputs)}")


def run_task(args: argparse.Namespace, cancel: CancelToken) -> None:
    """A task's subcommand: its arguments become a :class:`~MedDiffFMLib.job.Job`, which runs."""
    spec: TaskSpec = args.spec
    outputs = {spec.outputs[0].name: args.output}
    for output in spec.outputs[1:]:
        outputs[output.name] = getattr(args, f"output_{output.name}") or str(
            output_path_beside(args.output, output.name)
        )
    inputs = {}
    for role in spec.inputs:
        path = getattr(args, "input" if role.positional and role.name == "ct" else role.name)
        if path:
            inputs[role.name] = path
    job = Job(
        spec.key,
        inputs,
        outputs,
        {setting.name: getattr(args, setting.name) for setting in spec.settings},
        region=args.region,
        seed=args.seed,
        series_uid=getattr(args, "series_uid", None),
        engine=_engine_options(args, spec.controlnet_task),
        overwrite=args.overwrite,
        preview=args.preview,
    )
    _run(args, job, cancel)


def _run(args: argparse.Namespace, job: Job, cancel: CancelToken) -> None:
    result = run_job(
        job,
        lambda options: _cached_engine(options, getattr(args, "engine_cache", None)),
        _progress(args, job.spec.command),
        cancel,
    )
    _finish(args, result.summary(), list(job.outputs.values()))


def run_job_file(args: argparse.Namespace, cancel: CancelToken) -> None:
    """``meddiff-fm run JOB.json``: the Slicer module's background runs come this way."""
    _run(args, Job.read(args.job), cancel)


def run_demo(args: argparse.Namespace, cancel: CancelToken) -> None:
    """Projection-domain low-dose simulation of the bundled DICOM series, DiffPIR denoising of its
    central 256 x 256 mm, and the same region through a Gaussian filter; PSNR and a figure.

    PSNR is measured against the noise-free projection through the same reconstruction.
    """
    from scipy import ndimage

    from .figures import comparison_png
    from .lowdose import simulate
    from .metrics import psnr
    from .preprocessing import Window

    if not args.model and not args.untrained:
        # The model `meddiff-fm denoise` runs: a 1 mm one that never saw the demo's scan (the 3 mm
        # demonstration model was trained on it).
        entry = model_weights.recommended("denoise")
        try:
            args.model = entry.identifier if entry else str(model_weights.resolve_weights())
        except MedDiffFMError:
            args.untrained = "demo"
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.nii.gz" for name in ("reference", "low_dose", "gaussian", "denoised")}
    figure = out / "comparison.png"
    for path in paths.values():
        check_writable(path, args.overwrite)
    if figure.exists() and not args.overwrite:
        raise OutputExistsError(f"'{figure}' already exists. Choose another folder or allow overwriting.")
    sample_dir = SAMPLE_DIR or resources.sample_dir()
    sample = read_volume(sample_dir / DEMO_CT)
    simulated = simulate(sample, target_psnr=args.target_psnr, seed=args.seed)
    half = [round(DEMO_EXTENT_MM / 2 / s) for s in sample.spacing[1::-1]]
    centre = [n // 2 for n in sample.array.shape[1:]]
    box = (slice(None), *(slice(max(c - h, 0), c + h) for c, h in zip(centre, half)))

    def central(volume: Volume) -> Volume:
        return Volume.on_geometry(volume.array[box].copy(), volume.geometry.subgrid(box), **volume.metadata)

    low_dose, reference = central(simulated.low_dose), central(simulated.reference)
    anatomy = None
    if args.with_anatomy:
        anatomy = central(labels_on_grid(read_volume(sample_dir / DEMO_LABELS), sample.geometry))
    engine = _engine(args)
    result = denoise(
        low_dose,
        engine,
        "abdomen",
        anatomy,
        steps=args.steps,
        seed=args.seed,
        progress=_progress(args, "denoise"),
        cancel=cancel,
    )
    sigma = [DEMO_GAUSSIAN_SIGMA_MM / s for s in low_dose.spacing[::-1]]
    gaussian = low_dose.with_array(ndimage.gaussian_filter(low_dose.array.astype(np.float32), sigma))
    window = Window(40.0, 400.0)
    before, baseline, after = (
        psnr(reference.array, volume.array, window) for volume in (low_dose, gaussian, result.volume)
    )
    write_all(
        [
            (reference, paths["reference"]),
            (low_dose, paths["low_dose"]),
            (gaussian, paths["gaussian"]),
            (result.volume, paths["denoised"]),
        ],
        args.overwrite,
    )
    comparison_png(
        [reference, low_dose, gaussian, result.volume],
        [
            "noise-free reference",
            f"low dose {before:.2f} dB",
            f"Gaussian {DEMO_GAUSSIAN_SIGMA_MM:g} mm {baseline:.2f} dB",
            f"MedDiffFM {after:.2f} dB",
        ],
        window,
        figure,
    )
    if args.untrained:
        print(UNTRAINED_BANNER.format(preset=args.untrained), file=sys.stderr)
    _finish(
        args,
        f"PSNR in [-160, 240] HU: low dose {before:.2f} dB (I0 {simulated.i0:.3g} photons), Gaussian filter "
        f"({DEMO_GAUSSIAN_SIGMA_MM:g} mm) {baseline:.2f} dB, MedDiffFM {after:.2f} dB ({after - before:+.2f} dB, "
        f"{after - baseline:+.2f} dB over the Gaussian); sigma_n {result.sigma_n:.4f}, {args.steps} steps; "
        f"model: {engine.name}",
        [*paths.values(), figure],
    )


def run_models(args: argparse.Namespace, cancel: CancelToken) -> None:
    if args.action == "list":
        print(f"cache folder: {model_weights.cache_dir()}")
        print("catalogue:")
        for entry in model_weights.read_catalogue() or []:
            uses = [
                f"{label} for {', '.join(TASKS[task].command for task in tasks if task in TASKS)}"
                for label, tasks in (("default", entry.default_for), ("fast preview", entry.preview_for))
                if tasks
            ]
            print(
                f"  {entry.identifier} ({entry.task}) {entry.description}" + (f" [{'; '.join(uses)}]" if uses else "")
            )
        print("installed:")
        for card in model_weights.list_installed():
            print(f"  {card.identifier} ({card.task}) {card.intended_use}")
        print(f"shipped with MedDiffFM ({model_weights.BUNDLED_DIR}):")
        for card, _ in model_weights.list_bundled():
            print(f"  {card.identifier} ({card.task}) {card.intended_use}")
    elif args.action == "install":
        entry = model_weights.find_entry(args.name)
        path = model_weights.install(entry, TqdmProgress(f"download {entry.name}"))
        print(f"installed {entry.name}@{entry.version} at {path}")
    else:
        path = model_weights.import_checkpoint(args.file, args.sha256, overwrite=args.overwrite)
        print(f"imported into {path}")


COMMANDS = {"run": run_job_file, "demo": run_demo, "models": run_models, "batch": batch.run_batch}
"""The subcommands besides the tasks' (which :func:`run_task` runs, from :data:`~MedDiffFMLib.task_spec.TASKS`)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``meddiff-fm``; returns the process exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    own, common = batch.split_common(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    if args.command == "batch":
        args.common = common
    cancel = CancelToken()
    try:
        (run_task if getattr(args, "spec", None) else COMMANDS[args.command])(args, cancel)
    except KeyboardInterrupt:
        print("meddiff-fm: cancelled; nothing was written.", file=sys.stderr)
        return 130
    except batch.BatchFailures as error:
        print(f"meddiff-fm: {error}", file=sys.stderr)
        return 1
    except (MedDiffFMError, CancelledError) as error:
        if getattr(args, "progress_format", "bar") == "json":
            emit_json(event="error", kind=type(error).__name__, message=str(error))
        print(f"meddiff-fm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
