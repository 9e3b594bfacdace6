"""Preemption and time limits: a signal becomes "finish this step, save, requeue, exit" on every rank.

SLURM sends SIGUSR2 a lead time before the time limit (`--signal=USR2@LEAD`) and SIGTERM on
preemption. Handlers only set a flag; each step's report carries it in the step's one all-reduce
(trainer/step_report.py), so every rank stops after the same step and a save is never interrupted by
the signal.
Rank 0 then requeues the SLURM job (trainer/resilience/requeue.py).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from trainer.resilience.requeue import STOP_SIGNALS

log = logging.getLogger(__name__)

SIGNALS = STOP_SIGNALS


class Preempted(Exception):
    """Raised by the loop after the checkpoint of `step` is saved because a stop signal arrived."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}")
        self.step = step
        self.signal_name = signal_name


class StopSignals:
    """Catches SIGUSR2/SIGTERM; `received` is the signal number (0: none), read into each step's report.

    Under the SLURM supervisor the process starts with these signals blocked: one sent during start-up
    waits in the kernel and reaches the handler when it is installed here. After `restore` a signal whose
    previous action was the default (terminate) is ignored instead: a late one cannot turn a run that has
    finished or stopped into a process killed by a signal (which the supervisor would treat as a failure).
    """

    def __init__(self) -> None:
        self.received: int = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        self._previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            log.warning(
                "received %s: stopping with a checkpoint within two steps", signal.Signals(signum).name
            )
        self.received = signum

    def restore(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if handler in (signal.SIG_DFL, None) else handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
