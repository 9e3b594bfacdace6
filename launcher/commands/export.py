"""`llm-train export RUN_DIR|CKPT_DIR --out DIR [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--gguf f16|q8_0]`: a
Hugging Face model folder from either backend, ready for serving, and a llama.cpp file (trainer/models/export.py
says what it holds)."""

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
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        type=shard_size,
        help="the largest safetensors file (default 5GB; MB and GB, powers of 10, as save_pretrained counts)",
    )
    parser.add_argument(
        "--gguf",
        action="append",
        default=[],
        choices=("f16", "q8_0"),
        help="also write model-TYPE.gguf for llama.cpp (gpt2 and llama models; repeat for both types)",
    )
    add_trust_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from trainer.models.export import export

    out = export(
        args.checkpoint, Path(args.out), args.trust_remote_code, args.dtype, args.license, args.language,
        args.max_shard_size, args.gguf,
    )  # fmt: skip
    print(out)
    return 0


def shard_size(text: str) -> int:
    """ "5GB", "500MB" -> bytes."""
    units = {"GB": 10**9, "MB": 10**6}
    number, unit = text[:-2], text[-2:].upper()
    try:
        value = float(number) * units[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 500MB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a shard must hold at least one byte")
    return int(value)
