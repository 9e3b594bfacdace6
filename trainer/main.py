"""Process entry point on a compute node: `python -m trainer.main CONFIG [key=value ...]`.

Started once per rank by `llm-train train --nproc N`, torchrun, srun or submitit. Exit codes: 0 done,
2 user error, 1 anything else (with the traceback in the rank's log file). A failure in a multi-rank
run names the rank that failed or stalled and what it was doing (trainer/resilience/heartbeat.py). A rank
whose collective failed because another rank did exits 3 instead of 1. Under SLURM each task's supervisor
(trainer/resilience/supervisor.py) decides from the exit status whether to requeue the job, so that a rank
killed before Python could react (an NCCL abort, the OOM killer) requeues too.
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from pathlib import Path

import torch.distributed

from trainer.config import Config, load_config
from trainer.distributed import DistEnv, detect_env, distributed
from trainer.errors import PEER_FAILED_EXIT, UserError
from trainer.logs import setup_logging
from trainer.parallel.node_layout import node_of
from trainer.resilience.failure_record import record_failure
from trainer.resilience.goodput import GoodputClock, format_goodput, summarize
from trainer.resilience.heartbeat import Heartbeat, heartbeat_interval
from trainer.resilience.nonfinite import NonFiniteLossError
from trainer.resilience.requeue import STOP_SIGNALS
from trainer.train import run_training

log = logging.getLogger("trainer")


class RankFailure(RuntimeError):
    """A distributed run failed; the message names the failing or stalled rank and its phase."""

    def __init__(self, message: str, peer_failed: bool) -> None:
        super().__init__(message)
        self.peer_failed = peer_failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # DeepSpeed calls collectives that torch deprecated, once per step: keep the logs readable.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    start_resource_tracker()
    rank = detect_env().rank
    clock = GoodputClock(None)
    run_dir: Path | None = None
    try:
        config = load_config(argv[0] if argv else None, argv[1:])
        run_dir = Path(config.run.dir)
        setup_logging(rank, run_dir / "logs" / f"rank{rank}.log")
        clock = GoodputClock(run_dir if rank == 0 else None)
        with distributed(config.parallel.timeout_s) as env:
            _train(config, env, clock)
        clock.close()
        if rank == 0 and (summary := summarize(run_dir)):
            log.info("goodput: %s", format_goodput(summary))
        return 0
    except UserError as error:
        clock.close("failed")
        _record(run_dir, rank, error)
        log.error("%s", error)
        if rank == 0:
            print(f"llm-train: error: {error}", file=sys.stderr)
        return 2
    except RankFailure as failure:
        clock.close("failed")
        _record(run_dir, rank, failure)
        return PEER_FAILED_EXIT if failure.peer_failed else 1
    except NonFiniteLossError as error:
        clock.close("failed")
        _record(run_dir, rank, error)
        _report(str(error), error)
        return 1
    except Exception as error:
        clock.close("failed")
        _record(run_dir, rank, error)
        log.exception("training failed on rank %d", rank)
        return 1


def _record(run_dir: Path | None, rank: int, error: BaseException) -> None:
    if run_dir is not None:
        record_failure(run_dir, rank, _cause(error))


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (streaming's shared memory registers with it) with the stop
    signals blocked, which it inherits: SLURM signals every process of a task, and a tracker killed by SIGUSR2
    is replaced by one that prints a traceback for every segment it does not know when the run stops."""
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _train(config: Config, env: DistEnv, clock: GoodputClock) -> None:
    """run_training, turning a failure of a multi-rank run into a message that names the culprit."""
    run_dir = Path(config.run.dir)
    interval = heartbeat_interval(config.parallel.timeout_s)
    heartbeat = Heartbeat(run_dir, env.rank, env.world_size, interval, node_of(env))
    try:
        run_training(config, env, heartbeat, clock)
    except (UserError, NonFiniteLossError):
        raise
    except Exception as error:
        cause = _cause(error)
        heartbeat.failure = cause  # its last record names it: the supervisor's requeue record says why
        if env.world_size == 1:
            raise
        where = f"rank {env.rank} failed in '{heartbeat.phase}' of step {heartbeat.step}"
        message = f"{where} ({cause})"
        peer_failed = _collective_failed(
            error
        )  # else this rank's own error is the cause: no one else to blame
        heartbeat.peer_failed = peer_failed
        if peer_failed:
            message += f"; {heartbeat.diagnose()}"
        _report(message, error)
        raise RankFailure(message, peer_failed) from error
    finally:
        heartbeat.close()


def _cause(error: BaseException) -> str:
    """The error in one line; for one re-raised from a DataLoader worker, the worker's own last line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if "Original Traceback" in str(error) else lines[0]


def _report(message: str, error: BaseException) -> None:
    """Every rank's failure on stderr (not only rank 0's, whose console is the only one), the traceback in the log."""
    log.error("%s", message, exc_info=error)
    print(f"llm-train: error: {message}", file=sys.stderr, flush=True)


def _collective_failed(error: BaseException) -> bool:
    """Whether the error came out of a collective (a peer gone or late) rather than this rank's own code."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return any(
        mark in text for mark in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out")
    )


if __name__ == "__main__":
    sys.exit(main())
