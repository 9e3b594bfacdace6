"""`llm-train export RUN_DIR|CKPT_DIR --out DIR`: a Hugging Face model folder from either backend."""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.commands.generate import add_trust_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write a Hugging Face model folder from a checkpoint")
    parser.add_argument("checkpoint", help="RUN_DIR (newest valid checkpoint) or a checkpoint step folder")
    parser.add_argument(
        "--out", required=True, help="new folder: config.json, model.safetensors, tokenizer files"
    )
    add_trust_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from trainer.models.export import export

    out = export(args.checkpoint, Path(args.out), args.trust_remote_code)
    print(out)
    return 0
