"""`llm-train eval RUN_DIR|CKPT_DIR|HF_DIR [--data DIR ...] [--batches N] [--json]`: validation loss as JSON."""

from __future__ import annotations

import argparse
import json

from launcher.commands.generate import add_trust_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="validation loss and perplexity of a run, checkpoint or HF folder"
    )
    parser.add_argument(
        "model", help="RUN_DIR (newest valid checkpoint), a checkpoint step folder or an HF folder"
    )
    add_data_arguments(parser, "the run's data.path")
    add_task_arguments(parser)
    add_trust_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="JSON output (the default; for symmetry with compare)"
    )
    parser.set_defaults(handler=run)


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--tasks, --task-dir and --limit (lm-evaluation-harness), shared with `compare`."""
    parser.add_argument(
        "--tasks",
        metavar="NAME[,NAME...]",
        help="lm-evaluation-harness tasks (e.g. hellaswag,arc_easy); the validation loss is then measured only "
        "with --data",
    )
    parser.add_argument("--task-dir", metavar="DIR", help="a folder of your own harness task YAML files")
    parser.add_argument("--limit", type=_positive, default=None, help="at most N examples per task")


def add_data_arguments(parser: argparse.ArgumentParser, default_data: str) -> None:
    """--data (repeatable) and --batches, shared with `compare`."""
    parser.add_argument(
        "--data",
        action="append",
        metavar="DIR",
        help=f"prepared dataset; repeat for several (default: {default_data})",
    )
    parser.add_argument(
        "--batches", type=_positive, default=20, help="validation batches of 8 sequences (default 20)"
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return int(text)


def run(args: argparse.Namespace) -> int:
    """One dataset: `{"step", "val_loss", "val_ppl"}`; several: `{"step", "datasets": {NAME: {...}}}`.

    A RUN_DIR or one of its step folders also gets the results as eval lines in its metrics.jsonl (and W&B).
    """
    from trainer.evaluation import datasets_or_default, record_eval, run_dir_of, validation_losses
    from trainer.models.load import load_any, load_tokenizer
    from trainer.task_eval import parse_tasks, run_tasks

    tasks = parse_tasks(args.tasks) if args.tasks is not None else None
    loaded = load_any(args.model, args.trust_remote_code)
    run_dir = run_dir_of(args.model)
    if tasks is not None:
        scores = run_tasks(loaded.model, load_tokenizer(loaded), tasks, args.task_dir, args.limit)
        if run_dir is not None:
            record_eval(run_dir, loaded.step, scores, kind="task")
        output = {"step": loaded.step, "tasks": scores}
        if args.data:
            output["datasets"] = validation_losses(loaded.model, args.data, args.batches)
        print(json.dumps(output))
        return 0
    results = validation_losses(
        loaded.model, datasets_or_default(args.data, loaded.data_path, args.model), args.batches
    )
    if run_dir is not None:
        record_eval(run_dir, loaded.step, results)
    if len(results) == 1:
        print(json.dumps({"step": loaded.step, **next(iter(results.values()))}))
    else:
        print(json.dumps({"step": loaded.step, "datasets": results}))
    return 0
