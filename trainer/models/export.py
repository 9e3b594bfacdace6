"""From a checkpoint of either backend to a Hugging Face model folder that a serving stack takes as it is.

The folder: safetensors shards of at most 5 GB (with their index when there are several) in the chosen dtype,
a `README.md` model card (trainer/models/model_card.py), `config.json` and `generation_config.json` with the
tokenizer's own bos/eos/pad ids and the KV cache on, the tokenizer (its chat template when the run had one; a pad
token; the model's context as `model_max_length`; only the inputs a causal LM takes), `llm_training.json` (step,
absolute data path), with --gguf a `model-<type>.gguf` for llama.cpp, and `checksums.sha256` over every file. It appears at `--out` whole or not at all (written to
a temporary sibling, then renamed), readable by other accounts as the umask allows.

Streamed, not gathered: the checkpoint's shards are read one tensor at a time (DCP entries for FSDP, DeepSpeed's
partition files mapped into memory for ZeRO-3, whatever world size wrote them) and each output shard is written
as it fills, so the memory an export holds is one output shard plus one tensor, not the model: a 70B checkpoint
exports on a login node.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save

from trainer.checkpoint import MODEL_CONFIG
from trainer.config import load_config
from trainer.errors import UserError
from trainer.models.deferred_init import state_refs
from trainer.models.gguf_export import check_gguf_request, write_gguf
from trainer.models.load import (
    TRAINING_INFO,
    TRUST_FLAG,
    checkpoint_origin,
    is_hf_folder,
    load_any,
    model_from_checkpoint,
    refuse_untrusted_code,
    resolve_step_dir,
    saved_architecture,
)
from trainer.models.model_card import model_card, run_folder
from trainer.models.pretrained import context_length, tied_names
from trainer.models.safetensors_shards import PlannedTensor, ShardWriter
from trainer.models.weight_files import checkpoint_weights, read_checked

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SHARD_BYTES = 5 * 10**9
"""5 GB, as `save_pretrained` shards by default."""
CHECKSUMS = "checksums.sha256"


def export(
    path: str | Path, out: Path, trust_remote_code: bool = False, dtype: str = "bf16", license: str = "other",
    language: str = "en", max_shard_bytes: int = MAX_SHARD_BYTES, gguf: Sequence[str] = (),
) -> Path:  # fmt: skip
    """Write the model folder described in the module docstring into `out`, atomically; with `gguf`, also a
    llama.cpp file of each type named (trainer/models/gguf_export.py)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out '{out}' already exists and is not an empty folder; choose a new folder")
    source = export_source(Path(path), trust_remote_code)
    model = source.model
    for kind in gguf:
        check_gguf_request(kind, model.config.model_type)
    if gguf and source.tokenizer_dir is None:
        raise UserError(
            f"--gguf: no tokenizer found for {path} (llama.cpp needs it in the file); export from the run"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plan = [
            PlannedTensor(name, shape, stored_dtype(saved, dtype)) for name, shape, saved in source.shapes
        ]
        shards = ShardWriter(tmp, max_shard_bytes, plan)
        for name, tensor in source.tensors():
            shards.add(name, cast(name, tensor, dtype))
        shards.finish()
        tokenizer = None
        if source.tokenizer_dir is not None:
            tokenizer = serving_tokenizer(source.tokenizer_dir, context_length(model.config))
            tokenizer.save_pretrained(tmp)
        else:
            log.warning("no tokenizer found for %s: the export holds the model only", path)
        write_configs(model, tokenizer, dtype, tmp)
        data_path = str(Path(source.data_path).resolve()) if source.data_path else None
        (tmp / TRAINING_INFO).write_text(json.dumps({"step": source.step, "data_path": data_path}))
        card = model_card(model, run_folder(Path(path)), source.step, data_path, dtype, license, language)
        (tmp / "README.md").write_text(card)
        for kind in gguf:
            write_gguf(tmp, kind)
        write_checksums(tmp, known=shards.sha256)
        make_readable(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class ExportSource:
    """What an export reads: the model's modules (on the meta device when streamed), its tensors one at a time,
    and where it came from."""

    model: PreTrainedModel
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    shapes: list[tuple[str, tuple[int, ...], torch.dtype]]
    """(name, shape, dtype as saved) of each tensor `tensors` yields, in its order."""
    tokenizer_dir: Path | None
    step: int | None
    data_path: str | None


def export_source(path: Path, trust_remote_code: bool) -> ExportSource:
    """A checkpoint step (or a run's newest) with its architecture saved: streamed tensor by tensor from its
    shards, whatever backend and world size wrote them (memory: one tensor, plus the output shard being filled).
    Otherwise (an exported HF folder, a checkpoint older than model_config.json), the model loaded whole."""
    if path.exists() and not is_hf_folder(path):
        step_dir = resolve_step_dir(path)
        saved = step_dir / MODEL_CONFIG
        if saved.is_file():
            refuse_untrusted_code(
                f"checkpoint '{step_dir}'", json.loads(saved.read_text()), trust_remote_code, TRUST_FLAG
            )
            config = saved_architecture(step_dir, load_config(step_dir / "config.yaml").model)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            files = checkpoint_weights(step_dir)
            written = _written(model)
            shapes = [(names[0], ref.size, ref.dtype) for names, ref in written]
            where = f"checkpoint '{step_dir}'"
            tensors = lambda: (  # noqa: E731
                (names[0], read_checked(files, names, ref.size, where).to(ref.dtype))
                for names, ref in written
            )
            return ExportSource(model, tensors, shapes, *checkpoint_origin(step_dir))
        loaded = model_from_checkpoint(step_dir, trust_remote_code=trust_remote_code)  # verified above
    else:
        loaded = load_any(path, trust_remote_code)
    state = loaded.model.state_dict()
    kept = [name for name in state if name not in tied_names(loaded.model)]
    shapes = [(name, tuple(state[name].shape), state[name].dtype) for name in kept]
    tensors = lambda: ((name, state[name]) for name in kept)  # noqa: E731
    return ExportSource(loaded.model, tensors, shapes, loaded.tokenizer_dir, loaded.step, loaded.data_path)


def _written(model: PreTrainedModel) -> list[tuple[list[str], Any]]:
    """([its names], its meta view) of each tensor of the model's state, a tied weight once (under its first name,
    as `save_pretrained` writes it); the non-persistent buffers are not part of it."""
    persistent = model.state_dict(keep_vars=True)
    written = []
    for group in state_refs(model).values():
        names = [name for name, _ in group if name in persistent]
        if names:
            written.append((names, group[0][1]))
    return written


def stored_dtype(saved: torch.dtype, dtype: str) -> torch.dtype:
    """The export's dtype for floating-point tensors; others (integer buffers) as they are."""
    return DTYPES[dtype] if saved.is_floating_point else saved


def cast(name: str, tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """`tensor` as the export stores it; refused when a finite value would become infinite (fp16's range)."""
    converted = tensor.to(stored_dtype(tensor.dtype, dtype))
    if dtype == "fp16" and tensor.is_floating_point() and not torch.isfinite(converted).all():
        if torch.isfinite(tensor).all():
            raise UserError(
                f"--dtype fp16: {name} holds values beyond fp16's range (largest {tensor.abs().max().item():.3g}); "
                "export --dtype bf16 (the range of fp32) or fp32"
            )
    return converted


def write_configs(model: PreTrainedModel, tokenizer: Any, dtype: str, folder: Path) -> None:
    """config.json (architecture, dtype, the KV cache on, the tokenizer's own bos/eos/pad ids; and the model's
    code where it has its own) and generation_config.json, as `save_pretrained` would write them."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = DTYPES[dtype]
    config.use_cache = True
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
        for name, value in ids.items():
            setattr(config, name, value)
    config.save_pretrained(folder)
    GenerationConfig(**ids, use_cache=True).save_pretrained(folder)
    if getattr(config, "auto_map", None):
        custom_object_save(model, folder, config=config)


def serving_tokenizer(tokenizer_dir: Path, positions: int):  # noqa: ANN201 (a transformers tokenizer)
    """The run's tokenizer as `generate(**tokenizer(text, return_tensors="pt"))` needs it: only input ids and the
    attention mask (a causal LM takes no token type ids), a pad token (the end token when it has none, as for
    GPT-2), and the model's context as its maximum length."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names  # what save_pretrained writes
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = positions
    return tokenizer


def write_checksums(folder: Path, known: dict[str, str] | None = None) -> None:
    """`sha256sum -c checksums.sha256` checks every file of the folder; `known` digests (files hashed as they were
    written) are not read again."""
    digests = dict(known or {})
    lines = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(file.relative_to(folder))
        if name not in digests:
            digest = hashlib.sha256()
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digests[name] = digest.hexdigest()
        lines.append(f"{digests[name]}  {name}\n")
    (folder / CHECKSUMS).write_text("".join(lines))


def make_readable(folder: Path) -> None:
    """Files 0644 and folders 0755 less the umask: a temporary folder is created 0700, and a serving account
    must read the export."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o755 if path.is_dir() else 0o644) & ~umask)
