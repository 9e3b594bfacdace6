"""Per-rank random number generator states: python, numpy, torch CPU and CUDA, as tensors and plain data.

The file is read back with `torch.load(weights_only=True)`, which rebuilds tensors, numbers, strings,
lists, tuples and dicts and nothing else: a checkpoint folder (copied from elsewhere, or tampered with)
can then never make the loading rank run code. So numpy's state (an ndarray inside a tuple) and
python's (a tuple of 625 ints) are stored as int64 tensors and numbers, not as the objects themselves.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import UserError

FORMAT = 2  # 1: the objects as returned by random.getstate() and np.random.get_state(), pickled


def rng_state() -> dict[str, Any]:
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "format": FORMAT,
        "python": {
            "version": version,
            "state": torch.tensor(words, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state of either format (a format-1 file that `weights_only` could load has plain tuples)."""
    python, numpy_state = state["python"], state["numpy"]
    if isinstance(python, dict):
        gauss_next = python["gauss_next"]
        random.setstate((int(python["version"]), tuple(int(w) for w in python["state"].tolist()), gauss_next))
    else:
        random.setstate(python)
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (
                numpy_state["name"],
                keys,
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            )
        )
    else:
        np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_file(path: Path, step_dir: Path) -> dict[str, Any]:
    """A rank's RNG state, read with weights_only=True (tensors and plain data, nothing that runs).

    A file written before RNG states were stored as tensors holds numpy's state as a pickled ndarray,
    which weights_only refuses: that checkpoint can no longer be resumed in full.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"checkpoint {step_dir} predates safe loading: {path.relative_to(step_dir)} holds pickled objects, "
            "which llm-train no longer unpickles (a checkpoint must never run code); start a new run.dir from its "
            f"weights with checkpoint.resume={step_dir} checkpoint.load=weights_only"
        ) from error
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys():
        raise UserError(f"{path} is not an RNG state file of llm-train; the checkpoint is damaged")
    return state
