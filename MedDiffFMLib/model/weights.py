"""Checkpoints, model cards, the model catalogue and the local model cache.

A checkpoint is two files side by side:

* ``<name>.safetensors``: the tensors (loaded without unpickling anything),
* ``<name>.json``: the model card (architecture config, task, version, data, licence, intended
  use, and the SHA-256 of the safetensors file), validated against a fixed schema.

The catalogue (``catalogue.json`` in this package, or another file) lists installable models with
their URL and SHA-256. Installed models live in the cache folder ``$MEDDIFFFM_HOME`` (default
``~/.cache/meddifffm``). Downloads and imports go to a temporary file that is verified before it
is moved into the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ChecksumError, OutputExistsError, WeightsError
from ..progress import CancelToken, ProgressCallback, no_progress
from ..resources import shipped_models_dir
from ..volume import default_file_mode
from .config import ModelConfig
from .network import ControlledNet, MedDiffFMNet

logger = logging.getLogger(__name__)

TASKS = ("base", "controlnet-sr", "controlnet-lesion")
CATALOGUE_PATH = Path(__file__).with_name("catalogue.json")
BUNDLED_DIR = shipped_models_dir()
"""Weights shipped with MedDiffFM (checkout, wheel or Slicer extension; see :mod:`MedDiffFMLib.resources`)."""
_CHUNK = 1 << 20


@dataclass
class ModelCard:
    """What a checkpoint is: identity, architecture, provenance and terms of use."""

    name: str
    version: str
    task: str
    config: dict
    sha256: str = ""
    base_model: str = ""
    base_sha256: str = ""
    training_data: str = ""
    training: str = ""
    license: str = ""
    intended_use: str = ""
    notes: list[str] = field(default_factory=list)
    anatomy_hu: dict[str, dict[str, float]] = field(default_factory=dict)
    """Typical HU of each label value in the labelled training data, by region: ``{region: {label
    value (as text): median HU}}`` (:mod:`Training.anatomy_hu`); where synthesis can start from
    (Docs/METHOD.md 1.1). Empty for a ControlNet and for cards written before it existed."""

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(dict(self.config))

    def typical_hu(self, region: str) -> dict[int, float]:
        """``anatomy_hu`` of ``region`` with integer label values (empty when the card has none)."""
        return {int(label): float(hu) for label, hu in self.anatomy_hu.get(region, {}).items()}

    @property
    def identifier(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: object) -> ModelCard:
        """Validate ``data`` against the card schema (plain JSON types only, known keys only)."""
        if not isinstance(data, dict):
            raise WeightsError("A model card must be a JSON object.")
        strings = {
            "name",
            "version",
            "task",
            "sha256",
            "base_model",
            "base_sha256",
            "training_data",
            "training",
            "license",
            "intended_use",
        }
        unknown = set(data) - strings - {"config", "notes", "anatomy_hu"}
        missing = {"name", "version", "task", "config"} - set(data)
        if unknown or missing:
            raise WeightsError(f"Invalid model card: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}.")
        if any(not isinstance(data[key], str) for key in strings & set(data)):
            raise WeightsError("Invalid model card: text fields must be strings.")
        if not isinstance(data["config"], dict) or not all(
            isinstance(v, (int, float, str, bool, list)) for v in data["config"].values()
        ):
            raise WeightsError("Invalid model card: 'config' must map names to numbers, text or lists.")
        notes = data.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise WeightsError("Invalid model card: 'notes' must be a list of strings.")
        table = data.get("anatomy_hu", {})
        if not isinstance(table, dict) or not all(
            isinstance(region, str)
            and isinstance(values, dict)
            and all(
                isinstance(label, str) and label.isdigit() and _is_number(hu) and math.isfinite(hu)
                for label, hu in values.items()
            )
            for region, values in table.items()
        ):
            raise WeightsError("Invalid model card: 'anatomy_hu' must map regions to {label value: finite HU}.")
        if data["task"] not in TASKS:
            raise WeightsError(f"Invalid model card: task '{data['task']}' is not one of {', '.join(TASKS)}.")
        card = cls(**data)
        card.model_config  # noqa: B018 - validates the architecture keys
        return card


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path(weights: str | os.PathLike) -> Path:
    """The model card that belongs to a ``.safetensors`` file."""
    return Path(weights).with_suffix(".json")


def save_checkpoint(
    model: MedDiffFMNet | ControlledNet, path: str | os.PathLike, card: ModelCard, dtype: torch.dtype | None = None
) -> ModelCard:
    """Write ``model``'s trainable weights to ``path`` (.safetensors) and its card beside it.

    A :class:`ControlledNet` stores only its ControlNet; the card names the base model.
    ``dtype`` (e.g. ``torch.bfloat16``, half the size of float32) stores the floating-point weights
    in that type; loading casts them back to the model's float32.
    Both files are written atomically. Returns the card with the file's SHA-256 filled in.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"Checkpoints are saved as .safetensors files, not '{path.name}'.")
    module = model.controlnet if isinstance(model, ControlledNet) else model
    tensors = {
        key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in module.state_dict().items()
    }
    card.config = model.config.to_dict()
    _atomic_write(path, lambda target: save_file(tensors, str(target)))
    card.sha256 = sha256_of(path)
    write_card(card, card_path(path))
    return card


def write_card(card: ModelCard, path: str | os.PathLike) -> None:
    """Write ``card`` as JSON to ``path`` atomically (a reader sees the old card or the new one)."""
    _atomic_write(Path(path), lambda target: Path(target).write_text(card.to_json()))


def read_card(weights: str | os.PathLike) -> ModelCard:
    """Read and validate the model card of a checkpoint."""
    path = card_path(weights)
    if not path.exists():
        raise WeightsError(f"The model card '{path}' is missing; a checkpoint needs its .json card beside it.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"The model card '{path}' is not valid JSON: {error}.") from error
    return ModelCard.from_dict(data)


def _verified_tensors(weights: Path, card: ModelCard, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    if not weights.exists():
        raise WeightsError(
            f"Model weights '{weights}' not found. Install the model (meddiff-fm models install NAME) "
            "or import a downloaded file (meddiff-fm models import FILE)."
        )
    if weights.suffix != ".safetensors":
        raise WeightsError(
            f"'{weights.name}' is not a .safetensors file. MedDiffFM never loads pickled checkpoints "
            "(.pt/.pth/.ckpt) because unpickling can execute code; convert it with safetensors first."
        )
    actual = sha256_of(weights)
    for expected in (card.sha256, expected_sha256):
        if expected and actual != expected:
            raise ChecksumError(
                f"Checksum mismatch for '{weights}': expected SHA-256 {expected}, got {actual}. The file is "
                "corrupted or not the published one; delete it and install it again."
            )
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"'{weights}' is not a valid safetensors file ({error}). Install it again.") from error


def _load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], weights: Path) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise WeightsError(
            f"The weights in '{weights}' do not match the architecture in its model card: {str(error).splitlines()[0]}"
        ) from error


def load_model(weights: str | os.PathLike, expected_sha256: str | None = None, task: str = "base") -> MedDiffFMNet:
    """Load a base model from a checkpoint, verifying its checksum(s) and task."""
    weights = Path(weights)
    card = read_card(weights)
    if card.task != task:
        raise WeightsError(f"'{weights.name}' is a '{card.task}' checkpoint, but a '{task}' model is needed here.")
    tensors = _verified_tensors(weights, card, expected_sha256)
    model = MedDiffFMNet(card.model_config)
    _load_state(model, tensors, weights)
    model.card = card
    return model.eval()


def load_controlled_model(
    base: MedDiffFMNet,
    weights: str | os.PathLike,
    task: str,
    expected_sha256: str | None = None,
    same_base: bool = True,
) -> ControlledNet:
    """Attach the ControlNet checkpoint ``weights`` (for ``task``) to ``base``.

    Refused when the ControlNet was trained for another task, or on another base model unless
    ``same_base`` is False (only to warm-start training on a new version of the base, whose
    architecture must be the same).
    """
    weights = Path(weights)
    card = read_card(weights)
    if card.task != task:
        raise WeightsError(f"'{weights.name}' is a '{card.task}' checkpoint; this task needs '{task}'.")
    base_card: ModelCard | None = getattr(base, "card", None)
    if same_base and (base_card is None or card.base_sha256 != base_card.sha256):
        raise WeightsError(
            f"The ControlNet '{card.identifier}' was trained on base model '{card.base_model}', not on "
            f"'{base_card.identifier if base_card else 'an unsaved model'}'. Use the matching base model."
        )
    tensors = _verified_tensors(weights, card, expected_sha256)
    model = ControlledNet(base)
    _load_state(model.controlnet, tensors, weights)
    model.card = card
    return model.eval()


def cache_dir() -> Path:
    """The model cache folder: ``$MEDDIFFFM_HOME`` or ``~/.cache/meddifffm``."""
    return Path(os.environ.get("MEDDIFFFM_HOME") or Path.home() / ".cache" / "meddifffm")


@dataclass(frozen=True)
class CatalogueEntry:
    """An installable model: where to get its weights and card, and their SHA-256.

    ``default_for`` lists the tasks (:data:`~MedDiffFMLib.task_spec.TASKS` keys) it runs when no model
    is named, the best measured for them (README, "Quality against the classical tools");
    ``preview_for`` those whose fast preview it runs (the 3 mm models: minutes on a CPU).
    """

    name: str
    version: str
    task: str
    url: str
    sha256: str
    card_url: str
    description: str = ""
    default_for: tuple[str, ...] = ()
    preview_for: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "default_for", tuple(self.default_for))
        object.__setattr__(self, "preview_for", tuple(self.preview_for))

    @property
    def file_stem(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def identifier(self) -> str:
        return f"{self.name}@{self.version}"


def read_catalogue(path: str | os.PathLike | None = None) -> list[CatalogueEntry]:
    """The catalogue's entries (default: the catalogue shipped with the library)."""
    path = Path(path or os.environ.get("MEDDIFFFM_CATALOGUE") or CATALOGUE_PATH)
    try:
        data = json.loads(path.read_text())
        return [CatalogueEntry(**entry) for entry in data["models"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise WeightsError(f"The model catalogue '{path}' is unreadable or malformed: {error}.") from error


def find_entry(name: str, catalogue: list[CatalogueEntry] | None = None) -> CatalogueEntry:
    """The newest catalogue entry called ``name`` (or ``name@version``)."""
    entries = read_catalogue() if catalogue is None else catalogue
    wanted, _, version = name.partition("@")
    matches = [e for e in entries if e.name == wanted and (not version or e.version == version)]
    if not matches:
        known = ", ".join(f"{e.name}@{e.version}" for e in entries) or "none"
        raise WeightsError(f"No model '{name}' in the catalogue. Known models: {known}.")
    return max(matches, key=lambda e: version_key(e.version))


def installed_path(entry: CatalogueEntry) -> Path:
    return cache_dir() / f"{entry.file_stem}.safetensors"


def install(entry: CatalogueEntry, progress: ProgressCallback = no_progress, cancel: CancelToken | None = None) -> Path:
    """Download a catalogued model into the cache, verified by SHA-256; returns the weights path.

    An already installed, intact model is not downloaded again. ``cancel`` stops the download
    between chunks; nothing is left in the cache then.
    """
    target = installed_path(entry)
    if target.exists() and card_path(target).exists() and sha256_of(target) == entry.sha256:
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    card_bytes = _download(entry.card_url, progress=no_progress)
    card = ModelCard.from_dict(_parse_json(card_bytes, entry.card_url))
    if card.sha256 and card.sha256 != entry.sha256:
        raise ChecksumError(
            f"Checksum mismatch for '{entry.name}': its model card names SHA-256 {card.sha256}, the catalogue "
            f"{entry.sha256}. Nothing was installed; the catalogue or the published files are wrong."
        )
    _atomic_write(
        target, lambda temporary: _download(entry.url, temporary, progress, cancel), expected_sha256=entry.sha256
    )
    _atomic_write(card_path(target), lambda temporary: Path(temporary).write_bytes(card_bytes))
    return target


def import_checkpoint(weights: str | os.PathLike, expected_sha256: str | None = None, overwrite: bool = False) -> Path:
    """Copy a local checkpoint (.safetensors + .json card) into the cache after verifying it.

    This is the offline way to install a model downloaded elsewhere. Re-importing the same file
    is harmless; a *different* file under an installed model's name and version is refused unless
    ``overwrite``, and one whose name and version the catalogue publishes with another checksum
    is installed with a warning.
    """
    weights = Path(weights)
    card = read_card(weights)
    _verified_tensors(weights, card, expected_sha256)
    target = cache_dir() / f"{card.name}-{card.version}.safetensors"
    if not overwrite and target.exists() and card_path(target).exists() and read_card(target).sha256 != card.sha256:
        raise OutputExistsError(
            f"A different {card.identifier} is already installed ({target}). Export your model under another "
            "name or version, or replace the installed one (overwrite=True; command line: --overwrite)."
        )
    _warn_if_not_published(card, weights)
    cache_dir().mkdir(parents=True, exist_ok=True)
    _atomic_write(target, lambda temporary: shutil.copyfile(weights, temporary), expected_sha256=card.sha256)
    write_card(card, card_path(target))
    return target


def _warn_if_not_published(card: ModelCard, weights: Path) -> None:
    """Warn when the catalogue publishes ``card``'s name and version with another checksum."""
    try:
        published = [e for e in read_catalogue() if (e.name, e.version) == (card.name, card.version)]
    except WeightsError:
        return
    if published and published[0].sha256 != card.sha256:
        logger.warning(
            "'%s' is not the published %s (its SHA-256 differs from the catalogue's); it is installed under "
            "that name all the same.",
            weights,
            card.identifier,
        )


def list_installed() -> list[ModelCard]:
    """Cards of every model in the cache."""
    folder = cache_dir()
    if not folder.exists():
        return []
    return [read_card(path) for path in sorted(folder.glob("*.safetensors")) if card_path(path).exists()]


def _parse_json(data: bytes, source: str) -> object:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"'{source}' is not a valid JSON model card: {error}.") from error


def _download(
    url: str, target: str | None = None, progress: ProgressCallback = no_progress, cancel: CancelToken | None = None
) -> bytes:
    """Fetch ``url`` into ``target`` (returns b"") or into memory (returns the bytes)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, done = [], 0
            sink = open(target, "wb") if target else None
            try:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    done += len(chunk)
                    if sink:
                        sink.write(chunk)
                    else:
                        chunks.append(chunk)
                    progress(done, max(total, done), f"{done / 1e6:.1f} MB")
            finally:
                if sink:
                    sink.close()
            return b"".join(chunks)
    except OSError as error:
        raise WeightsError(
            f"Download of '{url}' failed ({error}). Check the network, or download the file elsewhere "
            "and import it with 'meddiff-fm models import FILE'."
        ) from error


def _atomic_write(target: Path, write, expected_sha256: str | None = None) -> None:
    """Run ``write(temporary_path)``, verify the checksum if given, then rename onto ``target``."""
    target = Path(target)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(handle)
    try:
        write(temporary)
        if expected_sha256:
            actual = sha256_of(temporary)
            if actual != expected_sha256:
                raise ChecksumError(
                    f"Checksum mismatch for '{target.name}': expected SHA-256 {expected_sha256}, got {actual}. "
                    "The download is corrupted or not the published file; nothing was installed."
                )
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def version_key(version: str) -> list[tuple[int, int | str]]:
    """Sort key of a version string: numeric parts compare as numbers, others as text (never mixed)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in version.split(".")]


def list_bundled() -> list[tuple[ModelCard, Path]]:
    """Catalogued models whose weights ship in this source checkout's ``models/`` folder."""
    found = []
    for entry in read_catalogue():
        path = BUNDLED_DIR / f"{entry.file_stem}.safetensors"
        if path.exists() and card_path(path).exists():
            found.append((read_card(path), path))
    return found


def resolve_weights(
    spec: str | None = None,
    task: str = "base",
    base_sha256: str | None = None,
    folders: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Weights file for ``spec``: a ``.safetensors`` path, or a model ``name[@version]``.

    Installed models (the cache) come first, then the models shipped in the checkout's ``models/``
    folder, then checkpoints (with their cards) in ``folders``; None picks the newest model of ``task``
    (with ``base_sha256``: the newest ControlNet trained on that base model).
    """
    if spec and (spec.endswith(".safetensors") or os.sep in spec):
        return Path(spec)

    def matches(card: ModelCard) -> bool:
        named = not spec or spec in (card.name, card.identifier)
        return card.task == task and named and (base_sha256 is None or card.base_sha256 == base_sha256)

    installed = [(c, cache_dir() / f"{c.name}-{c.version}.safetensors") for c in list_installed() if matches(c)]
    candidates = installed or [(card, path) for card, path in list_bundled() if matches(card)]
    if not candidates:
        found = [path for folder in folders for path in sorted(Path(folder).glob("*.safetensors"))]
        candidates = [(card, path) for path in found if card_path(path).exists() and matches(card := read_card(path))]
    if not candidates:
        wanted = f"'{spec}'" if spec else f"a '{task}' model"
        if base_sha256 is not None:
            wanted += " trained on this base model"
        raise WeightsError(
            f"No installed model matches {wanted} in {cache_dir()}. Install one with 'meddiff-fm models install "
            "NAME', import a file with 'meddiff-fm models import FILE', or give the path of a .safetensors file."
        )
    return max(candidates, key=lambda pair: version_key(pair[0].version))[1]


def recommended(task_key: str, preview: bool = False) -> CatalogueEntry | None:
    """The catalogue's model for the task ``task_key`` (``default_for``; with ``preview`` its
    ``preview_for`` model, or the default where the task has none) when it is installed or shipped,
    else None (the caller then picks the newest)."""
    entries = read_catalogue()
    for fast in (True, False) if preview else (False,):
        for entry in entries:
            if task_key in (entry.preview_for if fast else entry.default_for):
                usable = installed_path(entry), BUNDLED_DIR / f"{entry.file_stem}.safetensors"
                if any(path.exists() and card_path(path).exists() for path in usable):
                    return entry
    return None


def load_task_model(
    model: str | None = None,
    controlnet_task: str | None = None,
    controlnet: str | None = None,
    task_key: str | None = None,
    preview: bool = False,
) -> MedDiffFMNet | ControlledNet:
    """The network a task runs: a base model, or a base model with its ControlNet for ``controlnet_task``.

    ``model`` / ``controlnet`` are paths or ``name[@version]`` (None: pick). The two always match:
    with neither given, the model the catalogue recommends for ``task_key`` (:func:`recommended`;
    for a ControlNet, with the base model it was trained on), or else the newest ControlNet and its
    base model; with only the base given, the newest ControlNet trained on it; with only the
    ControlNet given, its base.
    """
    if model is None and controlnet is None and task_key is not None:
        entry = recommended(task_key, preview)
        if entry is not None:
            logger.info(
                "Model for %s%s: %s (%s)",
                task_key,
                " (preview)" if preview else "",
                entry.identifier,
                entry.description,
            )
            if controlnet_task is None:
                model = entry.identifier
            else:
                controlnet = entry.identifier
    if controlnet_task is None:
        return load_model(resolve_weights(model))
    if model is None:
        control_path = resolve_weights(controlnet, task=controlnet_task)
        card = read_card(control_path)
        base = load_model(resolve_weights(card.base_model))
    else:
        base = load_model(resolve_weights(model))
        trained_on = None if controlnet else base.card.sha256
        control_path = resolve_weights(controlnet, task=controlnet_task, base_sha256=trained_on)
    return load_controlled_model(base, control_path, controlnet_task)


def untrained_model(preset_name: str, seed: int = 0) -> MedDiffFMNet:
    """A freshly initialised (untrained) network of a preset: for tests and trying the pipeline only."""
    from .config import preset

    torch.manual_seed(seed)
    return MedDiffFMNet(preset(preset_name)).eval()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
