"""Start N training processes on this machine with torchrun's environment variables.

The ranks are forks of a rank server that imported the trainer once (launcher/rank_server.py): the test
suite's shared one when it can serve this launch, else one started for this launch.

If one rank fails, the others are stopped, and the launcher returns the first failing exit code
(2 stays 2, so a user error is still a user error). SIGTERM and SIGUSR2 are passed on to every rank,
which then stop after the current step with a checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from launcher.rank_server import ForkedRank, RankServer, shared_server
from trainer.errors import PEER_FAILED_EXIT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_local(
    nproc: int, trainer_args: list[str], grace_s: float = 10.0, nodes: int = 1, distribution: str = "block",
    module: str = "trainer.main",
) -> int:  # fmt: skip
    """`nproc` ranks on this machine; with `nodes` > 1 they are split into that many "nodes" of nproc / nodes
    ranks each (their GROUP_RANK, LOCAL_RANK and LOCAL_WORLD_SIZE), to try multi-node layouts such as hybrid
    sharding. `distribution` numbers them as srun's option does: block (node by node) or cyclic (round robin).
    Each rank runs `python -m MODULE TRAINER_ARGS` (the trainer's entry point; the tests' probes)."""
    port = free_port()
    envs = []
    per_node = nproc // nodes
    for rank in range(nproc):
        node, local = (rank % nodes, rank // nodes) if distribution == "cyclic" else divmod(rank, per_node)
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(nproc),
            GROUP_RANK=str(node),
            LOCAL_RANK=str(local),
            LOCAL_WORLD_SIZE=str(per_node),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        envs.append(env)
    procs, private = _start_ranks(envs, trainer_args, module)

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        return _wait(procs, grace_s)
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        _wait(procs, grace_s)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if private is not None:
            private.close()


def _start_ranks(
    envs: list[dict[str, str]], trainer_args: list[str], module: str
) -> tuple[list[ForkedRank], RankServer | None]:
    """The ranks, forked by the shared rank server when it can serve this launch, else by a private one."""
    shared = shared_server()
    if shared is not None and (first := shared.start_rank(module, trainer_args, envs[0])) is not None:
        rest = [shared.start_rank(module, trainer_args, env) for env in envs[1:]]
        if all(rest):
            return [first, *rest], None
        raise RuntimeError("the shared rank server stopped serving in the middle of a launch")
    if shared is not None:
        print(
            f"llm-train: the shared rank server cannot serve this launch: {shared.refusal}", file=sys.stderr
        )
    private = RankServer.start()
    ranks = [private.start_rank(module, trainer_args, env) for env in envs]
    if not all(ranks):
        private.close()
        raise RuntimeError("the rank server refused a rank of its own launcher")
    return ranks, private


def _wait(procs: list[ForkedRank], grace_s: float) -> int:
    failed: int | None = None
    deadline: float | None = None
    while any(proc.poll() is None for proc in procs):
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code not in (None, 0) and failed is None:
                failed, deadline = code, time.monotonic() + grace_s
                cause = " (its collective failed because of another rank)" if code == PEER_FAILED_EXIT else ""
                print(f"llm-train: rank {rank} exited with code {code}{cause}; stopping the other ranks",
                      file=sys.stderr, flush=True)  # fmt: skip
        if deadline is not None and time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.2)
    codes = [proc.returncode for proc in procs]
    if failed is not None:
        return 1 if failed == PEER_FAILED_EXIT else failed
    return next((code for code in codes if code != 0), 0)
