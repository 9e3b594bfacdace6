"""`llm-train train CONFIG [key=value ...] [--nproc N]`: train on this machine."""

from __future__ import annotations

import argparse

from launcher.local import launch_local
from trainer.config import batch_plan, load_config
from trainer.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train on this machine (N local processes)")
    parser.add_argument("config", help="YAML config path or preset name (tiny, gpt2-124m, ...)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.max_steps=100")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (gloo on CPU, nccl on GPU)")
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="split the --nproc processes into this many simulated nodes (to try parallel.shard=node here)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc} must be at least 1")
    if args.nodes < 1 or args.nproc % args.nodes:
        raise UserError(f"--nodes {args.nodes} must be at least 1 and divide --nproc {args.nproc}")
    from trainer.data.loader import read_dataset_info  # torch and streaming: imported only when training
    from trainer.data.mixture import check_mixture

    # Everything checkable is checked here, once, before any process starts.
    config = load_config(args.config, args.overrides)
    info = read_dataset_info(config.data.path, config.data.remote)
    check_mixture(config.data, info)
    batch_plan(config.train, args.nproc, info.seq_len)
    return launch_local(args.nproc, [args.config, *args.overrides], nodes=args.nodes)
