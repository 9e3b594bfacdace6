"""`llm-train compare A B [C ...] [--data DIR ...] [--batches N] [--prompt TEXT ...] [--json]`:
validation loss and perplexity of several models on the same batches, against the first one."""

from __future__ import annotations

import argparse
import json

from launcher.commands.eval import add_data_arguments
from launcher.commands.generate import add_sampling_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="several models' val loss/perplexity on the same batches, against the first"
    )
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="RUN_DIR, checkpoint step folder or HF folder; the first is the baseline",
    )
    add_data_arguments(parser, "the first model's data.path")
    parser.add_argument(
        "--prompt", action="append", default=[], help="also sample each model from this prompt; repeatable"
    )
    add_sampling_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.compare import SampleSettings, compare, format_samples, format_table

    sampling = SampleSettings(args.prompt, args.max_new_tokens, args.temperature, args.seed)
    comparison = compare(args.models, args.data, args.batches, sampling if args.prompt else None)
    if args.json:
        print(json.dumps(comparison.to_dict()))
    elif comparison.samples:
        print(f"{format_table(comparison)}\n\n{format_samples(comparison)}")
    else:
        print(format_table(comparison))
    return 0
