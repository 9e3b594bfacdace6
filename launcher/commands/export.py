"""`llm-train export RUN_DIR|CKPT_DIR --out DIR [--dtype bf16|fp16|fp32]`: a Hugging Face model folder from either
backend, ready for serving (trainer/models/export.py says what it holds)."""

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
    parser.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp16", "fp32"),
        help="the weights' dtype in the export (default bf16, what serving runs; fp32 keeps the checkpoint's values)",
    )
    parser.add_argument(
        "--license", default="other", help="the model card's license (a Hub identifier; default other)"
    )
    parser.add_argument("--language", default="en", help="the model card's language (default en)")
    add_trust_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from trainer.models.export import export

    out = export(
        args.checkpoint, Path(args.out), args.trust_remote_code, args.dtype, args.license, args.language
    )
    print(out)
    return 0
