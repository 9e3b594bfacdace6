"""`model.init_from` on every rank at once: the checkpoint checked by all ranks, a share each, and its weights
read one tensor at a time by the rank that owns it (trainer/parallel/model_source.py), never by rank 0 alone.

Two kinds of folder are read so: llm-train's own checkpoints of either backend (a run folder or a step folder)
and Hugging Face folders of safetensors files. The others (`.bin` weights; a model name of the Hugging Face
cache; a folder whose names `from_pretrained` would have to convert; a checkpoint older than model_config.json)
are built in full by rank 0, as before, still checked by all ranks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainer.checkpoint import MODEL_CONFIG, ResumePoint, newest_valid_step, verify_step
from trainer.checkpoint.resume import agreed_point
from trainer.distributed import DistEnv
from trainer.models.build import ModelRecipe, check_family, check_fits, empty_model
from trainer.models.deferred_init import Recording, record, state_refs
from trainer.models.families import set_dropout
from trainer.models.families.hf import load_hf_config
from trainer.models.load import is_hf_folder, refuse_untrusted_code, saved_architecture
from trainer.models.weight_files import SafetensorsWeights, WeightFiles, checkpoint_weights, has_safetensors

log = logging.getLogger(__name__)


def verified_init_step(recipe: ModelRecipe, env: DistEnv) -> ModelRecipe:
    """`recipe` with init_from resolved to a checkpoint step that every rank checksummed a share of, where
    init_from is a run folder or a step folder; unchanged otherwise. A damaged newest step of a run folder
    gives way to the one before it, with a warning."""
    source = recipe.init_from or recipe.cfg.init_from
    path = Path(source).expanduser() if source else None
    if recipe.verified or path is None or not path.is_dir() or is_hf_folder(path):
        return recipe
    if (path / "checkpoints").is_dir():
        problem = f"run folder '{path}' has no complete checkpoint; train it first or name a step folder"

        def pick(failed: dict[Path, str]) -> ResumePoint | str:
            point = newest_valid_step(path / "checkpoints", checksums=False, skip=failed)
            return point or problem
    else:

        def pick(failed: dict[Path, str]) -> ResumePoint | str:
            manifest, problem = verify_step(path, checksums=False)
            if manifest is None or path in failed:
                return (
                    f"'{path}' is not a complete checkpoint ({failed.get(path, problem)}); give a RUN_DIR, a "
                    "step folder or an HF folder"
                )
            return ResumePoint(path, manifest)

    point = agreed_point(env, pick)
    assert point is not None  # pick never answers None
    return replace(recipe, init_from=str(point.step_dir), verified=True)


def saved_weights(recipe: ModelRecipe) -> tuple[Any, Recording, WeightFiles] | None:
    """(the model on the meta device, the recording of its construction, init_from's weights readable tensor by
    tensor), or None where init_from is not a folder read so, or one of the model's parameters is not in its
    files under any of its names (rank 0 then loads it in full, and says what does not fit). Every rank
    reads the config and the files' index itself (small files); the recording gives the buffers that no
    weight file holds (rotary frequencies, causal masks), as the model's constructor computes them."""
    cfg = recipe.cfg
    source = recipe.init_from or cfg.init_from
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    hf_folder = is_hf_folder(path)
    if hf_folder:
        if not has_safetensors(path):
            return None
        config = load_hf_config(str(path), cfg.trust_remote_code, "model.init_from")
    else:  # a step folder (verified_init_step resolved a run folder to its step)
        if not (path / MODEL_CONFIG).is_file():  # written before checkpoints kept the architecture
            return None
        values = json.loads((path / MODEL_CONFIG).read_text())
        refuse_untrusted_code(
            f"checkpoint '{path}'", values, cfg.trust_remote_code, "model.trust_remote_code=true"
        )
        config = saved_architecture(path, cfg)
    set_dropout(config, cfg.dropout)
    check_family(config, cfg.arch, source)
    check_fits(config, source, recipe.vocab_size, recipe.seq_len)
    model, recording = record(lambda: empty_model(config, cfg, recipe.attn))
    if hf_folder:
        files: WeightFiles = SafetensorsWeights(path, model.base_model_prefix)
    else:
        files = checkpoint_weights(path)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for group in state_refs(model).values():
        names = [name for name, _ in group]
        if files.find(names) is None and params.intersection(names):
            log.info(
                "model.init_from: %s is not in its weight files under that name; rank 0 loads it", names[0]
            )
            return None
    return model, recording, files
