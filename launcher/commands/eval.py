"""`llm-train eval RUN_DIR|CKPT_DIR|HF_DIR [--data DIR] [--batches N]`: validation loss as JSON."""

from __future__ import annotations

import argparse
import json

from trainer.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="validation loss and perplexity of a run, checkpoint or HF folder"
    )
    parser.add_argument(
        "model", help="RUN_DIR (newest valid checkpoint), a checkpoint step folder or an HF folder"
    )
    parser.add_argument("--data", help="prepared dataset (default: the run's data.path)")
    parser.add_argument("--batches", type=int, default=20, help="validation batches of 8 sequences")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from trainer.evaluation import validation_loss
    from trainer.hf_export import load_any

    if args.batches < 1:
        raise UserError(f"--batches {args.batches} must be at least 1")
    loaded = load_any(args.model)
    data = args.data or loaded.data_path
    if data is None:
        raise UserError(
            f"no dataset known for '{args.model}'; pass --data DIR (a folder made by `llm-train prepare`)"
        )
    result = {"step": loaded.step, **validation_loss(loaded.model, data, args.batches)}
    print(json.dumps(result))
    return 0
