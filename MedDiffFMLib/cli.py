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

from . import __version__, batch
from .device import DEVICE_CHOICES
from .diffusion.samplers import SAMPLERS
from .diffusion.sliding_window import BLEND_MODES
from .errors import CancelledError, InputError, MedDiffFMError, OutputExistsError
from .model import weights as model_weights
from .preprocessing import REGIONS, labels_on_grid
from .progress import CancelToken, JsonLinesProgress, TqdmProgress, emit_json
from .tasks import Engine, denoise, detect_anomalies, generate_lesion, inpaint_lesion, super_resolve, synthesize
from .tasks.anomaly import DEFAULT_TIMESTEP
from .tasks.denoise import DEFAULT_LAMBDA, DEFAULT_NOISE_GAIN, DEFAULT_STEPS, DEFAULT_ZETA
from .tasks.engine import MEMORY_FORMATS, PRECISIONS, EngineOptions, build_engine
from .tasks.super_resolution import DEFAULT_LAMBDA as SR_LAMBDA
from .tasks.super_resolution import DEFAULT_SIGMA as SR_SIGMA
from .tasks.super_resolution import DEFAULT_STEPS as SR_STEPS
from .tasks.super_resolution import DEFAULT_ZETA as SR_ZETA
from .volume import Volume, check_writable, read_volume, write_volume

logger = logging.getLogger("meddiff-fm")

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "Testing" / "Data" / "totalsegmentator_example"
DEMO_CT, DEMO_LABELS = "example_ct_dicom", "example_seg_dicom.nii.gz"
"""The demo's scan: the bundled upper-abdomen DICOM series (0.98 x 0.98 x 2 mm), held out of the
training of every shipped 1 mm model (meddiff-fm-1mm@0.2 and later), and its TotalSegmentator labels."""
DEMO_MODEL = model_weights.BUNDLED_DIR / "meddiff-fm-1mm-0.3.safetensors"
"""The demo's model when --model is not given and the checkout ships it: the 1 mm base model, which
never saw the demo's scan (the 3 mm demonstration model was trained on it)."""
DEMO_EXTENT_MM = 256.0
DEMO_GAUSSIAN_SIGMA_MM = 0.75
"""The Gaussian filter the demo reports beside DiffPIR: the best of 0.5-2 mm on simulated low-dose
training slices of the chest CTA (benchmarks/quality.py)."""
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


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and compute")
    models = group.add_mutually_exclusive_group()
    models.add_argument(
        "--model", help="installed model name[@version] or .safetensors path (default: newest installed)"
    )
    models.add_argument(
        "--untrained",
        metavar="PRESET",
        choices=("tiny", "demo", "paper"),
        help="use a randomly initialised network (pipeline check only; output is meaningless)",
    )
    group.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    group.add_argument("--overlap", type=float, default=0.5, help="window overlap fraction (default 0.5)")
    group.add_argument("--batch-size", type=int, default=4, help="windows per network call (default 4)")
    group.add_argument("--blend", choices=BLEND_MODES, default="gaussian")
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


def _add_controlnet_option(parser: argparse.ArgumentParser, task: str) -> None:
    parser.add_argument(
        "--controlnet",
        help=f"installed {task} ControlNet name[@version] or .safetensors path (default: the newest trained on the "
        "base model; without --model, the newest and its own base model)",
    )


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--series-uid", help="DICOM series to read when the input folder holds several")
    parser.add_argument("--region", choices=tuple(REGIONS), help="anatomical region (default: detected)")


SAMPLER_STEPS_HELP = (
    "steps of ddim (default 50) or dpm++2m (default 20); ddpm always runs all 1000. Above about 40, dpm++2m "
    "merges steps that fall on the same integer timestep"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddiff-fm", description="MedDiff-FM diffusion foundation model for CT.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("denoise", help="low-dose CT denoising (DiffPIR)")
    p.add_argument("input", help="CT file or DICOM folder (HU)")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--anatomy", help="anatomy label map (TotalSegmentator v2 values) for conditioning")
    p.add_argument(
        "--sigma",
        type=_float_or_auto,
        default="auto",
        help="noise std in the model's [-1, 1] scale, or 'auto' (default)",
    )
    p.add_argument(
        "--noise-gain",
        type=float,
        default=DEFAULT_NOISE_GAIN,
        help=f"DiffPIR runs at this multiple of the noise std: CT noise is correlated (default {DEFAULT_NOISE_GAIN:g}; "
        "1 for white noise)",
    )
    p.add_argument("--lam", type=float, default=DEFAULT_LAMBDA, help=f"DiffPIR lambda (default {DEFAULT_LAMBDA:g})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"network evaluations (default {DEFAULT_STEPS})")
    p.add_argument("--zeta", type=float, default=DEFAULT_ZETA, help=f"fresh-noise share (default {DEFAULT_ZETA:g})")
    _add_input_options(p)
    _add_engine_options(p)

    p = commands.add_parser("synthesize", help="generate a CT from an anatomy label map")
    p.add_argument("anatomy", help="anatomy label map; its grid fixes the output's size and spacing")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--region", choices=tuple(REGIONS), required=True)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, help=SAMPLER_STEPS_HELP)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity (0 deterministic, default 1)")
    _add_engine_options(p)

    p = commands.add_parser("detect-anomalies", help="anomaly map and mask inside an organ")
    p.add_argument("input", help="CT file or DICOM folder (HU)")
    p.add_argument("output", help="anomaly map file (HU difference)")
    p.add_argument("--anatomy", required=True, help="anatomy label map containing the organ")
    p.add_argument("--organ", action="append", required=True, help="organ name, e.g. liver (repeatable)")
    p.add_argument("--mask-output", help="anomaly mask file (default: OUTPUT with '_mask' before the extension)")
    p.add_argument("--t", type=int, default=DEFAULT_TIMESTEP, help=f"noise timestep (default {DEFAULT_TIMESTEP})")
    p.add_argument("--threshold", type=float, help="HU threshold on |map| (default: from the map's statistics)")
    p.add_argument("--draws", type=int, default=1, help="noise draws to average (default 1)")
    _add_input_options(p)
    _add_engine_options(p)

    p = commands.add_parser("super-resolve", help="thin slices from a thick-slice CT (ControlNet + DiffPIR)")
    p.add_argument("input", help="thick-slice CT file or DICOM folder (HU)")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--spacing", type=float, default=1.0, help="slice spacing of the result in mm (default 1.0)")
    p.add_argument("--steps", type=int, default=SR_STEPS, help=f"network evaluations (default {SR_STEPS})")
    p.add_argument("--sigma", type=float, default=SR_SIGMA, help=f"DiffPIR noise level (default {SR_SIGMA:g})")
    p.add_argument("--lam", type=float, default=SR_LAMBDA, help=f"DiffPIR lambda (default {SR_LAMBDA:g})")
    p.add_argument("--zeta", type=float, default=SR_ZETA, help=f"fresh-noise share (default {SR_ZETA:g})")
    _add_controlnet_option(p, "controlnet-sr")
    _add_input_options(p)
    _add_engine_options(p)

    p = commands.add_parser("generate-lesion", help="synthesise a CT with a lesion where a mask says")
    p.add_argument("anatomy", help="anatomy label map; its grid fixes the output's size and spacing")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--lesion", required=True, help="lesion mask (non-zero = lesion)")
    p.add_argument("--region", choices=tuple(REGIONS), required=True)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, help=SAMPLER_STEPS_HELP)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity (default 1)")
    _add_controlnet_option(p, "controlnet-lesion")
    _add_engine_options(p)

    p = commands.add_parser("inpaint-lesion", help="paint a lesion into a real CT (RePaint); other voxels unchanged")
    p.add_argument("input", help="CT file or DICOM folder (HU)")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--lesion", required=True, help="lesion mask (non-zero = lesion), any overlapping grid")
    p.add_argument("--anatomy", help="anatomy label map for conditioning")
    p.add_argument("--steps", type=int, default=50, help="reverse steps (default 50)")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint jump length in steps (default 10)")
    p.add_argument("--jump-count", type=int, default=1, help="RePaint re-noising jumps per position (default 1)")
    p.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="blend generated and original voxels in a band this wide (mm) around the mask; default 0: only the "
        "mask changes",
    )
    _add_controlnet_option(p, "controlnet-lesion")
    _add_input_options(p)
    _add_engine_options(p)

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
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--with-anatomy", action="store_true", help="condition on the sample's TotalSegmentator labels")
    _add_engine_options(p)
    p.set_defaults(overlap=0.25)

    p = commands.add_parser("models", help="list, install and import model weights")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="catalogue and installed models")
    install = actions.add_parser("install", help="download a catalogued model (SHA-256 verified)")
    install.add_argument("name")
    imported = actions.add_parser("import", help="install a local .safetensors file with its .json card (offline)")
    imported.add_argument("file")
    imported.add_argument("--sha256", help="expected SHA-256 of the file")
    imported.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    batch.add_parser(commands)
    return parser


def _engine(args: argparse.Namespace, controlnet_task: str | None = None) -> Engine:
    """The engine for a command: base model (+ the ControlNet of ``controlnet_task`` if given).

    ``meddiff-fm batch`` passes a dict as ``args.engine_cache``: engines are then built once per
    distinct model and compute setting and reused.
    """
    options = EngineOptions(
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
    cache = getattr(args, "engine_cache", None)
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


def _mask_path(output: str) -> Path:
    path = Path(output)
    for extension in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if path.name.lower().endswith(extension):
            return path.with_name(path.name[: -len(extension)] + "_mask" + extension)
    return path.with_name(path.name + "_mask")


def _write_all(args: argparse.Namespace, outputs: list[tuple[Volume, str | Path]]) -> None:
    """Write every output atomically; if one fails, remove those already written by this call."""
    written: list[Path] = []
    try:
        for volume, path in outputs:
            written.append(write_volume(volume, path, args.overwrite))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _finish(args: argparse.Namespace, summary: str, outputs: list[str | Path]) -> None:
    """Report the result: text for people, a ``result`` JSON line for programs."""
    if getattr(args, "progress_format", "bar") == "json":
        emit_json(event="result", message=summary, outputs=[str(p) for p in outputs])
    print(summary)
    print(f"wrote {', '.join(str(p) for p in outputs)}")


def run_denoise(args: argparse.Namespace, cancel: CancelToken) -> None:
    check_writable(args.output, args.overwrite)
    ct = read_volume(args.input, args.series_uid)
    anatomy = read_volume(args.anatomy) if args.anatomy else None
    engine = _engine(args)
    result = denoise(
        ct,
        engine,
        args.region,
        anatomy,
        args.sigma,
        args.lam,
        args.steps,
        args.zeta,
        args.seed,
        _progress(args, "denoise"),
        cancel,
        noise_gain=args.noise_gain,
    )
    _write_all(args, [(result.volume, args.output)])
    _finish(
        args,
        f"region {result.region} ({result.region_source}), sigma_n {result.sigma_n:.4f}, t_start {result.t_start}, "
        f"{result.network_evaluations} window evaluations; {result.volume.metadata['MedDiffFM_note']}",
        [args.output],
    )


def run_synthesize(args: argparse.Namespace, cancel: CancelToken) -> None:
    check_writable(args.output, args.overwrite)
    anatomy = read_volume(args.anatomy)
    engine = _engine(args)
    volume = synthesize(
        anatomy,
        args.region,
        engine,
        args.sampler,
        args.steps,
        args.eta,
        args.seed,
        _progress(args, "synthesize"),
        cancel,
    )
    _write_all(args, [(volume, args.output)])
    _finish(args, f"synthesised a {args.region} CT of shape {volume.array.shape}", [args.output])


def run_detect(args: argparse.Namespace, cancel: CancelToken) -> None:
    mask_output = Path(args.mask_output) if args.mask_output else _mask_path(args.output)
    if mask_output.resolve() == Path(args.output).resolve():
        raise InputError("The anomaly map and the anomaly mask need two different output files.")
    check_writable(args.output, args.overwrite)
    check_writable(mask_output, args.overwrite)
    ct = read_volume(args.input, args.series_uid)
    anatomy = read_volume(args.anatomy)
    engine = _engine(args)
    result = detect_anomalies(
        ct,
        anatomy,
        args.organ,
        engine,
        args.region,
        args.t,
        args.threshold,
        args.draws,
        args.seed,
        _progress(args, "anomalies"),
        cancel,
    )
    _write_all(args, [(result.anomaly_map, args.output), (result.anomaly_mask, mask_output)])
    _finish(
        args,
        f"threshold {result.threshold:.1f} HU, {int(result.anomaly_mask.array.sum())} anomalous voxels",
        [args.output, mask_output],
    )


def run_super_resolve(args: argparse.Namespace, cancel: CancelToken) -> None:
    check_writable(args.output, args.overwrite)
    ct = read_volume(args.input, args.series_uid)
    engine = _engine(args, "controlnet-sr")
    volume = super_resolve(
        ct,
        engine,
        args.spacing,
        args.steps,
        args.sigma,
        args.lam,
        args.zeta,
        region=args.region,
        seed=args.seed,
        progress=_progress(args, "super-resolve"),
        cancel=cancel,
    )
    _write_all(args, [(volume, args.output)])
    _finish(
        args,
        f"{ct.array.shape[0]} slices of {ct.spacing[2]:g} mm -> {volume.array.shape[0]} of {args.spacing:g} mm",
        [args.output],
    )


def run_generate_lesion(args: argparse.Namespace, cancel: CancelToken) -> None:
    check_writable(args.output, args.overwrite)
    anatomy, lesion = read_volume(args.anatomy), read_volume(args.lesion)
    engine = _engine(args, "controlnet-lesion")
    volume = generate_lesion(
        anatomy,
        lesion,
        args.region,
        engine,
        args.sampler,
        args.steps,
        args.eta,
        args.seed,
        _progress(args, "generate-lesion"),
        cancel,
    )
    _write_all(args, [(volume, args.output)])
    _finish(args, f"synthesised a {args.region} CT with a lesion", [args.output])


def run_inpaint_lesion(args: argparse.Namespace, cancel: CancelToken) -> None:
    check_writable(args.output, args.overwrite)
    ct, lesion = read_volume(args.input, args.series_uid), read_volume(args.lesion)
    anatomy = read_volume(args.anatomy) if args.anatomy else None
    engine = _engine(args, "controlnet-lesion")
    volume = inpaint_lesion(
        ct,
        lesion,
        engine,
        args.region,
        anatomy,
        args.steps,
        args.jump_length,
        args.jump_count,
        args.margin,
        args.seed,
        _progress(args, "inpaint-lesion"),
        cancel,
    )
    _write_all(args, [(volume, args.output)])
    changed, outside = volume.metadata["MedDiffFM_changed_voxels"], volume.metadata["MedDiffFM_changed_outside_mask"]
    _finish(args, f"{changed} voxels may differ ({outside} of them outside the lesion mask)", [args.output])


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
        if DEMO_MODEL.exists():
            args.model = str(DEMO_MODEL)
        else:
            try:
                model_weights.resolve_weights()
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
    sample = read_volume(SAMPLE_DIR / DEMO_CT)
    simulated = simulate(sample, target_psnr=args.target_psnr, seed=args.seed)
    half = [round(DEMO_EXTENT_MM / 2 / s) for s in sample.spacing[1::-1]]
    centre = [n // 2 for n in sample.array.shape[1:]]
    box = (slice(None), *(slice(max(c - h, 0), c + h) for c, h in zip(centre, half)))

    def central(volume: Volume) -> Volume:
        return Volume.on_geometry(volume.array[box].copy(), volume.geometry.subgrid(box), **volume.metadata)

    low_dose, reference = central(simulated.low_dose), central(simulated.reference)
    anatomy = None
    if args.with_anatomy:
        anatomy = central(labels_on_grid(read_volume(SAMPLE_DIR / DEMO_LABELS), sample.geometry))
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
    _write_all(
        args,
        [
            (reference, paths["reference"]),
            (low_dose, paths["low_dose"]),
            (gaussian, paths["gaussian"]),
            (result.volume, paths["denoised"]),
        ],
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
            print(f"  {entry.name}@{entry.version} ({entry.task}) {entry.description}")
        print("installed:")
        for card in model_weights.list_installed():
            print(f"  {card.identifier} ({card.task}) {card.intended_use}")
        print(f"shipped with this checkout ({model_weights.BUNDLED_DIR}):")
        for card, _ in model_weights.list_bundled():
            print(f"  {card.identifier} ({card.task}) {card.intended_use}")
    elif args.action == "install":
        entry = model_weights.find_entry(args.name)
        path = model_weights.install(entry, TqdmProgress(f"download {entry.name}"))
        print(f"installed {entry.name}@{entry.version} at {path}")
    else:
        path = model_weights.import_checkpoint(args.file, args.sha256, overwrite=args.overwrite)
        print(f"imported into {path}")


TASK_COMMANDS = {
    "denoise": run_denoise,
    "synthesize": run_synthesize,
    "detect-anomalies": run_detect,
    "super-resolve": run_super_resolve,
    "generate-lesion": run_generate_lesion,
    "inpaint-lesion": run_inpaint_lesion,
}
"""The subcommands that run one task on one input (what ``batch`` can run per case)."""

COMMANDS = {**TASK_COMMANDS, "demo": run_demo, "models": run_models, "batch": batch.run_batch}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``meddiff-fm``; returns the process exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    own, common = batch.split_common(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    if args.command == "batch":
        args.common = common
    cancel = CancelToken()
    try:
        COMMANDS[args.command](args, cancel)
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
