"""Checks of this machine: Python and torch, CUDA devices, NCCL/gloo, flash-attn, DeepSpeed, SLURM.

torch and DeepSpeed are imported inside the checks, so that importing the CLI stays fast.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import TYPE_CHECKING

from launcher.doctor.report import Check

if TYPE_CHECKING:
    from trainer.config import Config

SLURM_COMMANDS = ("sinfo", "sbatch", "squeue", "scontrol")
SLURM_TIMEOUT_S = 10
FLASH_FIX = "pip install 'llm-training[flash]' on a GPU node; until then attention uses PyTorch SDPA"


def visible_gpus() -> list[tuple[str, tuple[int, int]]]:
    """Name and compute capability of every visible CUDA device (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        (torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
        for i in range(torch.cuda.device_count())
    ]


def check_python_torch() -> Check:
    python = f"Python {platform.python_version()}"
    try:
        import torch
    except Exception as error:  # ImportError, or a broken CUDA library under it (OSError)
        return Check("python", "fail", f"{python}; torch cannot be imported ({error}); run `make install`")
    return Check("python", "ok", f"{python}, torch {torch.__version__}")


def check_cuda() -> Check:
    import torch

    built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only torch build"
    gpus = visible_gpus()
    if not gpus:
        return Check("cuda", "warn", f"no CUDA device visible: training runs on CPU with gloo ({built})")
    found = ", ".join(f"{i}: {name} (sm {major}.{minor})" for i, (name, (major, minor)) in enumerate(gpus))
    old = [i for i, (_, capability) in enumerate(gpus) if capability < (8, 0)]
    if old:
        return Check(
            "cuda",
            "warn",
            f"{len(gpus)} GPU(s), {built}: {found}; device(s) {old} have compute capability < 8.0: "
            "no bf16 or flash attention there, use train.precision=fp32 (or fp16 with deepspeed)",
        )
    return Check("cuda", "ok", f"{len(gpus)} GPU(s), {built}: {found}")


def check_nccl() -> Check:
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return Check(
            "nccl", "fail", "torch.distributed is not available in this torch build; install a full torch"
        )
    gloo = "gloo available" if dist.is_gloo_available() else "gloo NOT available"
    if not torch.cuda.is_available():
        status = "warn" if dist.is_gloo_available() else "fail"
        return Check(
            "nccl", status, f"NCCL not available (no CUDA); {gloo}: local multi-process runs use gloo"
        )
    version = torch.cuda.nccl.version()
    version_text = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    if not dist.is_nccl_available():
        return Check(
            "nccl", "fail", f"CUDA is visible but NCCL is not built into torch; {gloo}; install a CUDA torch"
        )
    return Check("nccl", "ok", f"NCCL {version_text}; {gloo}")


def check_flash_attn(config: Config | None) -> Check:
    """flash-attn must import (a wheel built for another torch fails here) and have a GPU of sm >= 8.0."""
    try:
        import flash_attn
    except Exception as error:  # ImportError, or an ABI mismatch (OSError, undefined symbol)
        problem = f"flash-attn not importable ({type(error).__name__}: {error})"
    else:
        version = getattr(flash_attn, "__version__", "?")
        capable = [name for name, capability in visible_gpus() if capability >= (8, 0)]
        if capable:
            return Check("flash-attn", "ok", f"flash-attn {version} usable on {capable[0]}")
        problem = f"flash-attn {version} imports but no CUDA GPU of compute capability >= 8.0 is visible"
    if config is not None and config.model.attn == "flash_attention_2":
        return Check(
            "flash-attn",
            "fail",
            f"model.attn=flash_attention_2 but {problem}; use model.attn=auto or {FLASH_FIX}",
        )
    return Check("flash-attn", "warn", f"{problem}; {FLASH_FIX}")


def check_deepspeed(config: Config | None) -> Check:
    """Import DeepSpeed and ask its op builders whether their kernels could build here; nothing is compiled.

    The trainer runs DeepSpeed with torch's AdamW (`torch_adam`), so an incompatible op is a warning.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as trainer/parallel/deepspeed.py does
    try:
        import deepspeed
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops import op_builder
    except Exception as error:
        needed = config is not None and config.parallel.backend == "deepspeed"
        fix = (
            "parallel.backend=deepspeed needs it: `make install`"
            if needed
            else "only parallel.backend=deepspeed needs it"
        )
        return Check(
            "deepspeed",
            "fail" if needed else "warn",
            f"DeepSpeed cannot be imported ({type(error).__name__}: {error}); {fix}",
        )
    builders = [op_builder.FusedAdamBuilder(), op_builder.CPUAdamBuilder()]
    incompatible = [b.NAME for b in builders if not b.is_compatible(verbose=False)]
    ops = ", ".join(
        f"{b.NAME} {'NOT compatible' if b.NAME in incompatible else 'prebuilt' if installed_ops.get(b.NAME) else 'JIT on first use'}"
        for b in builders
    )
    detail = f"DeepSpeed {deepspeed.__version__} (accelerator {deepspeed.get_accelerator().device_name()}); ops: {ops}"
    if incompatible:
        return Check(
            "deepspeed", "warn", f"{detail}; runs use torch's AdamW, so only custom ops are affected"
        )
    return Check("deepspeed", "ok", detail)


def check_slurm() -> Check:
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if len(missing) == len(SLURM_COMMANDS):
        return Check(
            "slurm",
            "warn",
            "SLURM commands not found: `llm-train submit` needs a login node; `llm-train train` works locally",
        )
    if missing:
        return Check(
            "slurm", "warn", f"{', '.join(missing)} not on PATH; load the SLURM module of the login node"
        )
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=SLURM_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return Check(
            "slurm",
            "warn",
            f"sinfo did not answer within {SLURM_TIMEOUT_S} s: the controller is slow or down",
        )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return Check(
            "slurm",
            "warn",
            f"commands found but the controller does not answer ({reason}); `llm-train submit` fails until it does",
        )
    partitions = ", ".join(result.stdout.split()) or "none"
    return Check("slurm", "ok", f"controller answers; partitions: {partitions}")
