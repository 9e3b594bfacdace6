"""`llm-train doctor`: check what breaks runs before they are queued.

Each check is one small function that returns a `Check` (one line: ok, warn or fail). `run_checks` runs
them all and turns an exception escaping one of them into a fail line, so one broken probe never hides
the others. torch, DeepSpeed and the data reader are imported inside the checks: the CLI imports this
module lazily, and `llm-train --help` stays fast.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.config import Config
    from trainer.data import DatasetInfo

STATUSES = ("ok", "warn", "fail")
SLURM_COMMANDS = ("sinfo", "sbatch", "squeue", "scontrol")
SLURM_TIMEOUT_S = 10
FLASH_FIX = "pip install 'llm-training[flash]' on a GPU node; until then attention uses PyTorch SDPA"
BYTES_PER_PARAM = 16
DEFAULT_VOCAB_SIZE = 50257  # GPT-2's tokenizer
DEFAULT_SEQ_LEN = 1024  # GPT-2's n_positions
SPLITS = ("train", "val")
CONFIG_CHECKS = ("data", "batch", "run-folder")


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it went, what was found (and for warn/fail, the fix)."""

    name: str
    status: str
    detail: str

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def run_checks(config_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> list[Check]:
    """Every check for this machine; with a config (path or preset, plus overrides) also its data and run folder.

    A config that does not load is a fail line, and the checks that need it are fail lines saying so.
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
        info = _dataset_info(config)
        checks += [
            _safely("data", check_data, config),
            _safely("batch", check_batch, config, info),
            _safely("run-folder", check_run_folder, config, info),
        ]
    elif with_config:
        checks += [Check(name, "fail", "not checked: the config did not load") for name in CONFIG_CHECKS]
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
        return Check("config", "fail", str(error)), None
    except Exception as error:
        return _broken("config", error), None
    where = config_path if config_path is not None else "defaults"
    return Check(
        "config",
        "ok",
        f"{where} loads: model.size={config.model.size}, "
        f"parallel.backend={config.parallel.backend}, train.precision={config.train.precision}",
    ), config


def _gpus() -> list[tuple[str, tuple[int, int]]]:
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
    gpus = _gpus()
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
        capable = [name for name, capability in _gpus() if capability >= (8, 0)]
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


def check_data(config: Config) -> Check:
    """The dataset reads like training reads it, and every shard listed in an index.json is there, whole."""
    from trainer.data import read_dataset_info

    try:
        info = read_dataset_info(config.data.path, config.data.remote)
    except UserError as error:
        return Check("data", "fail", str(error))
    found = f"'{info.source}': {info.train_samples} train / {info.val_samples} val samples of {info.seq_len} tokens"
    if "://" in info.source:
        return Check("data", "ok", f"{found}; remote shards are checked when streamed")
    shards = 0
    for split in SPLITS:
        split_dir = Path(info.source) / split
        if (split_dir / "index.json").is_file():
            listed = json.loads((split_dir / "index.json").read_text())["shards"]
            if problem := shard_problem(split_dir, listed):
                return Check("data", "fail", f"{problem}; re-run `llm-train prepare` or re-copy the dataset")
            shards += len(listed)
    return Check("data", "ok", f"{found}, {shards} shards present with their recorded sizes")


def shard_problem(split_dir: Path, shards: list[dict]) -> str | None:
    """The first missing, unreadable or wrongly sized shard of an index.json's list, or None if all are fine.

    A shard is present as its raw file or its compressed (zip) file; whichever is there must have the size
    index.json records for it.
    """
    for shard in shards:
        files = [shard["raw_data"]] + ([shard["zip_data"]] if shard.get("zip_data") else [])
        present = [
            (split_dir / f["basename"], f["bytes"]) for f in files if (split_dir / f["basename"]).is_file()
        ]
        if not present:
            return f"shard '{split_dir / files[-1]['basename']}' is missing"
        for path, recorded in present:
            size = path.stat().st_size
            if size != recorded:
                return (
                    f"shard '{path}' has {size} bytes, index.json records {recorded} (truncated or damaged)"
                )
            try:
                with path.open("rb") as handle:
                    handle.read(1)
            except OSError as error:
                return f"shard '{path}' is unreadable ({error.strerror})"
    return None


def check_batch(config: Config, info: DatasetInfo | None) -> Check:
    """The batch arithmetic for the devices of this machine (a cluster job's world size is checked by submit)."""
    from trainer.config import batch_plan

    world_size = max(len(_gpus()), 1)
    try:
        plan = batch_plan(config.train, world_size, info.seq_len if info else None)
    except UserError as error:
        return Check("batch", "warn", f"on this machine's {world_size} device(s): {error}")
    return Check("batch", "ok", plan.describe())


def _dataset_info(config: Config) -> DatasetInfo | None:
    """The dataset's shape for the estimates of other checks; None when unreadable (check_data says why)."""
    from trainer.data import read_dataset_info

    try:
        return read_dataset_info(config.data.path, config.data.remote)
    except Exception:
        return None


def estimate_params(config: Config, info: DatasetInfo | None) -> int:
    """GPT-2's parameter count from its shape, without building it (tied embeddings counted once).

    Per block: attention 4d^2 + 4d, MLP 8d^2 + 5d, two layer norms 4d; plus token and position
    embeddings and the final layer norm.
    """
    from trainer.config import model_shape

    shape = model_shape(config.model)
    d, layers = shape["n_embd"], shape["n_layer"]
    vocab = config.model.vocab_size or (info.vocab_size if info else None) or DEFAULT_VOCAB_SIZE
    seq_len = config.model.seq_len or (info.seq_len if info else None) or DEFAULT_SEQ_LEN
    return (vocab + seq_len) * d + layers * (12 * d * d + 13 * d) + 2 * d


def checkpoint_bytes(n_params: int) -> int:
    """A checkpoint's size estimate: fp32 weights (4 bytes a parameter) and AdamW's two fp32 moments (8),
    plus 4 bytes of margin for RNG, data-loader state and the backend's own bookkeeping: 16 bytes a parameter."""
    return n_params * BYTES_PER_PARAM


def check_run_folder(config: Config, info: DatasetInfo | None) -> Check:
    """run.dir (or its nearest existing parent) takes a new file and has room for keep_last + 1 checkpoints.

    keep_last + 1: the next checkpoint is written before the oldest one is deleted.
    """
    run_dir = Path(config.run.dir).expanduser()
    existing = next(parent for parent in (run_dir, *run_dir.absolute().parents) if parent.exists())
    where = f"run.dir='{run_dir}'" + (
        "" if existing == run_dir else f" (nearest existing folder '{existing}')"
    )
    if not existing.is_dir():
        return Check("run-folder", "fail", f"{where}: '{existing}' is not a folder; choose another run.dir")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".llm-train-doctor-"):
            pass
    except OSError as error:
        return Check(
            "run-folder", "fail", f"{where} is not writable ({error.strerror}); choose another run.dir"
        )
    n_params = estimate_params(config, info)
    count = config.checkpoint.keep_last + 1
    needed = count * checkpoint_bytes(n_params)
    free = shutil.disk_usage(existing).free
    found = (
        f"{where}: {_size(free)} free, {count} checkpoints (checkpoint.keep_last + 1) of "
        f"{_count(n_params)} parameters need ~{_size(needed)}"
    )
    if free < needed:
        return Check("run-folder", "fail", f"{found}; free space or lower checkpoint.keep_last")
    if free < 2 * needed:
        return Check("run-folder", "warn", f"{found}; less than twice that is free")
    return Check("run-folder", "ok", found)


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale / 10:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 2**10:.1f} KiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def format_report(checks: list[Check]) -> str:
    """One aligned line per check, then a count of each status."""
    width = max(len(check.name) for check in checks) + 1
    lines = [f"{check.status:<6}{check.name + ':':<{width}} {check.detail}" for check in checks]
    counts = {status: sum(check.status == status for check in checks) for status in STATUSES}
    summary = ", ".join(f"{counts[status]} {status}" for status in STATUSES)
    verdict = "runs will fail until the fail lines are fixed" if counts["fail"] else "nothing blocks a run"
    lines.append(f"{summary}: {verdict}")
    return "\n".join(lines)
