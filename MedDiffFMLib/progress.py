"""Progress reporting and cooperative cancellation for long-running jobs.

A job reports progress by calling ``progress(done, total, message)`` and checks
``cancel.raise_if_cancelled()`` between steps. The CLI wires these to tqdm and Ctrl-C, the
Slicer module to its progress bar and Cancel button.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Protocol

from .errors import CancelledError


class ProgressCallback(Protocol):
    """Called with the number of finished units, the total, and a short status text."""

    def __call__(self, done: int, total: int, message: str) -> None: ...


def no_progress(done: int, total: int, message: str) -> None:
    """A progress callback that ignores everything."""


class CancelToken:
    """Thread-safe flag a user interface sets to stop a running job at its next check."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Request cancellation."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`CancelledError` if cancellation was requested."""
        if self._event.is_set():
            raise CancelledError("Cancelled by the user; nothing was written.")


class TqdmProgress:
    """Progress callback that drives a tqdm bar (used by the command line)."""

    def __init__(self, description: str, disable: bool = False) -> None:
        self._description = description
        self._disable = disable
        self._bar = None

    def __call__(self, done: int, total: int, message: str) -> None:
        from tqdm.auto import tqdm

        if self._bar is None or self._bar.total != total:
            self.close()
            self._bar = tqdm(total=total, desc=self._description, unit="step", disable=self._disable)
        self._bar.set_postfix_str(message, refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def emit_json(**record: object) -> None:
    """Print one JSON object on its own line to stdout and flush (for a parent process to read)."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class JsonLinesProgress:
    """Progress callback printing ``{"event": "progress", "task", "done", "total", "message"}`` lines.

    Used when another program (the Slicer module) runs the command line in a child process.
    """

    def __init__(self, description: str) -> None:
        self._description = description

    def __call__(self, done: int, total: int, message: str) -> None:
        emit_json(event="progress", task=self._description, done=done, total=total, message=message)


def stage_progress(progress: ProgressCallback, index: int, count: int, label: str) -> ProgressCallback:
    """``progress`` for stage ``index`` (0-based) of ``count`` stages: each stage's ``done / total``
    becomes one ``count``-th of a single bar (in thousandths), its messages prefixed with ``label``."""

    def report(done: int, total: int, message: str) -> None:
        progress(1000 * index + (1000 * done) // max(total, 1), 1000 * count, f"{label}: {message}")

    return report
