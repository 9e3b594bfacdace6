"""Test hook for SLURM jobs, imported by Python at start-up when this folder is on PYTHONPATH.

LLM_TEST_SLOW_STEPS="SECONDS[:ALLOCATIONS]" makes every training step SECONDS longer (a sleep in the step's
fault-injection point, before its optimizer update), in the job's first ALLOCATIONS allocations only (all when
omitted). Tests use it to keep a run busy until a signal arrives (preemption, time limit) while the next
allocation runs at full speed. It changes timing only, never what is computed.
"""

import os

_setting = os.environ.get("LLM_TEST_SLOW_STEPS", "")
if _setting:
    _seconds, _, _allocations = _setting.partition(":")
    _restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if not _allocations or _restart < int(_allocations):
        import time

        import trainer.resilience.fault_injection

        _step_faults = trainer.resilience.fault_injection.step_faults

        def _slow_step_faults(rank: int, step: int, _delay: float = float(_seconds)) -> None:
            time.sleep(_delay)
            _step_faults(rank, step)

        # Before trainer.loop imports it by name: the loop then calls this one.
        trainer.resilience.fault_injection.step_faults = _slow_step_faults
