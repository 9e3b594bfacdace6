"""`llm-train plan CONFIG [key=value ...] --nodes N --gpus-per-node G --gpu NAME [--mfu F] [--measure]
[--max-micro-batch] [--json]`: memory per GPU, the largest micro batch that fits, step time, wall time and
GPU-hours, before submitting; `--measure` runs one real training step on fake tensors (launcher/plan_measure.py)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from launcher.plan import DEFAULT_MFU, GPUS

if TYPE_CHECKING:
    from launcher.plan import Plan
    from trainer.config import Config


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
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also run one real training step at this world size on fake tensors (no GPU, no model memory) and "
        "show rank 0's measured peak by category beside the formula's",
    )
    parser.add_argument(
        "--max-micro-batch",
        action="store_true",
        help="find the largest micro batch whose measured peak fits the --gpu, by bisection",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.plan import format_plan, plan_for_config
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)
    plan, note = plan_for_config(config, args.nodes, args.gpus_per_node, args.gpu, args.mfu)
    result, lines = plan.to_dict(), [format_plan(plan) + note]
    if args.measure or args.max_micro_batch:
        measured, measured_lines = _measured(config, args, plan)
        result |= measured
        lines += measured_lines
    print(json.dumps(result) if args.json else "\n".join(lines))
    return 0


def _measured(config: Config, args: argparse.Namespace, plan: Plan) -> tuple[dict, list[str]]:
    """--measure and --max-micro-batch: their JSON fields and lines."""
    from launcher.plan import usable_bytes
    from launcher.plan_measure import NotMeasurable, compare_lines, largest_micro_batch, measure_step

    if config.parallel.backend == "deepspeed":
        line = (
            "measured     none: DeepSpeed's engine does not run on fake tensors; the formula's figures stand"
        )
        return {"measured": None}, [line]
    shape = (config, plan.vocab_size, plan.seq_len, args.nodes * args.gpus_per_node, args.gpus_per_node,
             plan.shard_group)  # fmt: skip
    room = usable_bytes(args.gpu)
    fields: dict = {}
    lines: list[str] = []
    try:
        if args.measure:
            step = measure_step(*shape)
            fields["measured"] = step.to_dict()
            lines += compare_lines(step, plan.bytes_per_gpu)
            if step.peak > room:
                lines.append(f"warning      the measured peak {step.peak / 1e9:.1f} GB exceeds the {room / 1e9:.1f} GB a "
                             f"run may use of a {args.gpu}: lower train.micro_batch_size (--max-micro-batch finds it)")  # fmt: skip
        if args.max_micro_batch:
            most = max(1, config.train.global_batch_size // (args.nodes * args.gpus_per_node))
            largest, steps = largest_micro_batch(*shape, room, most)
            fields["max_micro_batch"] = largest
            fields["max_micro_batch_peaks"] = [
                s.peak for s in sorted(steps, key=lambda s: s.micro_batch_size)
            ]
            tried = ", ".join(f"{s.micro_batch_size}: {s.peak / 1e9:.1f} GB" for s in steps)
            lines.append(f"micro batch  largest that fits a {args.gpu} ({room / 1e9:.1f} GB usable) by measured "
                         f"peak: {largest or 'none'} (tried {tried})")  # fmt: skip
    except NotMeasurable as error:
        reason = str(error).splitlines()[0]
        fields |= {"measured": None, "not_measurable": reason}
        lines.append(f"measured     none: this model's step does not run on fake tensors ({reason}); the formula's "
                     "figures stand")  # fmt: skip
    return fields, lines
