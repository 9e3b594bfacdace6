"""Cluster profiles: `configs/clusters/NAME.yaml` (or any path) read into a typed, validated dataclass.

A profile says where and how a job runs (partition, account, GPUs per node, setup lines, ...); the run
config says what it computes. Unknown keys and wrong types are user errors naming the key, like the run
config's. Profiles are plain YAML, not OmegaConf: setup lines are shell, where ${VAR} must stay as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from trainer.config import CONFIGS_DIR, resolve_config_path
from trainer.errors import UserError

CLUSTERS_DIR = CONFIGS_DIR / "clusters"

# sbatch options that submit sets itself: a profile's sbatch_extra must not change them behind its back.
RESERVED_SBATCH = {
    "nodes": "set the profile's nodes key or pass --nodes",
    "ntasks": "the task count is one per GPU (one per node without GPUs)",
    "ntasks-per-node": "the task count is one per GPU (one per node without GPUs)",
    "gpus-per-node": "set the profile's gpus_per_node key or pass --gpus-per-node",
    "time": "set the profile's time key or pass --time",
    "signal": "the warning signal's lead time is the run config's slurm.signal_lead_s",
    "output": "submitit writes its logs to RUN_DIR/submitit",
    "error": "submitit writes its logs to RUN_DIR/submitit",
    "open-mode": "logs are appended across requeues",
    "requeue": "jobs are always requeueable",
    "no-requeue": "a preempted job requeues itself",
    "array": "one run is one job",
}


@dataclass
class ClusterProfile:
    partition: str = ""
    """SLURM partition (required)."""
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    min_nodes: int | None = None
    """Start (and, after a requeue, come back) on as few as this many nodes when no more are free; None: always
    `nodes`. The global batch stays: micro batch x accumulation adapts to each allocation's world size, and the
    run resumes from its checkpoint on the new world size."""
    gpus_per_node: int = 0
    """One task per GPU; 0 means a CPU cluster: one task per node."""
    gpu: str | None = None
    """The GPU model (h100, h200, a100-80gb, ...: launcher/plan.py GPUS) for the memory/time plan of a dry run."""
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    """Memory per node in GB; None leaves SLURM's default."""
    time: str = "01:00:00"
    """Time limit of each allocation; a longer run continues through requeues (slurm.max_requeues)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before srun: module loads, environment activation."""
    sbatch_extra: dict[str, Any] = field(default_factory=dict)
    """Further sbatch options, e.g. {exclusive: true, mail-type: END}."""
    name: str = ""
    """Where the profile came from (set by load_profile, not a YAML key)."""

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def node_counts(self) -> range:
        """Every node count an allocation of this profile may have."""
        return range(self.min_nodes or self.nodes, self.nodes + 1)

    @property
    def sbatch_nodes(self) -> int | str:
        """sbatch --nodes: N, or MIN-MAX with min_nodes."""
        low = self.node_counts.start
        return self.nodes if low == self.nodes else f"{low}-{self.nodes}"

    @property
    def time_s(self) -> int:
        return parse_time(self.time)


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(text: str) -> int:
    """Seconds of a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    match = _TIME.match(str(text).strip())
    if not match:
        raise UserError(
            f"time '{text}' is not a SLURM time limit; write MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 04:00:00"
        )
    days, first, second, third = (int(part) if part else None for part in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = first * 3600 + second * 60 + third
    elif second is not None:  # MM:SS
        seconds = first * 60 + second
    else:  # MM
        seconds = first * 60
    if seconds <= 0:
        raise UserError(f"time '{text}' must be longer than zero")
    return seconds


def format_time(seconds: int) -> str:
    """HH:MM:SS (D-HH:MM:SS from one day on), the form sbatch --time takes."""
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


class _ProfileLoader(yaml.SafeLoader):
    """YAML 1.1 reads `12:00:00` as the base-60 integer 43200: keep time-like scalars strings."""


_ProfileLoader.yaml_implicit_resolvers = {
    first: ([("tag:yaml.org,2002:str", re.compile(r"^\d+(?:-\d+)?(?::\d+)+$"))] if first.isdigit() else [])
    + list(resolvers)
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def resolve_profile_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a profile in configs/clusters/."""
    return resolve_config_path(name_or_path, CLUSTERS_DIR, what="cluster profile", name_kind="profile name")


# key -> (accepted types, may be null, what to write instead)
_KEYS: dict[str, tuple[tuple[type, ...], bool, str]] = {
    "partition": ((str,), False, "a partition name"),
    "account": ((str,), True, "an account name or null"),
    "qos": ((str,), True, "a QOS name or null"),
    "constraint": ((str,), True, "a node feature expression or null"),
    "nodes": ((int,), False, "a whole number"),
    "min_nodes": ((int,), True, "a whole number up to nodes, or null"),
    "gpus_per_node": ((int,), False, "a whole number (0 on CPU clusters)"),
    "gpu": ((str,), True, "a GPU model such as h100, or null"),
    "cpus_per_task": ((int,), True, "a whole number or null"),
    "mem_gb": ((int, float), True, "a number of GB or null"),
    "time": ((str, int), False, 'a time limit like "04:00:00"'),
    "setup": ((list,), False, "a list of shell lines"),
    "sbatch_extra": ((dict,), False, "a mapping of sbatch options"),
}


def _check_key(where: str, key: str, value: Any) -> Any:
    """The value of one profile key, or a UserError naming the key and what it should be."""
    types, nullable, expected = _KEYS[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, types):
        raise UserError(f"{where}: key '{key}' must be {expected}, not {value!r}")
    if key == "setup" and not all(isinstance(line, str) for line in value):
        raise UserError(f"{where}: key 'setup' must be a list of shell lines (strings), not {value!r}")
    if key == "time":
        return str(value)  # a bare number is minutes, as for sbatch
    if key == "mem_gb":
        return float(value)
    return value


def load_profile(name_or_path: str) -> ClusterProfile:
    """Read and validate a cluster profile (plain YAML: no interpolation, shell lines stay as written)."""
    path = resolve_profile_path(name_or_path)
    where = f"cluster profile '{path}'"
    try:
        raw = yaml.load(path.read_text(), Loader=_ProfileLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        raise UserError(f"{where} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(raw, dict):
        raise UserError(f"{where} must hold a mapping of keys (partition: ..., nodes: ...)")
    unknown = sorted(str(key) for key in raw if key not in _KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'; profile keys are {', '.join(_KEYS)}")
    if "partition" not in raw:
        raise UserError(f"{where}: key 'partition' is required")
    values = {key: _check_key(where, key, value) for key, value in raw.items()}
    profile = ClusterProfile(**values)
    profile.name = path.stem if path.parent.resolve() == CLUSTERS_DIR.resolve() else str(path.resolve())
    validate_profile(profile, where)
    return profile


def with_overrides(
    profile: ClusterProfile,
    nodes: int | None,
    gpus_per_node: int | None,
    time: str | None,
    min_nodes: int | None = None,
) -> ClusterProfile:
    """The profile with the command line's --nodes/--min-nodes/--gpus-per-node/--time applied and validated."""
    options = (("nodes", nodes), ("min_nodes", min_nodes), ("gpus_per_node", gpus_per_node), ("time", time))
    changes = {key: value for key, value in options if value is not None}
    updated = replace(profile, **changes)
    validate_profile(updated, "command line")
    return updated


def validate_profile(profile: ClusterProfile, where: str) -> None:
    problems = []
    if not profile.partition.strip():
        problems.append("partition must not be empty")
    for key, low in (
        ("nodes", 1),
        ("min_nodes", 1),
        ("gpus_per_node", 0),
        ("cpus_per_task", 1),
        ("mem_gb", 0),
    ):
        value = getattr(profile, key)
        if value is not None and value < low:
            problems.append(f"{key}={value} must be >= {low}")
    if profile.min_nodes is not None and profile.min_nodes > profile.nodes:
        problems.append(f"min_nodes={profile.min_nodes} must not exceed nodes={profile.nodes}")
    try:
        parse_time(profile.time)
    except UserError as error:
        problems.append(str(error))
    for key, value in profile.sbatch_extra.items():
        option = str(key).replace("_", "-")
        if option in RESERVED_SBATCH:
            problems.append(f"sbatch_extra '{key}' is set by submit ({RESERVED_SBATCH[option]})")
        elif not isinstance(value, (str, int, float, bool)):
            problems.append(f"sbatch_extra '{key}' must be a string, number or true, not {value!r}")
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))
