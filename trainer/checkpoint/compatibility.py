"""Can this config go on from the run's checkpoints? Read from manifests and saved configs, no checksums.

`llm-train submit` asks before it writes anything, so that a resubmission that cannot run (a model of another
shape or vocabulary, another backend, a run that has already finished) is an error on the login node, not a
failure on the compute nodes after the job has waited in the queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.checkpoint.manifest import read_manifest
from trainer.checkpoint.steps import belongs_to_run, read_run_id, step_folders
from trainer.config import Config, load_config, model_shape


def newest_checkpoint(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The run's newest step folder that has a readable manifest (its files are not checksummed)."""
    run_id = read_run_id(root)
    for folder in step_folders(root):
        try:
            manifest = read_manifest(folder)
        except ValueError:
            continue
        if belongs_to_run(manifest, run_id):
            return folder, manifest
    return None


def last_step(config: Config) -> int:
    """The step a run with this config trains to: train.stop_at_step when set, else train.max_steps."""
    stop_at = config.train.stop_at_step
    return min(config.train.max_steps, stop_at) if stop_at else config.train.max_steps


def model_facts(config: Config) -> dict[str, Any]:
    """What a checkpoint's tensors depend on, as config keys."""
    model = config.model
    return {
        "model.arch": model.arch,
        **{f"model.{key}": value for key, value in model_shape(model).items()},
        "model.vocab_size": model.vocab_size,
        "model.seq_len": model.seq_len,
        "parallel.backend": config.parallel.backend,
    }


def resume_conflicts(config: Config, run_dir: Path) -> list[str]:
    """Why `config` cannot go on from the checkpoints in `run_dir`, one line each (empty: it can)."""
    found = newest_checkpoint(run_dir / "checkpoints")
    if found is None or config.checkpoint.resume == "none":
        return []
    step_dir, manifest = found
    problems = []
    if int(manifest["step"]) >= last_step(config):
        problems.append(
            f"run.dir '{run_dir}' has already reached step {manifest['step']} (train.max_steps="
            f"{config.train.max_steps}); raise train.max_steps to train on, or use a new run.dir"
        )
    saved_path = step_dir / "config.yaml"
    if saved_path.is_file():
        saved, wanted = model_facts(load_config(str(saved_path), [])), model_facts(config)
        changed = [
            f"{key}={wanted[key]} (checkpoints: {saved[key]})"
            for key in saved
            if saved[key] != wanted[key] and None not in (saved[key], wanted[key])  # None: from the data
        ]
        if changed:
            problems.append(
                f"{', '.join(changed)} differs from the checkpoints in '{run_dir}'; keep the run's settings, "
                "or use a new run.dir (model.init_from="
                + str(run_dir)
                + " starts a new run from its weights)"
            )
    return problems
