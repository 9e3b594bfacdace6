"""Rank discovery from torchrun variables, then SLURM's, then a single process."""

from __future__ import annotations

import pytest

from trainer.distributed import detect_env, first_host


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node1", "node1"),
        ("node[1-2]", "node1"),
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("a01,b02", "a01"),
        ("n[7,2]", "n7"),
    ],
)
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_variables_win():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "h", "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "9"})  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.master_addr, env.master_port) == (
        3,
        4,
        1,
        1,
        "h",
        1234,
    )


def test_slurm_variables_when_torchrun_is_absent():
    env = detect_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_TASKS_PER_NODE": "4(x2)",
            "SLURM_JOB_NODELIST": "gpu[12-13]",
            "SLURM_JOB_ID": "4242",
        }  # fmt: skip
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (5, 8, 1, 4, 1)
    assert env.master_addr == "gpu12"
    assert env.master_port == 29500 + 4242


def test_single_process_default():
    env = detect_env({})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (0, 1, 0, True)
