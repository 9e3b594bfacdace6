"""`llm-train doctor`: check what breaks runs before they are queued.

Each check is one small function that returns a `Check` (one line: ok, warn or fail). `run_checks` runs
them all and turns an exception escaping one of them into a fail line, so one broken probe never hides
the others. torch, DeepSpeed and the data reader are imported inside the checks: the CLI imports this
module lazily, and `llm-train --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from launcher.doctor.machine import (
    check_cuda,
    check_deepspeed,
    check_flash_attn,
    check_nccl,
    check_python_torch,
    check_slurm,
)
from launcher.doctor.report import STATUSES, Check, format_report
from launcher.doctor.run import check_batch, check_data, check_memory, check_run_folder, dataset_info
from trainer.errors import UserError

if TYPE_CHECKING:
    from launcher.profiles import ClusterProfile
    from trainer.config import Config

__all__ = ["STATUSES", "Check", "check_data", "check_flash_attn", "format_report", "run_checks"]


def run_checks(
    config_path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    profile: ClusterProfile | None = None,
) -> list[Check]:
    """Every check for this machine; with a config (path or preset, plus overrides) also its data, batch plan,
    memory and run folder, for the job's layout when a cluster profile is given.

    A config that does not load is one fail line (one cause, one line): the checks that need it are left out.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        # sinfo may take seconds to give up on a controller: ask it while the imports below run.
        slurm = pool.submit(_safely, "slurm", check_slurm)
        checks = [
            _safely("python", check_python_torch),
            _safely("cuda", check_cuda),
            _safely("nccl", check_nccl),
        ]
        with_config = config_path is not None or bool(overrides)
        config = None
        if with_config:
            config_check, config = _load(config_path, overrides)
            checks.append(config_check)
        checks += [
            _safely("flash-attn", check_flash_attn, config),
            _safely("deepspeed", check_deepspeed, config),
            slurm.result(),
        ]
    if config is not None:
        info = dataset_info(config)
        checks += [
            _safely("data", check_data, config),
            _safely("batch", check_batch, config, info, profile),
            _safely("memory", check_memory, config, info, profile),
            _safely("run-folder", check_run_folder, config, info),
        ]
    return checks


def _safely(name: str, check: Callable[..., Check], *args: object) -> Check:
    try:
        return check(*args)
    except Exception as error:  # a probe that breaks is a finding, not a crash of the doctor
        return _broken(name, error)


def _broken(name: str, error: Exception) -> Check:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return Check(name, "fail", f"the check itself failed: {type(error).__name__}: {first_line}")


def _load(config_path: str | None, overrides: list[str] | tuple[str, ...]) -> tuple[Check, Config | None]:
    from trainer.config import load_config

    try:
        config = load_config(config_path, list(overrides))
    except UserError as error:
        return Check(
            "config", "fail", f"{error} (data, batch, memory and run folder are checked once it loads)"
        ), None
    except Exception as error:
        return _broken("config", error), None
    where = config_path if config_path is not None else "defaults"
    return Check(
        "config",
        "ok",
        f"{where} loads: model {config.model.family_name}, "
        f"parallel.backend={config.parallel.backend}, train.precision={config.train.precision}",
    ), config
