"""Run MedDiffFMLib's command line in a child process and follow what it reports.

The heavy work of every task runs in a separate Python process (Slicer's ``PythonSlicer`` inside the
application), as the best Slicer AI extensions do: the GUI never freezes, a crash or an out-of-memory
kill cannot take Slicer down, and Cancel can stop the work at once by killing the process tree.

:class:`ChildJob` owns one run:

* a private temporary folder for the input and output files (removed by :meth:`ChildJob.cleanup`,
  and at once by :meth:`ChildJob.cancel`), so a cancelled or failed run leaves nothing behind;
* the argument list (never a shell string: paths with spaces or quotes are passed verbatim);
* a reader thread that puts every output line into a queue; :meth:`ChildJob.poll` drains the queue
  (Slicer calls it from a ``QTimer`` on the GUI thread) and turns the ``--progress-format json`` lines
  into events; anything else the child prints (warnings, tracebacks) is kept as log lines;
* the outcome: outputs, summary, and on failure the child's real error message (its JSON ``error``
  event, or the last lines it printed), never only "returned non-zero exit status".

The process launcher is injectable: inside Slicer it is ``slicer.util.launchConsoleProcess``; elsewhere
(tests, scripts) :func:`default_launcher` starts the same kind of process with :mod:`subprocess`.
Nothing here imports Qt or Slicer.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Launcher = Callable[[list[str], dict[str, str]], Any]
"""``launcher(arguments, environment_updates) -> process``: a started process whose ``stdout`` yields text
lines (stderr merged into it), with ``pid``, ``poll()``, ``wait()`` and ``returncode`` like ``subprocess.Popen``."""

CLI_MODULE = "MedDiffFMLib.cli"
LOG_LINES_KEPT = 2000


def library_root() -> Path:
    """The folder that contains the ``MedDiffFMLib`` package (put on the child's ``PYTHONPATH``)."""
    import MedDiffFMLib

    return Path(MedDiffFMLib.__file__).resolve().parent.parent


def cli_arguments(command: str | Sequence[str], positional: Iterable[object] = (), options: Mapping | None = None):
    """The argument list for ``python -m MedDiffFMLib.cli`` (without the interpreter), shell-free.

    ``options`` maps flags to values: ``None``/``False`` leaves the flag out, ``True`` gives the bare flag,
    a list or tuple repeats the flag once per item, anything else becomes ``[flag, str(value)]``.
    ``--progress-format json`` is always added.
    """
    arguments = ["-m", CLI_MODULE, *([command] if isinstance(command, str) else list(command))]
    arguments += [str(value) for value in positional]
    for flag, value in (options or {}).items():
        if not flag.startswith("--"):
            raise ValueError(f"Option names start with '--': {flag!r}")
        if value is None or value is False:
            continue
        if value is True:
            arguments.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                arguments += [flag, str(item)]
        else:
            arguments += [flag, str(value)]
    return [*arguments, "--progress-format", "json"]


def parse_line(line: str) -> dict | None:
    """The JSON event on ``line`` (a JSON object with an ``event`` key), or None for any other text."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("event"), str):
        return record
    return None


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables to set in the child: the library on ``PYTHONPATH``, unbuffered UTF-8 output,
    and the model cache folder of this process."""
    paths = [str(library_root())]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    environment = {
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
    }
    for name in ("MEDDIFFFM_HOME", "MEDDIFFFM_CATALOGUE"):
        if os.environ.get(name):
            environment[name] = os.environ[name]
    environment.update(extra or {})
    return environment


def default_launcher(arguments: list[str], environment: dict[str, str]) -> subprocess.Popen:
    """Start ``arguments`` like ``slicer.util.launchConsoleProcess`` does: text mode, stderr into stdout."""
    env = {**os.environ, **environment}
    options: dict[str, Any] = {}
    if os.name == "nt":
        options["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    return subprocess.Popen(
        arguments,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
        **options,
    )


def _descendants_from_ps(pid: int) -> list[int]:
    """Descendant process IDs of ``pid`` from ``ps`` (POSIX), deepest last."""
    try:
        listing = subprocess.run(
            ["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for row in listing.splitlines():
        parts = row.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        for child in children.get(current, []):
            if child not in found:
                found.append(child)
                frontier.append(child)
    return found


def kill_process_tree(pid: int, use_psutil: bool = True) -> None:
    """Kill process ``pid`` and all its descendants (launchers such as PythonSlicer start the real
    interpreter as a child, so killing only the launcher would leave the work running)."""
    if use_psutil:
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            try:
                parent = psutil.Process(pid)
                processes = [*parent.children(recursive=True), parent]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(processes, timeout=10)
            return
    if os.name == "nt":
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(pid)],
            capture_output=True,
            check=False,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
        )
        return
    # Twice: a process started between listing and killing is caught by the second pass.
    for _ in range(2):
        for process in [pid, *_descendants_from_ps(pid)]:
            try:
                os.kill(process, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")
_HINTS = (
    (
        ("out of memory", "outofmemoryerror", "cuda error: out of memory", "defaultcpuallocator"),
        "The computer ran out of memory. Lower 'Windows per batch', set overlap to 0.25, use fewer steps, "
        "crop the volume (Crop Volume module), or run on the CPU if the GPU is small.",
    ),
    (
        ("no cuda gpu is visible", "cuda was requested", "torch not compiled with cuda"),
        "PyTorch sees no CUDA GPU. Choose device 'Auto' or 'CPU', or install a CUDA build of PyTorch with the "
        "PyTorch Utils module (it picks the build matching your driver).",
    ),
    (
        ("no module named",),
        "A Python package is missing in Slicer's Python. Press Apply again to install the dependencies, "
        "or reinstall them from the MedDiffFM panel (Model > Python packages > Install).",
    ),
    (
        ("download of", "urlopen error", "name or service not known", "timed out"),
        "The model could not be downloaded. Check the network, or download the .safetensors file and its .json "
        "card on another computer and use 'Import from file'.",
    ),
)


def advice_for(message: str) -> str:
    """A sentence saying what to do about a known kind of failure (empty when none applies)."""
    lowered = message.lower()
    for needles, advice in _HINTS:
        if any(needle in lowered for needle in needles):
            return advice
    return ""


@dataclass
class RunOutcome:
    """How a child run ended."""

    returncode: int | None = None
    cancelled: bool = False
    outputs: list[str] = field(default_factory=list)
    message: str = ""
    error: str = ""
    error_kind: str = ""
    log: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.cancelled and not self.error


class ChildJob:
    """One command-line run in a child process, with a private temporary folder (see the module docstring)."""

    def __init__(
        self,
        python: Sequence[str] | None = None,
        launcher: Launcher | None = None,
        environment: Mapping[str, str] | None = None,
        temp_parent: str | os.PathLike | None = None,
    ) -> None:
        self.python = list(python) if python else [sys.executable]
        self.launcher = launcher or default_launcher
        self.environment = child_environment(environment)
        self.folder = Path(tempfile.mkdtemp(prefix="MedDiffFM-", dir=temp_parent))
        self.arguments: list[str] = []
        self.process = None
        self.outcome = RunOutcome()
        self.progress: tuple[int, int, str] | None = None
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._finished = False

    def path(self, name: str) -> str:
        """A file path inside the job's temporary folder."""
        return str(self.folder / name)

    @property
    def running(self) -> bool:
        return self.process is not None and not self._finished

    @property
    def finished(self) -> bool:
        return self._finished

    def start(self, command: str | Sequence[str], positional: Iterable[object] = (), options: Mapping | None = None):
        """Launch ``python -m MedDiffFMLib.cli command positional... options... --progress-format json``."""
        if self.process is not None:
            raise RuntimeError("This job has already been started.")
        if not self.folder.exists():
            raise RuntimeError("This job's temporary folder has been removed; create a new job.")
        self.arguments = [*self.python, *cli_arguments(command, positional, options)]
        self.process = self.launcher(list(self.arguments), dict(self.environment))
        self._reader = threading.Thread(target=self._read, name="MedDiffFM output reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        """Queue the child's output lines until it ends.

        The child writes UTF-8 (``PYTHONIOENCODING``), but ``launchConsoleProcess`` opens the pipe in
        the locale's encoding (cp1252 on many Windows computers), which cannot decode every UTF-8 byte.
        So the bytes under the text stream are read and decoded here, undecodable bytes replaced: a
        reader that stopped would leave the child blocked on a full pipe.
        """
        process = self.process
        stream = getattr(process.stdout, "buffer", process.stdout)
        end = "" if isinstance(stream, io.TextIOBase) else b""
        try:
            for raw in iter(stream.readline, end):
                line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
                self._queue.put(("line", line.rstrip("\r\n")))
        except (OSError, ValueError) as error:
            self._queue.put(("line", f"(output could not be read further: {error})"))
        finally:
            self._queue.put(("exit", process.wait()))

    def poll(self) -> list[dict]:
        """Handle everything the child printed since the last call; returns the events in order.

        Events: ``progress`` / ``result`` / ``error`` (as the child sent them), ``log`` (``{"message": line}``
        for other output), and last ``finished`` (``{"outcome": RunOutcome}``).
        """
        events: list[dict] = []
        while True:
            try:
                kind, value = self._queue.get_nowait()
            except queue.Empty:
                return events
            if kind == "line":
                events.append(self._handle_line(value))
            elif not self._finished:
                self._finish(value)
                events.append({"event": "finished", "outcome": self.outcome})

    def _handle_line(self, line: str) -> dict:
        record = parse_line(line)
        if record is None:
            self.outcome.log.append(line)
            del self.outcome.log[:-LOG_LINES_KEPT]
            return {"event": "log", "message": line}
        kind = record["event"]
        if kind == "progress":
            self.progress = (int(record.get("done", 0)), int(record.get("total", 0)), str(record.get("message", "")))
        elif kind == "result":
            self.outcome.outputs = [str(path) for path in record.get("outputs", [])]
            self.outcome.message = str(record.get("message", ""))
        elif kind == "error":
            self.outcome.error = str(record.get("message", "")) or "The MedDiffFM process reported an error."
            self.outcome.error_kind = str(record.get("kind", ""))
        return record

    def _finish(self, returncode: int) -> None:
        self._finished = True
        self.outcome.returncode = returncode
        if self.outcome.cancelled or returncode == 0 or self.outcome.error:
            return
        self.outcome.error = self._failure_message(returncode)

    def _failure_message(self, returncode: int) -> str:
        lines = [line.strip() for line in self.outcome.log if line.strip()]
        cli_errors = [line.split("error:", 1)[1].strip() for line in lines if line.startswith("meddiff-fm: error:")]
        exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
        if cli_errors:
            detail = cli_errors[-1]
        elif exceptions:
            detail = exceptions[-1]
        else:
            detail = "\n".join(lines[-5:]) or "it printed nothing"
        killed = returncode is not None and returncode < 0
        out_of_memory = killed and -returncode == getattr(signal, "SIGKILL", 9)
        if killed:
            reason = f"was killed by signal {-returncode}"
            if out_of_memory:
                reason += " (the operating system does this when memory runs out)"
        else:
            reason = f"failed (exit code {returncode})"
        message = f"The MedDiffFM process {reason}: {detail}"
        advice = advice_for("out of memory" if out_of_memory else message)
        return f"{message}\n{advice}" if advice else message

    def wait(self, timeout: float | None = None, on_event: Callable[[dict], None] | None = None) -> RunOutcome:
        """Block until the child ends (or ``timeout`` seconds pass: then cancel it), handling its output."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if self._finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"The MedDiffFM process did not finish within {timeout} s and was stopped.")
            time.sleep(0.05)
        return self.outcome

    def cancel(self) -> None:
        """Kill the child and its descendants, wait for them to end, and remove the temporary folder."""
        self.outcome.cancelled = True
        if self.process is not None and not self._finished:
            if self.process.poll() is None:
                kill_process_tree(self.process.pid)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if self._reader is not None:
                self._reader.join(timeout=30)
            self.poll()
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the temporary folder (retrying briefly: a killed process may release files late on Windows)."""
        for attempt in range(20):
            if not self.folder.exists():
                return
            shutil.rmtree(self.folder, ignore_errors=attempt < 19)
            time.sleep(0.1)
