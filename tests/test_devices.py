"""Which GPU a rank uses: `cuda:(local_rank % visible devices)`, and a UserError when ranks would share one.

Pure decisions from (local rank, local world size, visible device count, environment): no GPU needed.
"""

from __future__ import annotations

import pytest
import torch

from trainer.distributed import DistEnv, choose_device, node_gpu_count
from trainer.errors import UserError

EIGHT = "0,1,2,3,4,5,6,7"


@pytest.mark.parametrize(
    "environ",
    [
        {},  # a workstation: nothing narrows what a process sees
        {"CUDA_VISIBLE_DEVICES": EIGHT, "SLURM_JOB_GPUS": EIGHT, "SLURM_STEP_GPUS": EIGHT},
        {"CUDA_VISIBLE_DEVICES": EIGHT, "TORCHELASTIC_RUN_ID": "none"},
    ],
)
def test_every_task_sees_all_gpus_rank_uses_its_local_rank(environ):
    assert [choose_device(rank, 8, 8, environ) for rank in range(8)] == [
        torch.device("cuda", r) for r in range(8)
    ]


@pytest.mark.parametrize(
    "environ",
    [
        {
            "CUDA_VISIBLE_DEVICES": "0",
            "SLURM_JOB_GPUS": EIGHT,
            "SLURM_STEP_GPUS": "3",
        },  # cgroups: each sees its own
        {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": EIGHT},  # --gpu-bind=single:1 under srun alone
        {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "5"},  # binding, step list narrowed to the task
        {"CUDA_VISIBLE_DEVICES": "0"},  # binding that says nothing more
    ],
)
def test_each_task_sees_one_gpu_every_rank_uses_cuda_0(environ):
    assert {choose_device(rank, 8, 1, environ) for rank in range(8)} == {torch.device("cuda", 0)}


def test_each_task_sees_two_gpus_of_its_own_rank_uses_one_of_them():
    environ = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15"}
    assert [choose_device(rank, 8, 2, environ).index for rank in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("device_count", "environ"),
    [
        (1, {"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "0"}),  # a one-GPU allocation, two tasks
        (1, {}),  # a one-GPU workstation, two processes
        (1, {"CUDA_VISIBLE_DEVICES": "0", "TORCHELASTIC_RUN_ID": "x"}),  # torchrun: every worker sees GPU 0
        (4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}),  # 4 GPUs seen by each of 8 tasks
        (4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_JOB_GPUS": "0,1,2,3", "SLURM_STEP_GPUS": "0,1,2,3"}),
        (1, {"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "0,1,2,3"}),  # per-task binding, 4 GPUs, 8 tasks
    ],
)
def test_two_ranks_on_one_gpu_is_a_user_error_naming_the_layout_and_the_fix(device_count, environ):
    local_world_size = 8 if device_count == 4 or "0,1,2,3" in environ.get("SLURM_JOB_GPUS", "") else 2
    for local_rank in range(local_world_size):  # every rank of the node refuses, not only some
        with pytest.raises(UserError) as raised:
            choose_device(local_rank, local_world_size, device_count, environ)
        message = str(raised.value)
        assert "\n" not in message
        assert f"the {local_world_size} ranks of this node (local ranks 0-{local_world_size - 1})" in message
        assert f"sees {device_count} device(s)" in message
        assert f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', 'unset')}" in message
        assert "--ntasks-per-node equal to --gpus-per-node" in message and "--gpus-per-task=1" in message


def test_no_gpu_is_the_cpu_whatever_the_layout():
    assert choose_device(3, 8, 0, {"CUDA_VISIBLE_DEVICES": ""}) == torch.device("cpu")


@pytest.mark.parametrize(
    ("device_count", "environ", "expected"),
    [
        (1, {"SLURM_JOB_GPUS": EIGHT, "SLURM_STEP_GPUS": "2"}, 8),
        (1, {"SLURM_STEP_GPUS": "2", "CUDA_VISIBLE_DEVICES": "0"}, None),  # the task's own list says nothing
        (1, {"SLURM_STEP_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0"}, 2),
        (2, {}, 2),
        (2, {"CUDA_VISIBLE_DEVICES": "0,1"}, None),
    ],
)
def test_node_gpu_count_from_the_environment(device_count, environ, expected):
    assert node_gpu_count(device_count, environ) == expected


def test_dist_env_device_on_a_cpu_machine_is_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("describes a machine without a CUDA device")
    assert DistEnv(5, 8, 1, 4, "h", 1).device == torch.device("cpu")


def test_dist_env_device_follows_the_visible_device_count(monkeypatch):
    """Each task sees one GPU (what `torch.cuda.device_count` says under per-task binding): local rank 3 -> cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("SLURM_JOB_GPUS", EIGHT)
    assert DistEnv(3, 8, 3, 8, "h", 1).device == torch.device("cuda", 0)
