"""`llm-train doctor [CONFIG] [key=value ...] [--json]`: check what breaks runs before they are queued."""

from __future__ import annotations

import argparse
import json

from trainer.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check this machine (and a config's data and run folder) before queueing a run"
    )
    parser.add_argument(
        "config", nargs="?", help="YAML config path or preset name: also checks its data and run folder"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. run.dir=runs/x")
    parser.add_argument(
        "--cluster",
        metavar="PROFILE",
        help="check the batch plan and memory for this cluster profile's job layout",
    )
    parser.add_argument("--nodes", type=int, help="with --cluster: override the profile's node count")
    parser.add_argument(
        "--gpus-per-node", type=int, help="with --cluster: override the profile's GPUs per node"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of checks instead of lines")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Exit 2 when any check fails, like every other user error; warnings exit 0."""
    from launcher.doctor import format_report, run_checks

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `doctor key=value ...`: overrides of the defaults, no file
        config, overrides = None, [config, *overrides]
    profile = None
    if args.cluster is not None:
        from launcher.profiles import load_profile, with_overrides

        profile = with_overrides(load_profile(args.cluster), args.nodes, args.gpus_per_node, None)
    elif args.nodes is not None or args.gpus_per_node is not None:
        raise UserError("--nodes and --gpus-per-node describe a job: give them with --cluster PROFILE")
    checks = run_checks(config, overrides, profile)
    if args.json:
        print(json.dumps([check.to_dict() for check in checks], indent=1))
    else:
        print(format_report(checks))
    return 2 if any(check.status == "fail" for check in checks) else 0
