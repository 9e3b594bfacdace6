"""Test hook for SLURM jobs, imported by Python at start-up when this folder is on PYTHONPATH.

LLM_TEST_SLOW_STEPS="SECONDS[:ALLOCATIONS]" makes every training step SECONDS longer (a sleep before the
per-step stop-signal check), in the job's first ALLOCATIONS allocations only (all when omitted). Tests use it to
keep a run busy until a signal arrives (preemption, time limit) while the next allocation runs at full speed.
It changes timing only, never what is computed.
"""

import os

_setting = os.environ.get("LLM_TEST_SLOW_STEPS", "")
if _setting:
    _seconds, _, _allocations = _setting.partition(":")
    _restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if not _allocations or _restart < int(_allocations):
        import time

        import trainer.resilience.preemption

        _agreed = trainer.resilience.preemption.StopSignals.agreed

        def _slow_agreed(self, _delay=float(_seconds)):
            time.sleep(_delay)
            return _agreed(self)

        trainer.resilience.preemption.StopSignals.agreed = _slow_agreed
