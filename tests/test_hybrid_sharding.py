"""Hybrid sharding (`parallel.shard=node`): 4 processes as 2 simulated nodes of 2, against full sharding, and
checkpoints that reshard between the two and onto another world size."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from trainer_runs import by_step, read_metrics, train

from trainer.parallel.node_layout import consecutive_layout_problem, shard_groups

STEPS = [
    "train.max_steps=6",
    "checkpoint.every_steps=3",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
]
FP32_REL = 1e-5


def _close(got: dict[int, float], expected: dict[int, float], steps: range) -> None:
    for step in steps:
        assert math.isclose(got[step], expected[step], rel_tol=FP32_REL), (step, got[step], expected[step])


def _resume_from_step_3(straight: Path, run_dir: Path) -> Path:
    """A copy of a finished 6-step run whose newest checkpoint is step 3, as if it had stopped there."""
    shutil.copytree(straight, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    (run_dir / "checkpoints" / "latest").write_text("step_00000003")
    return run_dir


@pytest.fixture(scope="module")
def sharded_runs(demo_dataset, tmp_path_factory) -> dict[str, Path]:
    """full and node on 4 processes as 2 x 2 (node with its ranks numbered round robin, as srun
    --distribution=cyclic does: 0 2 | 1 3); then from their step-3 checkpoints: node -> full on 2 processes,
    full -> node (numbered node by node), node -> node (unchanged, bitwise)."""
    root = tmp_path_factory.mktemp("hybrid")
    data = demo_dataset.path
    train(root / "full", data, nproc=4, nodes=2, overrides=[*STEPS, "parallel.shard=full"])
    train(
        root / "node",
        data,
        nproc=4,
        nodes=2,
        overrides=[*STEPS, "parallel.shard=node"],
        distribution="cyclic",
    )
    deepspeed = [*STEPS, "parallel.shard=node", "parallel.backend=deepspeed"]
    train(root / "deepspeed-node", data, nproc=4, nodes=2, overrides=deepspeed)
    resumes = {"node-to-full": ("node", "full", 2, 1, "block"), "full-to-node": ("full", "node", 4, 2, "block"),
               "node-to-node": ("node", "node", 4, 2, "cyclic")}  # fmt: skip
    for name, (source, shard, nproc, nodes, numbering) in resumes.items():
        run_dir = _resume_from_step_3(root / source, root / name)
        overrides = [*STEPS, f"parallel.shard={shard}"]
        train(run_dir, data, nproc=nproc, nodes=nodes, overrides=overrides, distribution=numbering)
    return {path.name: path for path in root.iterdir()}


def _start(run_dir: Path) -> dict:
    return next(r for r in read_metrics(run_dir) if r.get("event") == "start")


def test_node_sharding_trains_like_full_sharding(sharded_runs):
    assert (
        _start(sharded_runs["node"])["shard_group"] == 2 and _start(sharded_runs["full"])["shard_group"] == 4
    )
    _close(
        by_step(read_metrics(sharded_runs["node"])), by_step(read_metrics(sharded_runs["full"])), range(1, 7)
    )


def test_shard_groups_follow_the_nodes_when_ranks_are_numbered_round_robin(sharded_runs):
    """With ranks 0 and 2 on one node and 1 and 3 on the other, groups of consecutive ranks would span both
    nodes: the groups come from each rank's node, and training is that of the node-by-node layout (the
    full-to-node resume numbers them node by node and matches it)."""
    run = sharded_runs["node"]
    assert (
        "ranks are not numbered node by node: shard groups [[0, 2], [1, 3]]"
        in (run / "logs" / "rank0.log").read_text()
    )
    _close(by_step(read_metrics(run)), by_step(read_metrics(sharded_runs["full-to-node"])), range(4, 7))
    # Each rank's heartbeat lives in its node's folder: no folder takes every rank's renames.
    beats = sorted(
        str(path.relative_to(run / "heartbeats")) for path in run.glob("heartbeats/node-*/rank*.json")
    )
    assert [name for name in beats if "exit" not in name] == [
        "node-00000/rank00000.json", "node-00000/rank00002.json", "node-00001/rank00001.json",
        "node-00001/rank00003.json",
    ]  # fmt: skip


def test_deepspeed_refuses_groups_that_would_span_nodes():
    """DeepSpeed's hierarchical partitioning groups consecutive ranks: with another numbering it is refused."""
    assert consecutive_layout_problem([0, 1, 2, 3], "node") is None
    problem = consecutive_layout_problem([0, 2, 1, 3], "node")
    assert problem is not None and "--distribution=block" in problem and "parallel.shard=full" in problem
    assert shard_groups([0, 2, 1, 3], 2) == [[0, 2], [1, 3]]


def test_deepspeed_hierarchical_partitioning_trains_like_full_sharding(sharded_runs):
    """ZeRO++ hpZ (zero_hpz_partition_size = ranks per node); its checkpoints are ZeRO-3's, over all ranks."""
    assert _start(sharded_runs["deepspeed-node"])["shard_group"] == 2
    got, expected = (
        by_step(read_metrics(sharded_runs["deepspeed-node"])),
        by_step(read_metrics(sharded_runs["full"])),
    )
    for step in range(1, 7):
        assert math.isclose(got[step], expected[step], rel_tol=1e-4), (step, got[step], expected[step])


@pytest.mark.parametrize("run", ["node-to-full", "full-to-node"])
def test_a_checkpoint_reshards_between_node_and_full(run, sharded_runs):
    records = read_metrics(sharded_runs[run])
    assert any(r.get("event") == "resume" and r["step"] == 3 for r in records)
    _close(by_step(records), by_step(read_metrics(sharded_runs["full"])), range(1, 7))


def test_unchanged_sharding_resumes_bitwise(sharded_runs):
    assert by_step(read_metrics(sharded_runs["node-to-node"])) == by_step(read_metrics(sharded_runs["node"]))


def test_shard_groups_follow_the_setting_and_must_divide_the_world_size():
    from trainer.distributed import DistEnv
    from trainer.errors import UserError
    from trainer.parallel.sharding import shard_group_size

    env = DistEnv(
        rank=0, world_size=4, local_rank=0, local_world_size=2, master_addr="127.0.0.1", master_port=1
    )
    assert [shard_group_size(s, env, 10**6) for s in ("full", "node", "2", "auto")] == [
        4,
        2,
        2,
        4,
    ]  # no GPU: auto is full
    with pytest.raises(
        UserError, match=r"parallel.shard=3 makes groups of 3 ranks, which do not divide the job's 4"
    ):
        shard_group_size("3", env, 10**6)


def test_deepspeed_partitions_hierarchically_only_when_hybrid():
    from trainer.config import batch_plan, load_config
    from trainer.parallel.deepspeed import deepspeed_config

    config = load_config("tiny", ["run.dir=x", "data.path=x", "train.micro_batch_size=2"])
    plan = batch_plan(config.train, 4)
    assert deepspeed_config(config, plan, 2)["zero_optimization"]["zero_hpz_partition_size"] == 2
    assert "zero_hpz_partition_size" not in deepspeed_config(config, plan, 4)["zero_optimization"]
