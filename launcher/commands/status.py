"""`llm-train status RUN_DIR [--json] [--verify]`: jobs, SLURM state, requeues, progress, checkpoints, ETA,
goodput. Checkpoints are judged by their manifests and file sizes; `--verify` also checksums every file."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="where a run stands: jobs, requeues, progress, checkpoints, goodput"
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's run.dir")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="checksum every checkpoint file (reads them all; slow for big models)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.run_status import format_status, read_status

    status = read_status(args.run_dir, verify=args.verify)
    print(json.dumps(status.to_dict()) if args.json else format_status(status))
    return 0
