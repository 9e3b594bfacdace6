"""What each task of a submitted job runs (submitit unpickles and calls `run_task` on the compute node).

Signals: submitit's job process installs its own SIGUSR2 handler (checkpoint and `scontrol requeue`)
and a SIGTERM handler. The trainer must be the only one that reacts (it saves first and counts
requeues; a second requeue by submitit would restart the job twice), so `run_task` replaces those
handlers before anything else. A signal that arrives before the trainer has installed its own
handlers (imports, model set-up) is held and re-sent as soon as it has, so an early preemption stops
the run after its first step instead of being lost or killing it. After training, signals are ignored:
a finished run is never requeued.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class HeldSignals:
    """Owns SIGUSR2/SIGTERM whenever the trainer does not: holds a signal and re-sends it once the
    trainer's handler is installed (see the module docstring)."""

    def __init__(self) -> None:
        self.held: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGCONT, signal.SIG_DFL)  # submitit only logs it

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.held is None:
            self.held = signum
            threading.Thread(target=self._resend, args=(signum,), daemon=True).start()

    def _resend(self, signum: int) -> None:
        while signal.getsignal(signum) == self._handle:
            time.sleep(0.1)
        os.kill(os.getpid(), signum)


def run_task(trainer_args: list[str]) -> int:
    """One SLURM task: train in this process; rank and world size come from SLURM's variables."""
    HeldSignals()
    from trainer.main import main

    code = main(trainer_args)
    # Training is over: no signal may requeue or kill it now. SIG_IGN (unlike a Python handler) also
    # holds while the interpreter shuts down, so a late SIGUSR2 cannot turn a finished job into FAILED.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if code:
        raise SystemExit(code)  # keeps the trainer's exit code (2: user error) as the task's
    return code
