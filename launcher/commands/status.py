"""`llm-train status RUN_DIR [--json]`: jobs, SLURM state, requeues, progress, checkpoints, ETA, goodput."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="where a run stands: jobs, requeues, progress, checkpoints, goodput"
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's run.dir")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.run_status import format_status, read_status

    status = read_status(args.run_dir)
    print(json.dumps(status.to_dict()) if args.json else format_status(status))
    return 0
