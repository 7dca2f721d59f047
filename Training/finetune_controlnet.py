"""Fine-tune a ControlNet on a frozen MedDiff-FM base model (Docs/METHOD.md 1.6).

Tasks: ``sr`` (condition: the thick-slice volume on the thin grid) and ``lesion`` (condition: the
lesion mask). Data come from :mod:`Training.make_pairs`. Same engine as pre-training: L1 noise
loss, Adam, gradient accumulation, EMA, checkpoints with resume, CSV log, previews, DDP through
``torchrun``. The exported checkpoint stores only the ControlNet; its model card names the base
model (and its SHA-256), and loading it on another base model is refused.

Usage::

    python -m Training.finetune_controlnet --task sr --base base.safetensors \\
        --config Training/configs/controlnet_demo.yaml --data data/sr_pairs --output runs/sr --export sr@1.0
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .pretrain import build_parser, run

TASKS = {"sr": "controlnet-sr", "lesion": "controlnet-lesion"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = build_parser("Fine-tune a MedDiff-FM ControlNet.")
    parser.add_argument("--task", choices=tuple(TASKS), required=True)
    parser.add_argument("--base", type=Path, required=True, help="base model checkpoint (.safetensors with card)")
    args = parser.parse_args(argv)
    return run(args, TASKS[args.task], args.base)


if __name__ == "__main__":
    sys.exit(main())
