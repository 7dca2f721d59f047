"""Split exported weights into parts of limited size and join them back, bit for bit.

Some channels limit the size of a single file (a remote GPU's output folder, an e-mail, a ticket
attachment). ``split`` writes ``NAME.part0.safetensors``, ``NAME.part1.safetensors``, ... each
holding whole tensors and at most ``--max-mib`` MiB (a single larger tensor gets a part of its
own), and copies the model card ``NAME.json``. ``join`` puts the tensors back into one
``NAME.safetensors``: safetensors orders tensors by type and name, not by insertion, so the file
is byte-identical to the original, and ``join`` refuses to write it unless its SHA-256 equals
the one in the card.

Usage::

    python -m Training.shards split models/NAME.safetensors --max-mib 15 --output OUT
    python -m Training.shards join OUT --name NAME --output models
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from MedDiffFMLib.errors import ChecksumError, MedDiffFMError, WeightsError
from MedDiffFMLib.model.weights import card_path, read_card, sha256_of


def split(weights: Path, output: Path, max_mib: float) -> list[Path]:
    """Write the tensors of ``weights`` into parts of at most ``max_mib`` MiB and its card beside them."""
    if read_card(weights).sha256 != sha256_of(weights):
        raise ChecksumError(f"'{weights}' does not match the SHA-256 in its card; nothing was split.")
    tensors = load_file(str(weights))
    limit = int(max_mib * 2**20)
    parts: list[dict] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if parts[-1] and size + nbytes > limit:
            parts.append({})
            size = 0
        parts[-1][key] = tensors[key]
        size += nbytes
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, part in enumerate(parts):
        path = output / f"{weights.stem}.part{index}.safetensors"
        save_file(part, str(path))
        paths.append(path)
    shutil.copyfile(card_path(weights), output / f"{weights.stem}.json")
    return paths


def join(folder: Path, name: str, output: Path) -> Path:
    """Join ``folder/NAME.part*.safetensors`` into ``output/NAME.safetensors`` (with its card), after
    checking that the result's SHA-256 is the card's."""
    parts = sorted(folder.glob(f"{name}.part*.safetensors"), key=lambda p: int(p.stem.rsplit("part", 1)[1]))
    if not parts:
        raise WeightsError(f"No '{name}.part*.safetensors' in '{folder}'.")
    card = read_card(folder / f"{name}.safetensors")
    tensors = {}
    for part in parts:
        tensors.update(load_file(str(part)))
    output.mkdir(parents=True, exist_ok=True)
    target = output / f"{name}.safetensors"
    temporary = output / f".{name}.joining.safetensors"
    save_file(tensors, str(temporary))
    actual = sha256_of(temporary)
    if actual != card.sha256:
        temporary.unlink()
        raise ChecksumError(
            f"The joined '{name}' has SHA-256 {actual}, its card names {card.sha256}: a part is missing or damaged."
        )
    temporary.replace(target)
    shutil.copyfile(card_path(folder / f"{name}.safetensors"), card_path(target))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    splitting = commands.add_parser("split", help="split a .safetensors checkpoint (with its card)")
    splitting.add_argument("weights", type=Path)
    splitting.add_argument("--max-mib", type=float, default=15.0, help="largest part in MiB")
    splitting.add_argument("--output", type=Path, required=True)
    joining = commands.add_parser("join", help="join the parts of NAME back into NAME.safetensors")
    joining.add_argument("folder", type=Path, help="folder holding NAME.part*.safetensors and NAME.json")
    joining.add_argument("--name", required=True, help="file stem, e.g. meddiff-fm-1mm-0.5")
    joining.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            for path in split(args.weights, args.output, args.max_mib):
                print(path)
        else:
            print(join(args.folder, args.name, args.output))
    except (MedDiffFMError, OSError) as error:
        print(f"shards: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
