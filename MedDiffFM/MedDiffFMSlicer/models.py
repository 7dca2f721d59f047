"""Model management for the panel: installed models, the catalogue, installing with progress, importing.

Installing downloads the weights (SHA-256 verified by :func:`MedDiffFMLib.model.weights.install`) in a
background thread; the panel polls :meth:`ModelInstaller.poll` from its timer, so Slicer stays
responsive. No Qt here.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from MedDiffFMLib.errors import MedDiffFMError
from MedDiffFMLib.model import weights

UNTRAINED_CHOICE = "untrained tiny network (pipeline test only)"
"""Model choice that runs the pipeline with a random network: output is meaningless, for checking a setup."""
AUTOMATIC_CHOICE = "automatic (the best model for the task)"
"""Model choice that names no model: the catalogue's recommendation for the task (its 3 mm model for the
fast preview; :func:`MedDiffFMLib.model.weights.recommended`), else the newest installed."""


def cache_folder() -> Path:
    return weights.cache_dir()


def set_cache_folder(path: str | os.PathLike | None) -> None:
    """Use ``path`` as the model cache (``MEDDIFFFM_HOME``) in this process and in child processes."""
    if path:
        os.environ["MEDDIFFFM_HOME"] = str(path)
    else:
        os.environ.pop("MEDDIFFFM_HOME", None)


def installed(task: str = "base") -> list[str]:
    """Identifiers (``name@version``) of the usable models of ``task`` (installed in the cache, or
    shipped with the source checkout), newest version first per name."""
    cards = {card.identifier: card for card, _ in weights.list_bundled() if card.task == task}
    cards.update({card.identifier: card for card in weights.list_installed() if card.task == task})
    ordered = sorted(cards.values(), key=lambda c: (c.name, weights.version_key(c.version)), reverse=True)
    return [card.identifier for card in ordered]


def catalogue() -> list[str]:
    """Installable models as ``name@version (task): description`` lines; empty if the catalogue is empty."""
    return [f"{e.name}@{e.version} ({e.task}): {e.description}".rstrip(": ") for e in weights.read_catalogue()]


def import_model(path: str | os.PathLike) -> Path:
    """Verify a local ``.safetensors`` file (with its ``.json`` card beside it) and copy it into the cache."""
    return weights.import_checkpoint(path)


class ModelInstaller:
    """Install one catalogued model in a background thread (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.entry = weights.find_entry(name.split(" ", 1)[0])
        self.path: Path | None = None
        self.error = ""
        self.progress: tuple[int, int, str] | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def start(self) -> ModelInstaller:
        self._thread = threading.Thread(target=self._install, name="MedDiffFM model download", daemon=True)
        self._thread.start()
        return self

    def _install(self) -> None:
        try:
            path = weights.install(
                self.entry, lambda done, total, message: self._queue.put(("progress", done, total, message))
            )
            self._queue.put(("done", path))
        except MedDiffFMError as error:
            self._queue.put(("error", str(error)))
        except Exception as error:  # noqa: BLE001 - any failure must reach the panel, not a thread's stderr
            self._queue.put(("error", f"Installing {self.entry.name} failed: {type(error).__name__}: {error}"))

    def poll(self) -> list[tuple]:
        """Events since the last call: ``("progress", done, total, message)``, then ``("done", path)``
        or ``("error", text)``."""
        events = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return events
            if event[0] == "progress":
                self.progress = event[1:]
            elif event[0] == "done":
                self.path, self._finished = event[1], True
            else:
                self.error, self._finished = event[1], True
            events.append(event)

    def wait(self, timeout: float | None = None) -> ModelInstaller:
        if self._thread is not None:
            self._thread.join(timeout)
        self.poll()
        return self
