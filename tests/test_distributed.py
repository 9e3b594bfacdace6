"""Rank discovery from torchrun variables, then SLURM's, then a single process; master host and port."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from trainer.distributed import DEFAULT_PORT, check_port_free, detect_env, first_host, master_host, slurm_port

NODELISTS = [
    ("node1", "node1"),
    ("node[1-2]", "node1"),
    ("gpu[003-005,9],cpu1", "gpu003"),
    ("a01,b02", "a01"),
    ("n[7,2]", "n7"),
    ("rack[1-2]-gpu[01-08]", "rack1-gpu01"),
    ("rack[3,5]-gpu[008-016],rack9-gpu1", "rack3-gpu008"),
    ("a[1,3-5],b7", "a1"),
    ("gpu[0007]", "gpu0007"),
]


@pytest.mark.parametrize(("nodelist", "host"), NODELISTS)
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "a[1", "a]1[", ","])
def test_unparseable_nodelist_is_an_error_naming_it(nodelist):
    with pytest.raises(ValueError, match="cannot parse SLURM node list"):
        first_host(nodelist)


@pytest.mark.skipif(
    shutil.which("scontrol") is None, reason="scontrol is not installed (the local SLURM cluster)"
)
@pytest.mark.parametrize(("nodelist", "host"), NODELISTS)
def test_master_host_is_scontrols_first_hostname(nodelist, host):
    scontrol = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    master_host.cache_clear()
    assert master_host(nodelist) == scontrol.stdout.split()[0] == host


def test_master_host_without_scontrol_parses_the_nodelist(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no scontrol on this PATH
    master_host.cache_clear()
    try:
        assert master_host("rack[1-2]-gpu[01-08]") == "rack1-gpu01"
    finally:
        master_host.cache_clear()


@pytest.mark.parametrize("job_id", [0, 1, 4242, 9999, 10000, 12345, 2**31 - 1, 10**12 + 7])
def test_slurm_port_stays_in_20000_29999_for_any_job_id(job_id):
    port = slurm_port(job_id)
    assert 20000 <= port <= 29999  # below the ephemeral range 32768-60999, above the privileged ports


def test_neighbouring_jobs_get_different_ports():
    assert len({slurm_port(job_id) for job_id in range(123456, 123456 + 100)}) == 100


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
    assert env.master_port == slurm_port(4242) == 24242


def test_each_attempt_of_a_job_rendezvous_on_another_port():
    """Something of a killed attempt may still hold its port: the requeued attempt must not need it."""
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n1"}
    ports = [detect_env({**base, "SLURM_RESTART_COUNT": str(restart)}).master_port for restart in range(20)]
    assert len(set(ports)) == 20 and all(20000 <= port <= 29999 for port in ports)
    assert ports[0] == slurm_port(4242) and ports[1] == slurm_port(4242, 1)
    assert slurm_port(4242, 1) != slurm_port(4243, 0)  # the next job's first attempt


def test_a_taken_rendezvous_port_is_named_before_the_process_group_starts():
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"rendezvous port {port} on .* is taken"):
            check_port_free(port)
    check_port_free(port)  # free again


def test_slurm_master_port_variable_wins_over_the_job_id():
    env = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77", "MASTER_PORT": "29999"})
    assert env.master_port == 29999


def test_single_process_default():
    env = detect_env({})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (0, 1, 0, True)
    assert env.master_port == DEFAULT_PORT
