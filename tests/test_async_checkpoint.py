"""checkpoint.async in one process: staging buffers reused across saves, and `before_update` holding the
optimizer step until a background save has its copy, so that the checkpoint is the state at save time.

The kill -9 during a background write is tests/test_checkpoint.py::test_kill_9_in_the_middle_of_a_save.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.dcp_read import load_model_state
from trainer.checkpoint.steps import LATEST, step_dir_name
from trainer.config import batch_plan, load_config
from trainer.distributed import init_distributed, teardown
from trainer.models.build import ModelRecipe
from trainer.parallel import model_source
from trainer.parallel.fsdp import FSDPBackend

CONTEXT = 32


class DataPosition:
    """The loader's part of a checkpoint (its position); these tests read no data."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "sample_in_epoch": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[Any]:
    """A gloo process group of this process alone (what a one-rank run has), closed after the module."""
    saved = {key: os.environ.get(key) for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        yield init_distributed(60)
    finally:
        teardown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def setup(world_of_one, tmp_path) -> Iterator[tuple[CheckpointManager, FSDPBackend]]:
    """The tiny model's backend after one step (so AdamW has its moments), and a manager with async saves."""
    overrides = [f"run.dir={tmp_path}", "data.path=unused", "checkpoint.async=true", "checkpoint.keep_last=5"]
    config = load_config("tiny", overrides)
    source = model_source(ModelRecipe(config.model, 256, CONTEXT, "sdpa", seed=0), world_of_one)
    backend = FSDPBackend(config, source, batch_plan(config.train, 1), world_of_one)
    train_step(backend)
    yield CheckpointManager(config, world_of_one), backend
    backend.close()


def train_step(backend: FSDPBackend, manager: CheckpointManager | None = None) -> None:
    backend.forward_backward({"input_ids": torch.randint(0, 256, (2, CONTEXT))}, last_micro_batch=True)
    if manager is not None:
        manager.before_update()
    backend.step()


def save(manager: CheckpointManager, backend: FSDPBackend, step: int) -> Path:
    manager.save(step, {"step": step, "tokens": 0}, backend, DataPosition())
    return manager.root / step_dir_name(step)


def staging_buffers(backend: FSDPBackend) -> dict[int, int]:
    """The stager's host buffers: {data pointer: bytes}."""
    cached = backend._async_stager()._state_dict_stager._cached_storage_mapping
    return {storage.data_ptr(): storage.nbytes() for storage in cached.values()}


def snapshot(backend: FSDPBackend) -> dict[str, torch.Tensor]:
    """Copies of what a checkpoint holds as tensors, under DCP's flattened names (a tied weight once)."""
    state = backend._written_state(backend._dcp_state())
    flat = {f"model.{name}": tensor for name, tensor in state["model"].items()}
    for name, moments in state["optim"]["state"].items():
        flat.update({f"optim.state.{name}.{key}": value for key, value in moments.items()})
    return {name: _local(tensor).clone() for name, tensor in flat.items()}


def live_bytes(backend: FSDPBackend) -> int:
    """The bytes of the storages a checkpoint copies; tied weights share one."""
    state = backend._dcp_state()
    tensors = [*state["model"].values()]
    tensors += [value for moments in state["optim"]["state"].values() for value in moments.values()]
    storages = [(t.to_local() if isinstance(t, DTensor) else t).untyped_storage() for t in tensors]
    return sum({storage.data_ptr(): storage.nbytes() for storage in storages}.values())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def written(step_dir: Path) -> dict[str, torch.Tensor]:
    return {
        **{f"model.{k}": v for k, v in load_model_state(step_dir / "model").items()},
        **{f"optim.state.{k}": v for k, v in load_model_state(step_dir / "model", "optim.state.").items()},
    }


def test_staging_buffers_are_allocated_once_and_reused_across_saves(setup):
    manager, backend = setup
    save(manager, backend, 1)
    train_step(backend, manager)
    manager.wait()
    first = staging_buffers(backend)
    save(manager, backend, 2)
    train_step(backend, manager)
    manager.wait()
    assert sum(first.values()) == live_bytes(backend)  # a host copy of the whole state, each storage once
    assert staging_buffers(backend) == first  # the same buffers, none added


def test_before_update_waits_for_staging_and_the_checkpoint_is_the_state_at_save_time(setup):
    manager, backend = setup
    expected = snapshot(backend)
    gate = threading.Event()
    # Hold the stager's one worker thread, so that the save's copy cannot start until the gate opens.
    backend._async_stager()._staging_executor.submit(gate.wait, 30)
    step_dir = save(manager, backend, 1)
    backend.forward_backward({"input_ids": torch.randint(0, 256, (2, CONTEXT))}, last_micro_batch=True)
    waiter = threading.Thread(target=manager.before_update)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "before_update returned before the state was staged"
    gate.set()
    waiter.join(30)
    assert not waiter.is_alive()
    backend.step()  # training changes the weights and moments while the save is written
    manager.wait()
    assert (manager.root / LATEST).read_text().strip() == step_dir.name
    on_disk = written(step_dir)
    assert on_disk.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(on_disk[name], tensor), name
    changed = snapshot(backend)
    assert any(not torch.equal(changed[name], tensor) for name, tensor in expected.items())


def test_before_update_without_a_background_save_returns_at_once(setup):
    manager, backend = setup
    manager.config.checkpoint.async_save = False
    save(manager, backend, 1)
    waiter = threading.Thread(target=manager.before_update)
    waiter.start()
    waiter.join(5)
    assert not waiter.is_alive()
    assert (manager.root / LATEST).read_text().strip() == step_dir_name(1)
