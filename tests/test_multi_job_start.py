"""Jobs whose data loaders start at the same instant on one host each get a shared-memory group of their own.

Streaming picks the lowest free group number in /dev/shm; two jobs racing used to pick the same one
and the second died with `FileExistsError: .../0000xx_locals` (`trainer.data.shm_prefix`). Each job
here is a set of fresh processes (forks of a forkserver) with a job identity of its own (SLURM_JOB_ID, master port), all
released by one barrier, ten times over, on the same dataset (the same local folders: the case where
streaming's own check cannot tell two jobs' groups apart).
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from mds_fixtures import sample_ids, write_dataset
from streaming.base.constant import LOCALS
from streaming.base.shared import SharedMemory
from streaming.base.world import World
from trainer_runs import fresh_processes, run_to_completion

from trainer.config import DataConfig
from trainer.data import shm_prefix
from trainer.data.loader import build_loader
from trainer.data.mapped_dataset import MappedDataset
from trainer.errors import UserError

ROUNDS = 10
MICRO_BATCH = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job_rank(job: int, rank: int, ranks: int, port: int, dataset: str, barrier: Any, out: str) -> None:
    """One rank of job `job`: build a loader at the barrier's release, read one batch, ROUNDS times.

    Each round ends at a second barrier while every job still holds its loader: the groups compared
    are those alive at one instant (a job that exits frees its number, and a later start may rightly take it).
    """
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SLURM_JOB_ID=str(7000 + job),
    )  # fmt: skip
    result: dict[str, Any] = {"prefixes": [], "ids": []}
    try:
        if ranks > 1:
            dist.init_process_group("gloo", rank=rank, world_size=ranks)
        for _ in range(ROUNDS):
            barrier.wait(timeout=120)
            loader = build_loader(DataConfig(path=dataset, shuffle=False), "train", MICRO_BATCH, seed=0)
            result["prefixes"].append(int(loader._dataset._shm_prefix_int))
            batches = iter(loader)
            result["ids"].append(sample_ids(next(batches)["input_ids"]))
            barrier.wait(timeout=120)  # every job's group is alive here: a number freed earlier may be reused
            batches.close()
    except BaseException:
        result["error"] = traceback.format_exc()
        barrier.abort()  # the other jobs stop waiting for this one
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out, f"job{job}-rank{rank}.json").write_text(json.dumps(result))


def run_jobs(ranks_per_job: list[int], tmp_path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """Start every rank of every job as a process of its own, all released together each round."""
    dataset = write_dataset(tmp_path / "data", train_samples=32, val_samples=0)
    context = fresh_processes()
    barrier = context.Barrier(sum(ranks_per_job))
    ports = [_free_port() for _ in ranks_per_job]  # one rendezvous per job
    processes = [
        context.Process(
            target=_job_rank, args=(job, rank, ranks, ports[job], str(dataset), barrier, str(tmp_path))
        )
        for job, ranks in enumerate(ranks_per_job)
        for rank in range(ranks)
    ]
    assert run_to_completion(processes, timeout=240) == [0] * len(processes)
    results = {
        (job, rank): json.loads((tmp_path / f"job{job}-rank{rank}.json").read_text())
        for job, ranks in enumerate(ranks_per_job)
        for rank in range(ranks)
    }
    errors = [f"job {key[0]} rank {key[1]}:\n{r['error']}" for key, r in results.items() if "error" in r]
    assert not errors, "\n".join(errors)
    return results


def _groups_per_round(results: dict[tuple[int, int], dict[str, Any]], jobs: int) -> list[list[set[int]]]:
    """Per round, per job: the set of group numbers its ranks used."""
    return [
        [{r["prefixes"][round_] for (job, _), r in results.items() if job == j} for j in range(jobs)]
        for round_ in range(ROUNDS)
    ]


def _assert_each_job_has_a_group_of_its_own(
    results: dict[tuple[int, int], dict[str, Any]], jobs: int
) -> None:
    for round_, groups in enumerate(_groups_per_round(results, jobs)):
        assert all(len(group) == 1 for group in groups), f"round {round_}: a job's ranks disagree: {groups}"
        numbers = [next(iter(group)) for group in groups]
        assert len(set(numbers)) == jobs, f"round {round_}: jobs share a group: {numbers}"


def test_jobs_starting_at_one_instant_never_collide_and_their_ranks_share_their_own_leaders_group(
    tmp_path: Path,
) -> None:
    """Four jobs released together, ten times: two of one rank, two of two ranks. Every job gets a group of its
    own, and each rank learns it from its local leader, never from a scan that another job's start can change."""
    ranks_per_job = [1, 1, 2, 2]
    results = run_jobs(ranks_per_job, tmp_path)
    _assert_each_job_has_a_group_of_its_own(results, jobs=len(ranks_per_job))
    for job, ranks in enumerate(
        ranks_per_job
    ):  # unshuffled: together, a job's ranks read its first global batch
        for round_ in range(ROUNDS):
            ids = sorted(sum((results[(job, rank)]["ids"][round_] for rank in range(ranks)), []))
            assert ids == list(range(MICRO_BATCH * ranks)), (job, round_, ids)


# --- the lost race, in one process --------------------------------------------------------------


@pytest.fixture
def taken_group(monkeypatch: pytest.MonkeyPatch):
    """A real `locals` segment under a number that the next scans report as free, as after a lost race.

    The scan is the real one; only its answer is held back for `calls["left"]` scans, the way it goes stale
    when another job registers between our scan and our create.
    """
    number = 900000 + os.getpid() % 100000  # far above the numbers of live loaders
    taken = SharedMemory(f"{number:06d}_{LOCALS}", True, 64)
    calls = {"stale": 0, "left": 0}
    real_scan = shm_prefix._scan

    def scan(*args: Any, **kwargs: Any) -> int:
        if calls["left"] > 0:
            calls["left"] -= 1
            calls["stale"] += 1
            return number
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(shm_prefix, "_scan", scan)
    monkeypatch.setattr(shm_prefix, "_MAX_WAIT_S", 0.0)
    yield number, calls
    taken.cleanup()


def test_a_lost_race_is_scanned_again_and_wins_a_free_number(taken_group, tmp_path: Path) -> None:
    number, calls = taken_group
    calls["left"] = 3  # three attempts in a row see the taken number as free
    prefix_int, shm = shm_prefix.claim_shm_prefix([str(tmp_path)], [None], World.detect())
    try:
        assert prefix_int != number and calls["stale"] == 3
        assert shm.shm.name.lstrip("/") == f"{prefix_int:06d}_{LOCALS}"
    finally:
        shm.cleanup()


def test_losing_every_race_is_a_clear_error_after_bounded_attempts(taken_group, tmp_path: Path) -> None:
    number, calls = taken_group
    calls["left"] = 10**6
    with pytest.raises(
        shm_prefix.PrefixClaimError, match=rf"{shm_prefix.CLAIM_ATTEMPTS} attempts .* lost the race"
    ):
        shm_prefix.claim_shm_prefix([str(tmp_path)], [None], World.detect())
    assert calls["stale"] == shm_prefix.CLAIM_ATTEMPTS


def test_a_live_loader_caching_a_remote_in_the_same_folder_is_a_user_error(tmp_path: Path) -> None:
    """Two jobs streaming into one cache folder would overwrite each other's shards: refused, with the fix."""
    dataset = write_dataset(tmp_path / "data", train_samples=16, val_samples=0)
    cache = tmp_path / "cache"
    first = MappedDataset(remote=str(dataset), local=str(cache), split="train", batch_size=2)
    with pytest.raises(
        UserError, match=r"caches a remote dataset in .*cache/train; give this job a data\.path of its own"
    ):
        MappedDataset(remote=str(dataset), local=str(cache), split="train", batch_size=2)
    assert first.num_samples == 16
