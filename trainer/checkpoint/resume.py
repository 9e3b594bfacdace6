"""Which checkpoint a run starts from, and which steps are this run's: the run id, `checkpoint.resume`.

Decided by rank 0 and shared with every rank. Each run has an id (checkpoints/run_id, and in each manifest),
so that a step folder of another run in the same folder is never resumed, counted or deleted as this run's.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainer.atomic import atomic_write_text
from trainer.checkpoint.manifest import check_files, read_manifest
from trainer.checkpoint.steps import (
    RUN_ID,
    ResumePoint,
    belongs_to_run,
    newest_valid_step,
    read_run_id,
    step_folders,
    verify_step,
)
from trainer.config import Config, config_hash
from trainer.distributed import DistEnv
from trainer.errors import UserError

log = logging.getLogger(__name__)


class RunCheckpoints:
    """This run's identity among the step folders of `root`, and its choice of where to resume."""

    def __init__(self, config: Config, env: DistEnv, root: Path) -> None:
        self.config, self.env, self.root = config, env, root
        self._run_id: str | None = None

    @property
    def run_id(self) -> str:
        """This run's id (rank 0: read from checkpoints/run_id, created on first use; others: as broadcast
        by find_resume)."""
        if self._run_id is None:
            self._run_id = read_run_id(self.root) or self._new_run_id()
        return self._run_id

    def _new_run_id(self) -> str:
        run_id = uuid.uuid4().hex[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / RUN_ID, run_id + "\n")
        return run_id

    def find_resume(self) -> ResumePoint | None:
        """The checkpoint to resume from, the same on every rank (with the run id).

        Rank 0 picks the newest candidate from manifests and file sizes; then every rank checksums a share
        of its files (each file once in all), and all agree: a file that does not match sends rank 0 on to
        the next older candidate, with a warning. So a resume reads the checkpoint once, spread over the
        ranks, instead of rank 0 reading all of it while the others wait.
        """
        setting = self.config.checkpoint.resume
        return self._agreed(lambda failed: self._choose(setting, failed))

    def _agreed(self, pick: Callable[[dict[Path, str]], ResumePoint | str | None]) -> ResumePoint | None:
        """`agreed_point` of rank 0's `pick`, and rank 0's run id on every rank."""
        point = agreed_point(self.env, pick)
        shared = [self.run_id if self.env.is_main else None]
        if dist.is_initialized():
            dist.broadcast_object_list(shared, src=0)
        self._run_id = shared[0]
        return point

    def newest_complete(self) -> ResumePoint | None:
        """The newest verified checkpoint of this run (a rollback's target), the same on every rank: rank 0
        picks it by manifest and sizes, and every rank checksums a share of its files, as for a resume (rank 0
        alone reading a whole checkpoint while the others wait in a collective timed out at scale)."""
        return self._agreed(
            lambda failed: newest_valid_step(self.root, self.run_id, config_hash(self.config), False, failed)
        )

    def _choose(self, setting: str, failed: dict[Path, str]) -> ResumePoint | str | None:
        """auto: this run's newest; a folder of another run: that, until this run has checkpoints of its own
        (a requeued job must go on from its own progress, not start over from the folder). Candidates are
        judged by manifest and sizes here; `failed` holds those whose checksums the ranks found wrong.

        none: a new run, in the job's first attempt only. The setting is saved in RUN_DIR/config.yaml, so
        a requeued attempt (SLURM_RESTART_COUNT >= 1) reads it again; it then resumes the run's own newest
        checkpoint, as auto does, instead of throwing away the progress of the attempts before it.
        """
        if setting == "none":
            attempt = requeue_attempt()
            if attempt == 0 and not failed:
                earlier = read_run_id(self.root)
                self._run_id = self._new_run_id()
                if earlier and any(step_folders(self.root)):
                    log.info(
                        "checkpoint.resume=none: a new run starts in %s; the earlier run's step folders stay "
                        "(never this run's to resume, count or delete); remove them by hand if unneeded",
                        self.root,
                    )
                return None
            log.info(
                "checkpoint.resume=none applies to a job's first attempt only; this is requeued attempt %d "
                "(SLURM_RESTART_COUNT), so it resumes this run's own newest checkpoint (as auto)",
                attempt,
            )
            setting = "auto"
        folder = Path(setting).absolute()
        inside = setting != "auto" and folder.is_relative_to(self.root.absolute())
        own = None
        if not inside:
            own = newest_valid_step(self.root, self.run_id, config_hash(self.config), False, failed)
        if setting == "auto" and own is None:
            self._warn_about_other_runs()
        if setting == "auto" or own is not None:
            return own
        if (folder / "checkpoints").is_dir():  # a run folder: its newest complete step
            point = newest_valid_step(folder / "checkpoints", checksums=False, skip=failed)
            return point or f"checkpoint.resume='{setting}' is a run folder without a complete checkpoint"
        manifest, problem = verify_step(folder, checksums=False)
        problem = failed.get(folder, problem)
        if manifest is None or problem is not None:
            return f"checkpoint.resume='{setting}' is not a complete checkpoint: {problem}"
        return ResumePoint(folder, manifest)

    def newest_own(self, checksums: bool = True) -> ResumePoint | None:
        return newest_valid_step(self.root, self.run_id, config_hash(self.config), checksums)

    def belongs(self, manifest: dict[str, Any]) -> bool:
        return belongs_to_run(manifest, self.run_id, config_hash(self.config))

    def _warn_about_other_runs(self) -> None:
        others = []
        for folder in step_folders(self.root):
            try:
                if not self.belongs(read_manifest(folder)):
                    others.append(folder.name)
            except ValueError:
                continue
        if others:
            log.warning(
                "%s holds checkpoints of another run (%s; or written before run ids, with another config): "
                "not resumed; to go on from one, set checkpoint.resume to its path",
                self.root,
                ", ".join(others),
            )

    def is_own(self, point: ResumePoint) -> bool:
        """Whether `point` is one of this run's checkpoints (rather than another run's)."""
        inside = point.step_dir.absolute().is_relative_to(self.root.absolute())
        return inside and belongs_to_run(point.manifest, self._run_id, config_hash(self.config))


def agreed_point(
    env: DistEnv, pick: Callable[[dict[Path, str]], ResumePoint | str | None]
) -> ResumePoint | None:
    """Rank 0's `pick(failed)` (a step, None, or a problem to raise as a UserError), the same on every rank,
    checksummed by every rank a share each (each file once in all); a file that does not match sends rank 0
    on to its next pick, with a warning. So a checkpoint is read once, spread over the ranks, instead of by
    rank 0 alone while the others wait in a collective that times out at scale."""
    failed: dict[Path, str] = {}
    while True:
        choice: list[Any] = [pick(failed) if env.is_main else None]
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        point = choice[0]
        if isinstance(point, str):
            raise UserError(point)
        if point is None:
            return None
        problem = _checksum_share(env, point)
        if problem is None:
            return point
        log.warning("skipping checkpoint %s: %s", point.step_dir, problem)
        failed[point.step_dir] = problem


def _checksum_share(env: DistEnv, point: ResumePoint) -> str | None:
    """Checksum this rank's share of the step's files; the first problem any rank found, or None."""
    files = point.manifest["files"]
    share = sorted(files)[env.rank :: env.world_size]
    problems = [check_files(point.step_dir, {name: files[name] for name in share})]
    if dist.is_initialized() and env.world_size > 1:
        found, problems = problems[0], [None] * env.world_size
        dist.all_gather_object(problems, found)
    return next((problem for problem in problems if problem is not None), None)


def requeue_attempt() -> int:
    """0 for a job's first attempt, N for its N-th requeue (SLURM_RESTART_COUNT; 0 outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0
