"""`llm-train doctor [CONFIG] [key=value ...] [--json]`: check what breaks runs before they are queued."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check this machine (and a config's data and run folder) before queueing a run"
    )
    parser.add_argument(
        "config", nargs="?", help="YAML config path or preset name: also checks its data and run folder"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. run.dir=runs/x")
    parser.add_argument("--json", action="store_true", help="print a JSON list of checks instead of lines")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Exit 2 when any check fails, like every other user error; warnings exit 0."""
    from launcher.doctor import format_report, run_checks

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `doctor key=value ...`: overrides of the defaults, no file
        config, overrides = None, [config, *overrides]
    checks = run_checks(config, overrides)
    if args.json:
        print(json.dumps([check.to_dict() for check in checks], indent=1))
    else:
        print(format_report(checks))
    return 2 if any(check.status == "fail" for check in checks) else 0
