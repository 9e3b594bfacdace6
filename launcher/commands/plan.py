"""`llm-train plan CONFIG [key=value ...] --nodes N --gpus-per-node G --gpu NAME [--mfu F] [--json]`:
memory per GPU, the largest micro batch that fits, step time, wall time and GPU-hours, before submitting."""

from __future__ import annotations

import argparse
import json

from launcher.plan import DEFAULT_MFU, GPUS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="memory per GPU, the micro batch that fits, step and wall time, GPU-hours of a run"
    )
    parser.add_argument("config", help="YAML config path or preset name")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the GPU model (default h100)")
    parser.add_argument(
        "--mfu", type=float, default=None, help=f"model FLOPs utilisation to assume (default {DEFAULT_MFU})"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.plan import format_plan, plan_for_config
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)
    plan, note = plan_for_config(config, args.nodes, args.gpus_per_node, args.gpu, args.mfu)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan) + note)
    return 0
