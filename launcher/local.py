"""Start N training processes on this machine with torchrun's environment variables.

If one rank fails, the others are stopped, and the launcher returns the first failing exit code
(2 stays 2, so a user error is still a user error). SIGTERM and SIGUSR2 are passed on to every rank,
which then stop after the current step with a checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from trainer.errors import PEER_FAILED_EXIT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_local(nproc: int, trainer_args: list[str], grace_s: float = 10.0, nodes: int = 1) -> int:
    """`nproc` ranks on this machine; with `nodes` > 1 they are split into that many "nodes" of nproc / nodes
    ranks each (their LOCAL_RANK and LOCAL_WORLD_SIZE), to try multi-node layouts such as hybrid sharding."""
    port = free_port()
    procs = []
    per_node = nproc // nodes
    for rank in range(nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_RANK=str(rank % per_node),
            LOCAL_WORLD_SIZE=str(per_node),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer.main", *trainer_args], env=env))

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


def _wait(procs: list[subprocess.Popen], grace_s: float) -> int:
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
