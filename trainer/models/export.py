"""From a checkpoint of either backend to a Hugging Face model, in one process, any original world size."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from trainer.errors import UserError
from trainer.models.load import TRAINING_INFO, load_any

log = logging.getLogger(__name__)


def export(path: str | Path, out: Path, trust_remote_code: bool = False) -> Path:
    """Write config.json, model.safetensors and the tokenizer into `out`, atomically."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' already exists and is not empty; choose a new folder")
    loaded = load_any(path, trust_remote_code)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        if loaded.tokenizer_dir is not None:
            AutoTokenizer.from_pretrained(loaded.tokenizer_dir).save_pretrained(tmp)
        else:
            log.warning("no tokenizer found for %s: the export holds the model only", path)
        (tmp / TRAINING_INFO).write_text(json.dumps({"step": loaded.step, "data_path": loaded.data_path}))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
