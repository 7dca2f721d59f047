"""Run one task over a cohort: ``meddiff-fm batch``.

Cases come from a CSV manifest with the columns ``task,input,output[,options]`` (``options``: that
case's extra command-line flags, e.g. ``--anatomy seg.nii.gz --organ liver``; paths relative to
the CSV's folder) or from a folder (every NIfTI/NRRD/MHA file and DICOM sub-folder, one task for
all). Flags after ``--`` apply to every case (``-- --model NAME --steps 10``).

* Resumable: a case whose outputs exist is skipped (outputs are written atomically, so an output
  that exists is complete); re-run the same command after an interruption.
* A failing case does not stop the batch: it is listed with its error in the summary CSV
  (``input,output,task,status,seconds,error``; status ``done``, ``skipped`` or ``failed``), which is
  rewritten atomically after every case.
* Overall progress with an ETA; each case's own progress bar is hidden.
* Sharded: ``--shard i/n`` (SLURM arrays) or ``torchrun``'s ``RANK``/``WORLD_SIZE`` give each
  process every n-th case from the i-th (disjoint); each writes ``SUMMARY.rank<i>.csv``. Under
  torchrun on a CUDA machine each process uses the GPU of its ``LOCAL_RANK``; there a rank with
  failed cases still exits 0 (torchrun would stop the other ranks), its summary lists them.
* One engine per distinct model and compute setting is built and reused across the cases.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CancelledError, InputError, MedDiffFMError
from .job import output_path_beside
from .progress import CancelToken
from .task_spec import TASKS, task_by_command

SUMMARY_FIELDS = ("input", "output", "task", "status", "seconds", "error")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class BatchCase:
    """One case: the command line of ``task`` on ``input`` -> ``output`` with extra ``options``."""

    task: str
    input: str
    output: str
    options: tuple[str, ...] = ()


def cases_from_csv(path: Path) -> list[BatchCase]:
    """Cases of a manifest CSV (``task,input,output[,options]``); relative paths are taken from its folder."""
    cases = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            if not all((row.get(key) or "").strip() for key in ("task", "input", "output")):
                raise InputError(f"'{path}' line {number}: every row needs 'task', 'input' and 'output'.")
            options = tuple(shlex.split(row.get("options") or ""))
            cases.append(
                BatchCase(
                    row["task"].strip(),
                    str(path.parent / row["input"].strip()),
                    str(path.parent / row["output"].strip()),
                    tuple(_relative_to(path.parent, options)),
                )
            )
    return cases


def _relative_to(folder: Path, options: tuple[str, ...]) -> list[str]:
    """Option values that name existing files relative to the manifest's folder become paths."""
    return [
        str(folder / value) if not value.startswith("-") and (folder / value).exists() else value for value in options
    ]


def cases_from_folder(folder: Path, output_folder: Path, task: str, suffix: str) -> list[BatchCase]:
    """Every volume file and DICOM sub-folder of ``folder``; outputs ``<name><suffix>`` in ``output_folder``."""
    cases = []
    for path in sorted(folder.iterdir()):
        name = next((path.name[: -len(s)] for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), None)
        if name is None and path.is_dir():
            name = path.name
        if name is not None:
            cases.append(BatchCase(task, str(path), str(output_folder / f"{name}{suffix}")))
    if not cases:
        raise InputError(f"No NIfTI/NRRD/MHA files or DICOM folders in '{folder}'.")
    return cases


def shard_of(text: str | None) -> tuple[int, int]:
    """``--shard i/n``, else torchrun's ``RANK``/``WORLD_SIZE``, else ``(0, 1)``."""
    if text is None:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise InputError(f"--shard takes i/n (e.g. 3/16), not '{text}'.") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: i must be in 0..n-1.")
    return index, count


def outputs_of(case: BatchCase) -> list[Path]:
    """The files a case writes: its output and the task's further outputs beside it (anomaly
    detection's mask)."""
    try:
        further = task_by_command(case.task).outputs[1:]
    except KeyError:
        further = ()
    return [Path(case.output), *(output_path_beside(case.output, output.name) for output in further)]


def _write_summary(path: Path, rows: list[dict]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def _use_local_gpu() -> None:
    """Under torchrun on a CUDA machine, make this process's default GPU the one of its LOCAL_RANK."""
    if "LOCAL_RANK" not in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


def run_batch(args: argparse.Namespace, cancel: CancelToken) -> None:
    """The ``batch`` subcommand (see the module docstring)."""
    from tqdm import tqdm

    from . import cli

    if args.manifest is not None:
        cases = cases_from_csv(Path(args.manifest))
    else:
        if not (args.folder and args.output_folder and args.task):
            raise InputError("Give a manifest CSV, or --folder with --output-folder and --task.")
        Path(args.output_folder).mkdir(parents=True, exist_ok=True)
        cases = cases_from_folder(Path(args.folder), Path(args.output_folder), args.task, args.suffix)
    common = list(args.common)
    index, count = shard_of(args.shard)
    mine = cases[index::count]
    summary = Path(args.summary)
    if count > 1:
        summary = summary.with_name(f"{summary.stem}.rank{index}{summary.suffix}")
    _use_local_gpu()
    parser = cli.build_parser()
    engines: dict = {}
    rows: list[dict] = []
    failed = 0
    bar = tqdm(mine, desc=f"batch {index + 1}/{count}" if count > 1 else "batch", unit="case", disable=args.quiet)
    for case in bar:
        started = time.perf_counter()
        row = {"input": case.input, "output": case.output, "task": case.task, "error": ""}
        if all(path.exists() for path in outputs_of(case)):
            row.update(status="skipped", seconds="0")
        else:
            try:
                argv = [case.task, case.input, case.output, *case.options, *common, "--quiet"]
                commands = [spec.command for spec in TASKS.values()]
                if case.task not in commands:
                    raise InputError(f"Unknown task '{case.task}'. Choose one of: {', '.join(commands)}.")
                task_args = _parse(parser, argv)
                task_args.engine_cache = engines
                cli.run_task(task_args, cancel)
                row["status"] = "done"
            except (KeyboardInterrupt, CancelledError):
                _write_summary(summary, rows)
                raise
            except (MedDiffFMError, OSError, RuntimeError, ValueError, MemoryError) as error:
                failed += 1
                row.update(status="failed", error=f"{type(error).__name__}: {error}")
            row["seconds"] = f"{time.perf_counter() - started:.1f}"
        rows.append(row)
        _write_summary(summary, rows)
        bar.set_postfix(failed=failed)
    done = sum(row["status"] == "done" for row in rows)
    skipped = sum(row["status"] == "skipped" for row in rows)
    print(f"batch: {done} done, {skipped} skipped (outputs exist), {failed} failed of {len(rows)}; summary {summary}")
    if failed and "TORCHELASTIC_RUN_ID" not in os.environ:
        raise BatchFailures(f"{failed} of {len(rows)} cases failed; their errors are in {summary}.")
    if failed:  # under torchrun a failing rank would make it stop the other ranks' cases
        print(f"batch: {failed} cases failed; their errors are in {summary}.", file=sys.stderr)


class BatchFailures(MedDiffFMError):
    """Some cases of a batch failed (the others were done); the summary CSV lists them."""


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse one case's command line; a usage error becomes an InputError with argparse's message."""
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            return parser.parse_args(argv)
    except SystemExit:
        lines = messages.getvalue().strip().splitlines()
        raise InputError(f"invalid options for this case: {lines[-1] if lines else argv}") from None


def add_parser(commands) -> None:
    """The ``batch`` subcommand's arguments."""
    p = commands.add_parser(
        "batch",
        help="run a task over a cohort (CSV manifest or folder): resumable, sharded, with a summary CSV",
        description=__doc__.split("\n\n")[1].replace("``", "'"),
    )
    p.add_argument("manifest", nargs="?", help="CSV with columns task,input,output[,options]")
    p.add_argument("--folder", help="instead of a manifest: every volume file / DICOM folder in this folder")
    p.add_argument("--output-folder", help="with --folder: where the outputs go")
    p.add_argument("--task", help="with --folder: the task for every case (e.g. denoise)")
    p.add_argument("--suffix", default="_out.nii.gz", help="with --folder: output name suffix (default _out.nii.gz)")
    p.add_argument("--summary", default="batch_summary.csv", help="summary CSV (default batch_summary.csv)")
    p.add_argument("--shard", help="i/n: run every n-th case from the i-th (default: torchrun RANK/WORLD_SIZE)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(common=[])


def split_common(argv: list[str]) -> tuple[list[str], list[str]]:
    """``batch ... -- FLAGS`` -> (the batch's own arguments, the flags for every case)."""
    if argv[:1] == ["batch"] and "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []
