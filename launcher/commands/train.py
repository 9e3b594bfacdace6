"""`llm-train train CONFIG [key=value ...] [--nproc N]`: train on this machine."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator

from launcher.local import launch_local
from launcher.rank_server import SERVER_ENV, RankServer
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
    parser.add_argument(
        "--distribution",
        choices=("block", "cyclic"),
        default="block",
        help="how the simulated nodes' ranks are numbered, as srun's option: node by node, or round robin",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc} must be at least 1")
    if args.nodes < 1 or args.nproc % args.nodes:
        raise UserError(f"--nodes {args.nodes} must be at least 1 and divide --nproc {args.nproc}")
    with _early_rank_server() as server:
        from trainer.data.dataset_info import read_dataset_info  # no torch, no streaming: the server has them
        from trainer.data.mixture import check_mixture

        # Everything checkable is checked here, once, before any process starts.
        config = load_config(args.config, args.overrides)
        info = read_dataset_info(config.data.path, config.data.remote)
        check_mixture(config.data, info)
        batch_plan(config.train, args.nproc, info.seq_len)
        if server is not None:
            _wait_until_listening(server)
        return launch_local(
            args.nproc, [args.config, *args.overrides], nodes=args.nodes, distribution=args.distribution
        )


@contextlib.contextmanager
def _early_rank_server() -> Iterator[RankServer | None]:
    """The ranks' server (launcher/rank_server.py), started before the checks so that its imports (torch,
    transformers, the trainer: seconds) run while this process checks the config and the dataset. The ranks
    are forked from it as from a shared server (LLM_TRAIN_RANK_SERVER names it), and it is stopped on the way
    out. None when a shared server is named already (the test suite's)."""
    if os.environ.get(SERVER_ENV):
        yield None
        return
    server = RankServer.spawn()
    os.environ[SERVER_ENV] = server.socket_path
    try:
        yield server
    finally:
        os.environ.pop(SERVER_ENV, None)
        server.close()


def _wait_until_listening(server: RankServer, timeout_s: float = 300.0) -> None:
    """Until the server listens; if it exits or takes too long, launch_local starts one and reports why."""
    deadline = time.monotonic() + timeout_s
    while not server.ready() and server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
