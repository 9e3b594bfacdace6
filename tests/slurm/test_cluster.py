"""The local SLURM test cluster does what the launcher relies on: 2-node jobs with one task per node,
a gloo all-reduce across nodes, a private /dev/shm and /tmp per node, signals to running tasks, requeue."""

from __future__ import annotations

import json

import pytest
from slurm_helpers import NODES, PARTITION, run, sbatch, wait_for_file

pytestmark = pytest.mark.slurm

TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")

# Every job script below gets these: MASTER_ADDR is the first host of the allocation, as in the trainer.
MASTER = """\
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))  # below the ephemeral range (32768+)
"""


def test_partition_has_two_usable_nodes(slurm_cluster):
    out = run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N|%P|%T|%c|%a|%l"]).stdout
    rows = [line.split("|") for line in out.splitlines()]
    assert sorted(row[0] for row in rows) == list(NODES)
    for name, partition, state, cpus, avail, timelimit in rows:
        assert partition == f"{PARTITION}*", (
            f"{name}: {PARTITION} must be the default partition, got {partition}"
        )
        assert state in {"idle", "mixed", "allocated", "completing"}, f"{name} is {state}"
        assert int(cpus) >= 1 and avail == "up" and timelimit == "infinite"


def test_two_node_job_runs_one_task_per_node(slurm_cluster, slurm_tmp_path):
    script = f"""#!/bin/bash
{MASTER}
srun bash -c 'echo "$SLURMD_NODENAME $SLURM_NODEID $SLURM_PROCID $SLURM_NTASKS $SLURM_JOB_NUM_NODES $MASTER_ADDR" \\
    > {slurm_tmp_path}/task-$SLURM_PROCID.txt'
"""
    job = sbatch(script, slurm_tmp_path, *TWO_NODES, "--time=2", name="two-nodes")
    info = job.wait_finished(timeout=60)
    assert info["JobState"] == "COMPLETED", job.output()
    seen = sorted((slurm_tmp_path / f"task-{rank}.txt").read_text().split() for rank in range(2))
    assert seen == [["node1", "0", "0", "2", "2", "node1"], ["node2", "1", "1", "2", "2", "node1"]], (
        job.output()
    )


ALL_REDUCE = """\
import json, os, socket, sys
from datetime import timedelta

import torch
import torch.distributed as dist

rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group(
    "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    rank=rank, world_size=world, timeout=timedelta(seconds=60),
)
t = torch.tensor([rank + 1.0, 10.0 * (rank + 1)], dtype=torch.float64)
dist.all_reduce(t)
result = {"rank": rank, "world": world, "node": os.environ["SLURMD_NODENAME"], "sum": t.tolist()}
dist.destroy_process_group()
with open(os.path.join(sys.argv[1], f"rank-{rank}.json"), "w") as f:
    json.dump(result, f)
"""


def test_gloo_all_reduce_across_two_nodes(slurm_cluster, slurm_tmp_path):
    (slurm_tmp_path / "all_reduce.py").write_text(ALL_REDUCE)
    script = f"""#!/bin/bash
{MASTER}
srun {slurm_cluster.python} {slurm_tmp_path}/all_reduce.py {slurm_tmp_path}
"""
    job = sbatch(script, slurm_tmp_path, *TWO_NODES, "--time=3", name="all-reduce")
    info = job.wait_finished(timeout=90)
    assert info["JobState"] == "COMPLETED", job.output()
    results = [json.loads((slurm_tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["world"], r["node"]) for r in results] == [(0, 2, "node1"), (1, 2, "node2")]
    for r in results:
        assert r["sum"] == [3.0, 30.0]


PRIVATE_DIRS = """\
import os, sys, time

shared, job = sys.argv[1], os.environ["SLURM_JOB_ID"]
me = int(os.environ["SLURM_PROCID"])
other = 1 - me


def mark(name):
    open(os.path.join(shared, f"{name}-{me}"), "w").close()


def wait(name):
    path = os.path.join(shared, f"{name}-{other}")
    deadline = time.monotonic() + 45
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"rank {me}: the other rank never wrote {path}")
        time.sleep(0.1)


for folder in ("/dev/shm", "/tmp"):
    open(os.path.join(folder, f"llm-test-{job}-{me}"), "w").close()
mark("created")
wait("created")  # both ranks' files exist now
with open(os.path.join(shared, f"listing-{me}.txt"), "w") as f:
    for folder in ("/dev/shm", "/tmp"):
        for name in sorted(os.listdir(folder)):
            if name.startswith(f"llm-test-{job}-"):
                f.write(f"{folder}/{name}\\n")
mark("listed")
wait("listed")  # keep this rank's files until the other rank has looked
"""


def test_each_node_has_its_own_dev_shm_and_tmp(slurm_cluster, slurm_tmp_path):
    (slurm_tmp_path / "private_dirs.py").write_text(PRIVATE_DIRS)
    script = f"""#!/bin/bash
srun {slurm_cluster.python} {slurm_tmp_path}/private_dirs.py {slurm_tmp_path}
"""
    job = sbatch(script, slurm_tmp_path, *TWO_NODES, "--time=2", name="private-dirs")
    info = job.wait_finished(timeout=90)
    assert info["JobState"] == "COMPLETED", job.output()
    for rank in range(2):
        listing = (slurm_tmp_path / f"listing-{rank}.txt").read_text().split()
        # Each rank sees only its own files, although the other rank's exist at the same time.
        assert listing == [f"/dev/shm/llm-test-{job.job_id}-{rank}", f"/tmp/llm-test-{job.job_id}-{rank}"], (
            job.output()
        )


SIGNAL_TASK = """\
import os, signal, sys, time

shared = sys.argv[1]


def publish(name, line):  # the test waits for these files: write elsewhere, rename (they appear complete)
    path = os.path.join(shared, name)
    with open(f"{path}.tmp-{os.getpid()}", "w") as f:
        f.write(line + "\\n")
    os.replace(f"{path}.tmp-{os.getpid()}", path)


def on_usr2(signum, frame):
    publish("usr2.txt", f"{signum} {os.environ['SLURM_PROCID']} {os.environ['SLURMD_NODENAME']}")
    sys.exit(0)


signal.signal(signal.SIGUSR2, on_usr2)
publish("ready", "ready")
time.sleep(60)
sys.exit("no SIGUSR2 within 60 s")
"""


def test_scancel_signal_usr2_reaches_the_task(slurm_cluster, slurm_tmp_path):
    """`scancel --signal=USR2 JOBID` (no --batch) signals the job's steps: how preemption reaches the trainer."""
    (slurm_tmp_path / "signal_task.py").write_text(SIGNAL_TASK)
    script = f"""#!/bin/bash
srun {slurm_cluster.python} {slurm_tmp_path}/signal_task.py {slurm_tmp_path}
"""
    job = sbatch(script, slurm_tmp_path, "--nodes=1", "--time=2", name="usr2")
    try:
        wait_for_file(slurm_tmp_path / "ready", timeout=60, job=job)
        run(["scancel", "--signal=USR2", job.job_id])
        text = wait_for_file(slurm_tmp_path / "usr2.txt", timeout=30, job=job)
    except BaseException:
        job.cancel()
        raise
    info = job.wait_finished(timeout=30)
    assert text.split()[:2] == ["12", "0"]  # SIGUSR2 is 12 on Linux
    assert info["JobState"] == "COMPLETED", job.output()


def test_requeued_job_runs_again_with_restart_count(slurm_cluster, slurm_tmp_path):
    runs = slurm_tmp_path / "runs.txt"
    script = f"""#!/bin/bash
echo "restart=${{SLURM_RESTART_COUNT:-0}} node=$SLURMD_NODENAME" >> {runs}
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
    echo ready > {slurm_tmp_path}/ready.tmp && mv {slurm_tmp_path}/ready.tmp {slurm_tmp_path}/ready  # atomic
    sleep 60
    exit 1  # not requeued in time
fi
"""
    job = sbatch(script, slurm_tmp_path, "--nodes=1", "--time=3", name="requeue")
    try:
        wait_for_file(slurm_tmp_path / "ready", timeout=60, job=job)
        run(["scontrol", "requeue", job.job_id])
        # A requeued job waits for AuthInfo cred_expire (10 s on the test cluster) before it may start again.
        info = job.wait_state("COMPLETED", timeout=60)
    except BaseException:
        job.cancel()
        raise
    assert info["Restarts"] == "1"
    assert [line.split()[0] for line in runs.read_text().splitlines()] == ["restart=0", "restart=1"]
