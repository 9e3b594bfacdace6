"""From a checkpoint of either backend to a Hugging Face model folder that a serving stack takes as it is.

The folder: safetensors shards of at most 5 GB (with their index when there are several) in the chosen dtype,
a `README.md` model card (trainer/models/model_card.py), `config.json` and `generation_config.json` with the tokenizer's own bos/eos/pad ids and the KV cache on, the
tokenizer (its chat template when the run had one; a pad token; the model's context as `model_max_length`; only
the inputs a causal LM takes), `llm_training.json` (step, absolute data path) and `checksums.sha256` over every
file. It appears at `--out` whole or not at all (written to a temporary sibling, then renamed), readable by other
accounts as the umask allows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig

from trainer.errors import UserError
from trainer.models.load import TRAINING_INFO, load_any
from trainer.models.model_card import model_card, run_folder
from trainer.models.pretrained import context_length

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SHARD_SIZE = "5GB"
CHECKSUMS = "checksums.sha256"


def export(
    path: str | Path, out: Path, trust_remote_code: bool = False, dtype: str = "bf16", license: str = "other",
    language: str = "en",
) -> Path:  # fmt: skip
    """Write the model folder described in the module docstring into `out`, atomically."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out '{out}' already exists and is not an empty folder; choose a new folder")
    loaded = load_any(path, trust_remote_code)
    model = loaded.model.to(DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = None
        if loaded.tokenizer_dir is not None:
            tokenizer = serving_tokenizer(loaded.tokenizer_dir, context_length(model.config))
            set_special_ids(model, tokenizer)
            tokenizer.save_pretrained(tmp)
        else:
            log.warning("no tokenizer found for %s: the export holds the model only", path)
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        data_path = str(Path(loaded.data_path).resolve()) if loaded.data_path else None
        (tmp / TRAINING_INFO).write_text(json.dumps({"step": loaded.step, "data_path": data_path}))
        card = model_card(model, run_folder(Path(path)), loaded.step, data_path, dtype, license, language)
        (tmp / "README.md").write_text(card)
        write_checksums(tmp)
        make_readable(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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


def set_special_ids(model: torch.nn.Module, tokenizer) -> None:  # noqa: ANN001
    """bos/eos/pad ids of the config and the generation config from the tokenizer the model was trained with
    (a family's defaults, such as GPT-2's 50256, name another tokenizer's tokens)."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    for name, value in ids.items():
        setattr(model.config, name, value)
    model.generation_config = GenerationConfig(**ids, use_cache=True)


def write_checksums(folder: Path) -> None:
    """`sha256sum -c checksums.sha256` checks every file of the folder."""
    lines = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        lines.append(f"{digest.hexdigest()}  {file.relative_to(folder)}\n")
    (folder / CHECKSUMS).write_text("".join(lines))


def make_readable(folder: Path) -> None:
    """Files 0644 and folders 0755 less the umask: a temporary folder is created 0700, and a serving account
    must read the export."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o755 if path.is_dir() else 0o644) & ~umask)
