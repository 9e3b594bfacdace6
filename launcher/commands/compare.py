"""`llm-train compare A B [C ...] [--data DIR ...] [--batches N] [--prompt TEXT ...] [--json]`:
validation loss and perplexity of several models on the same batches, against the first one."""

from __future__ import annotations

import argparse
import json

from launcher.commands.eval import add_data_arguments, add_task_arguments
from launcher.commands.generate import add_sampling_arguments, add_trust_argument


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
    add_task_arguments(parser)
    add_trust_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.compare import (
        SampleSettings,
        TaskSettings,
        compare,
        format_samples,
        format_table,
        format_tasks,
    )
    from trainer.task_eval import parse_tasks

    sampling = SampleSettings(args.prompt, args.max_new_tokens, args.temperature, args.seed)
    tasks = (
        TaskSettings(parse_tasks(args.tasks), args.task_dir, args.limit) if args.tasks is not None else None
    )
    comparison = compare(
        args.models, args.data, args.batches, sampling if args.prompt else None, tasks, args.trust_remote_code
    )
    if args.json:
        print(json.dumps(comparison.to_dict()))
        return 0
    parts = [format_table(comparison)]
    if tasks is not None:
        parts.append(format_tasks(comparison))
    if comparison.samples:
        parts.append(format_samples(comparison))
    print("\n\n".join(parts))
    return 0
