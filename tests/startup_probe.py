"""One rank of a training run's model start-up, for tests/test_startup_memory.py.

Started as `llm-train train` starts its ranks (torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), it
builds the model as `run_training` does (`model_source`, `model_facts` of the meta model, `build_backend`),
once per backend named in --backends, one after the other in the same process group, and writes
OUT_DIR/BACKEND-rankN.json: the growth of the process's peak resident memory over the construction, the
files it opened meanwhile (and those of reading the weights: `model_source`, and each tensor read from
init_from's files, whose names it lists), and what the backend ended with (training mode, embeddings tied as configured). With
--weights, rank 0 also writes the initial state, gathered from the shards, and the non-persistent
buffers to OUT_DIR/BACKEND-weights.pt.

usage: python -m tests.startup_probe OUT_DIR --backends=fsdp,deepspeed [--weights] [--tmpdir=DIR] key=value ...
(started by launch_local, as forks of the rank server)
(overrides on configs/tiny.yaml; model.vocab_size and model.seq_len are required: there is no dataset)
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import Config, batch_plan, load_config  # noqa: E402
from trainer.distributed import DistEnv, distributed  # noqa: E402
from trainer.models import weight_files  # noqa: E402
from trainer.models.attention import choose_attention  # noqa: E402
from trainer.models.build import ModelRecipe, decoder_layers, model_facts  # noqa: E402
from trainer.parallel import Backend, build_backend, model_source  # noqa: E402
from trainer.train import seed_everything  # noqa: E402


def memory_kib(field: str) -> int:
    """A line of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (the peak of VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Make VmHWM start again from the current VmRSS (Linux >= 4.0), so that it measures only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


class OpenedFiles:
    """The files this process opens or the folders it makes (any Python-level open: builtins, io, os,
    pathlib, tempfile) while `recording`, from the interpreter's audit events."""

    def __init__(self) -> None:
        self.recording = False
        self.paths: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.recording and event in ("open", "os.mkdir") and isinstance(args[0], str | bytes | Path):
            path = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            self.paths.append(str(Path(path).absolute()))


def peak_before_engine(record: dict[str, int]) -> None:
    """Record VmHWM as DeepSpeed's engine starts: the model is built and partitioned by then, and what the
    engine allocates next (optimizer partitions, gradient buckets sized by its config) is not the model."""
    import deepspeed

    initialize = deepspeed.initialize

    def recorded(*args: Any, **kwargs: Any) -> Any:
        record["hwm_model_kib"] = memory_kib("VmHWM")
        return initialize(*args, **kwargs)

    deepspeed.initialize = recorded


def initial_state(backend: Backend) -> dict[str, torch.Tensor]:
    """Rank 0: the whole model state gathered from either backend's shards, plus every non-persistent
    buffer as `buffer:NAME` (no state dict carries those); the other ranks: {}."""
    module: Any = backend.module
    if backend.name == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    persistent = set(module.state_dict())
    for name, buffer in module.named_buffers():
        if name not in persistent:
            state[f"buffer:{name}"] = buffer.detach().cpu().clone()
    return state


def observe_weight_reads(opened: OpenedFiles, names: list[str], by_reads: list[str]) -> None:
    """Note every tensor this rank reads from init_from's files (`names`) and the files opened meanwhile."""
    for reader in (weight_files.DcpWeights, weight_files.DeepSpeedWeights, weight_files.SafetensorsWeights):

        def read(self: Any, saved_name: str, _read: Any = reader.read) -> torch.Tensor:
            before = len(opened.paths)
            tensor = _read(self, saved_name)
            names.append(saved_name)
            by_reads.extend(opened.paths[before:])
            return tensor

        reader.read = read


def probe(config: Config, env: DistEnv, opened: OpenedFiles, out: Path, weights: bool) -> None:
    vocab_size, seq_len = config.model.vocab_size, config.model.seq_len
    plan = batch_plan(config.train, env.world_size, seq_len)
    seed_everything(config.run.seed)
    attn = choose_attention(config.model.attn, env.device, config.train.precision)
    recipe = ModelRecipe(config.model, vocab_size, seq_len, attn, config.run.seed)
    engine_start: dict[str, int] = {}
    if config.parallel.backend == "deepspeed":
        peak_before_engine(engine_start)
    gc.collect()
    dist.barrier()
    reset_peak()
    rss_before = memory_kib("VmRSS")
    opened.paths.clear()
    opened.recording = True
    weights_read: list[str] = []
    opened_by_reads: list[str] = []
    observe_weight_reads(opened, weights_read, opened_by_reads)
    source = model_source(recipe, env)
    opened_by_source = list(opened.paths)
    meta = source.meta()
    facts = model_facts(meta, seq_len, config.model.arch)
    backend = build_backend(config, source, plan, env)
    del source
    opened.recording = False
    hwm_after = memory_kib("VmHWM")
    module: Any = backend.module
    report = {
        "rank": env.rank,
        "world_size": env.world_size,
        "backend": backend.name,
        "rss_before_kib": rss_before,
        "hwm_after_kib": hwm_after,
        "hwm_model_kib": engine_start.get("hwm_model_kib", hwm_after),
        "fp32_model_bytes": 4 * sum(param.numel() for param in meta.parameters()),
        "fp32_layer_bytes": 4 * sum(param.numel() for param in decoder_layers(meta)[0].parameters()),
        "weights_read": weights_read,
        "n_params": facts.n_params,
        "training": module.training,
        "tied": (module.get_output_embeddings().weight is module.get_input_embeddings().weight)
        == module.config.tie_word_embeddings,
        "opened": opened.paths,
        "opened_by_source": opened_by_source + opened_by_reads,
    }
    state = initial_state(backend) if weights else {}
    if state:
        torch.save(state, out / f"{backend.name}-weights.pt")
    (out / f"{backend.name}-rank{env.rank}.json").write_text(json.dumps(report))
    dist.barrier()


def return_freed_memory() -> None:
    """glibc gives every allocation above 128 KiB back to the system when it is freed (M_MMAP_THRESHOLD; by
    default it keeps freed heap memory resident, more or less depending on the timing of the ranks), so that
    the peak resident memory measures what the code holds."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD


def main(argv: list[str]) -> None:
    return_freed_memory()
    out, weights = Path(argv[0]), "--weights" in argv
    tmpdir = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--tmpdir=")), None)
    if tmpdir:  # where temporary files go from here on (a fork of the rank server keeps its environment)
        os.environ["TMPDIR"] = tmpdir
        tempfile.tempdir = None
    backends = next(arg for arg in argv if arg.startswith("--backends=")).split("=", 1)[1].split(",")
    overrides = [arg for arg in argv[1:] if not arg.startswith("--")]
    opened = OpenedFiles()
    with distributed(600) as env:
        for backend in backends:
            config = load_config(
                "tiny", ["run.dir=unused", "data.path=unused", f"parallel.backend={backend}", *overrides]
            )
            probe(config, env, opened, out, weights)


if __name__ == "__main__":
    main(sys.argv[1:])
