"""What a step folder holds: the files each backend wrote on a rank, and rank 0's check that the ranks'
reports cover every file DCP's index points into, before a manifest may name the step complete."""

from __future__ import annotations

import itertools
from importlib import metadata
from pathlib import Path
from typing import Any

from trainer.checkpoint.dcp_read import METADATA, data_files, read_metadata

MODEL_CONFIG = "model_config.json"
"""The model's `transformers` config, read by export and model.init_from."""
MODEL_CODE = "model_code"
"""The model's own Python files (a config with an `auto_map`), so that a checkpoint loads without its source
folder; they run only when the loading command trusts them."""


def model_code_files(hf_config: Any) -> dict[str, str]:
    """{file name: text} of the model's own code: the Python files of the package its config class was
    imported from by `trust_remote_code` (transformers' dynamic modules); {} for a model transformers ships."""
    import sys

    if not getattr(hf_config, "auto_map", None):
        return {}
    module = sys.modules.get(type(hf_config).__module__)
    if (
        module is None
        or not getattr(module, "__file__", None)
        or not module.__name__.startswith("transformers_modules.")
    ):
        return {}
    folder = Path(module.__file__).parent
    return {path.name: path.read_text() for path in sorted(folder.glob("*.py")) if path.name != "__init__.py"}


class IncompleteReportError(RuntimeError):
    """The ranks' reports miss a file the backend wrote: no manifest is written for that step."""


def backend_files(backend: Any, step_dir: Path, rank: int) -> list[str]:
    """The files the backend wrote on this rank in this save, relative to `step_dir`.

    A backend that records its writes says so (DeepSpeed: `saved_files`). For FSDP these are DCP's
    names: FileSystemWriter writes `__{rank}_{i}.distcp` (i < its thread count) on each rank, and the
    coordinator (rank 0) `.metadata`; FSDPBackend.save writes scheduler.json on rank 0. Each is this
    rank's own file, so `is_file` is reliable even on NFS (close-to-open consistency); rank 0 checks
    the result against DCP's own index (`check_complete`).
    """
    reported = getattr(backend, "saved_files", None)
    if reported is not None:
        return [str(Path(path).relative_to(step_dir)) for path in reported()]
    if backend.name != "fsdp":
        raise TypeError(f"backend {backend.name} does not report the files it saves")
    names = []
    for index in itertools.count():
        name = f"model/__{rank}_{index}.distcp"
        if not (step_dir / name).is_file():
            break
        names.append(name)
    if rank == 0:
        names += [f"model/{METADATA}", "scheduler.json"]
    return names


def check_complete(backend: Any, step_dir: Path, files: dict[str, Any]) -> None:
    """Rank 0: every data file that DCP's index points into was reported by some rank."""
    if backend.name != "fsdp":
        return
    unreported = sorted(f"model/{name}" for name in data_files(read_metadata(step_dir / "model")))
    unreported = [name for name in unreported if name not in files]
    if unreported:
        raise IncompleteReportError(
            f"DCP wrote {unreported}, which no rank reported; the manifest would not cover the checkpoint"
        )


def package_versions() -> dict[str, str]:
    """The versions a manifest records (those installed of the packages that write or read a step)."""
    names = ("llm-training", "torch", "transformers", "deepspeed", "mosaicml-streaming")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
