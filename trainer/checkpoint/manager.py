"""One checkpoint manager for both backends: step folders, manifest last, `latest`, retention, resume.

    RUN_DIR/checkpoints/step_00000100/
        model/ or deepspeed/     backend shards (DCP, or the DeepSpeed engine's own format)
        rng/rank00000.pt         per-rank RNG states
        train_state.json         step, tokens, data-loader position, world size
        config.yaml              the resolved config
        manifest.json            written last, by rank 0, once every rank's files are durable
    RUN_DIR/checkpoints/latest   the newest complete step, replaced atomically

A step counts only once its manifest exists and verifies (torchtitan's rule). Saving is a
collective: every rank calls `save` at the same step.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from trainer.atomic import atomic_write_bytes, atomic_write_text
from trainer.checkpoint.manifest import MANIFEST, describe_files, list_files
from trainer.checkpoint.rng import rng_state, set_rng_state
from trainer.checkpoint.steps import (
    LATEST,
    ResumePoint,
    newest_valid_step,
    step_dir_name,
    step_folders,
    step_number,
    verify_step,
)
from trainer.config import Config, config_hash, to_yaml
from trainer.distributed import DistEnv
from trainer.errors import UserError
from trainer.fault_injection import sleep_in_save

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    names = ("llm-training", "torch", "transformers", "deepspeed", "mosaicml-streaming")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class CheckpointManager:
    def __init__(self, config: Config, env: DistEnv) -> None:
        self.config = config
        self.env = env
        self.root = Path(config.run.dir) / "checkpoints"
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._async_group = None
        self.last_saved_step: int | None = None

    # ---- resume -------------------------------------------------------------------------

    def find_resume(self) -> ResumePoint | None:
        """The checkpoint to resume from, decided by rank 0 and shared with every rank."""
        setting = self.config.checkpoint.resume
        choice: list[Any] = [None]
        if self.env.is_main:
            choice[0] = self._choose(setting)
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str):
            raise UserError(choice[0])
        return choice[0]

    def newest_complete(self) -> ResumePoint | None:
        """The newest verified checkpoint of this run (a rollback's target), the same on every rank."""
        choice: list[Any] = [newest_valid_step(self.root) if self.env.is_main else None]
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _choose(self, setting: str) -> ResumePoint | str | None:
        """auto: this run's newest; a folder of another run: that, until this run has checkpoints of its own
        (a requeued job must go on from its own progress, not start over from the folder)."""
        if setting == "none":
            return None
        folder = Path(setting).absolute()
        inside = setting != "auto" and folder.is_relative_to(self.root.absolute())
        own = None if inside else newest_valid_step(self.root)
        if setting == "auto" or own is not None:
            return own
        if (folder / "checkpoints").is_dir():  # a run folder: its newest complete step
            point = newest_valid_step(folder / "checkpoints")
            return point or f"checkpoint.resume='{setting}' is a run folder without a complete checkpoint"
        manifest, problem = verify_step(folder)
        if manifest is None:
            return f"checkpoint.resume='{setting}' is not a complete checkpoint: {problem}"
        return ResumePoint(folder, manifest)

    def is_own(self, point: ResumePoint) -> bool:
        """Whether `point` is one of this run's checkpoints (rather than another run's)."""
        return point.step_dir.absolute().is_relative_to(self.root.absolute())

    def load(self, point: ResumePoint, backend: Any, loader: Any) -> dict[str, Any]:
        """Restore backend shards, RNG streams and the data position; returns the train state dict."""
        manifest = point.manifest
        if manifest["backend"] != backend.name:
            raise UserError(
                f"checkpoint {point.step_dir} was written by parallel.backend={manifest['backend']}, this run uses "
                f"{backend.name}; resume with the same backend, or `llm-train export` it and start with model.init_from"
            )
        if manifest.get("config_hash") != config_hash(self.config):
            log.warning("the config differs from the one checkpoint %s was written with", point.step_dir)
        backend.load(point.step_dir, point.world_size)
        rng_file = point.step_dir / "rng" / f"rank{self.env.rank:05d}.pt"
        if point.world_size == self.env.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning(
                "world size changed (%d -> %d): RNG streams start fresh",
                point.world_size,
                self.env.world_size,
            )
        state = point.train_state()
        loader.load_state_dict(state["data"])
        log.info(
            "resumed from %s (step %d, saved with world size %d)",
            point.step_dir,
            point.step,
            point.world_size,
        )
        return state

    # ---- save ---------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return step % self.config.checkpoint.every_steps == 0 or step == self.config.train.max_steps

    def save(
        self, step: int, train_state: dict[str, Any], backend: Any, loader: Any, blocking: bool = False
    ) -> None:
        """Save step `step` on every rank; with checkpoint.async (FSDP) the shards are written in the background.

        A write that fails on any rank (disk full, quota, permissions) fails the save on every rank:
        the step folder is removed, `latest` still names the previous step, and CheckpointWriteError
        says where and how much space is left.
        """
        self.wait()
        started = time.perf_counter()
        step_dir = self.root / step_dir_name(step)
        failure = None
        if self.env.is_main:
            try:
                if step_dir.exists():
                    shutil.rmtree(step_dir)  # an unfinished attempt at this step, or a resume=none rerun
                (step_dir / "rng").mkdir(parents=True)
            except OSError as error:
                failure = error
        self._agree(step, step_dir, failure)
        use_async = self.config.checkpoint.async_save and not blocking and backend.supports_async
        future = None
        try:
            future = backend.save(step_dir, self._checkpoint_group() if use_async else None)
            torch.save(rng_state(), step_dir / "rng" / f"rank{self.env.rank:05d}.pt")
            if self.env.is_main:
                state = {**train_state, "world_size": self.env.world_size, "data": loader.state_dict()}
                atomic_write_text(step_dir / "train_state.json", json.dumps(state, indent=1))
                atomic_write_text(step_dir / "config.yaml", to_yaml(self.config))
        except (Exception, CheckpointException) as error:  # torch.save reports a full disk as RuntimeError
            failure = error
        self._agree(step, step_dir, failure)
        if future is None:
            self._finalize(step, step_dir, None, group=None)
            log.info("checkpoint step %d saved in %.2f s", step, time.perf_counter() - started)
        else:
            self._pending = threading.Thread(
                target=self._finalize_in_background,
                args=(step, step_dir, future),
                name=f"ckpt-{step}",
                daemon=True,
            )
            self._pending.start()
            log.info("checkpoint step %d: training resumes after %.2f s, shards written in the background",
                     step, time.perf_counter() - started)  # fmt: skip

    def wait(self) -> None:
        """Block until a background save has finished (its manifest written or its failure raised)."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            if isinstance(error, CheckpointWriteError):
                raise error
            raise RuntimeError(f"background checkpoint save failed: {error}") from error

    def _finalize_in_background(self, step: int, step_dir: Path, future: Future) -> None:
        try:
            self._finalize(step, step_dir, future, group=self._async_group)
        except BaseException as error:  # re-raised in the training thread by wait()
            self._pending_error = error

    def _agree(self, step: int, step_dir: Path, failure: BaseException | None, group: Any = None) -> None:
        """Every rank learns whether any rank failed to write; if one did, all raise the same error."""
        if dist.is_initialized() and self.env.world_size > 1:
            mine = None if failure is None else f"rank {self.env.rank}: {_first_line(failure, self.env.rank)}"
            reports: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(reports, mine, group=group)
            problems = [report for report in reports if report]
        else:
            problems = [] if failure is None else [_first_line(failure)]
        if not problems:
            return
        free = _free_space(self.root)
        if self.env.is_main:
            shutil.rmtree(step_dir, ignore_errors=True)
        previous = newest_valid_step(self.root) if self.env.is_main else None
        raise CheckpointWriteError(
            f"checkpoint step {step} could not be written to {step_dir} ({'; '.join(problems)}); "
            f"{free} free there; "
            + (f"{previous.step_dir.name} stays the newest complete checkpoint; " if previous else "")
            + "free space (or lower checkpoint.keep_last, or point run.dir elsewhere) and run again to resume"
        ) from failure

    def _finalize(self, step: int, step_dir: Path, future: Future | None, group: Any) -> None:
        """Once every rank's files are durable: checksum them (shared out), rank 0 writes the manifest."""
        failure = None
        if future is not None:
            try:
                future.result()
            except (Exception, CheckpointException) as error:
                failure = error
        self._agree(step, step_dir, failure, group)
        sleep_in_save(step)
        names = list_files(step_dir)
        mine = describe_files(step_dir, names[self.env.rank :: self.env.world_size])
        gathered: list[Any] = [None] * self.env.world_size
        if dist.is_initialized() and self.env.world_size > 1:
            dist.all_gather_object(gathered, mine, group=group)
        else:
            gathered = [mine]
        if self.env.is_main:
            files = {name: entry for part in gathered for name, entry in part.items()}
            manifest = {
                "step": step,
                "world_size": self.env.world_size,
                "backend": self.config.parallel.backend,
                "config_hash": config_hash(self.config),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(),
                "files": files,
            }
            try:
                atomic_write_bytes(step_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
                atomic_write_text(self.root / LATEST, step_dir.name + "\n")
            except OSError as error:
                failure = error
                (step_dir / MANIFEST).unlink(missing_ok=True)
        self._agree(step, step_dir, failure, group)
        if self.env.is_main:
            self._retain()
        self.last_saved_step = step

    def _retain(self) -> None:
        """Keep the newest `keep_last` complete steps; incomplete folders older than the newest complete go too."""
        complete = [folder for folder in step_folders(self.root) if (folder / MANIFEST).is_file()]
        keep = {folder.name for folder in complete[: self.config.checkpoint.keep_last]}
        newest_step = step_number(complete[0]) if complete else None
        for folder in step_folders(self.root):
            step = step_number(folder)
            if folder.name in keep or newest_step is None or step > newest_step:
                continue
            log.info("retention: removing %s", folder)
            shutil.rmtree(folder, ignore_errors=True)

    def _checkpoint_group(self) -> Any:
        """A separate gloo group, so background-save collectives never interleave with training's."""
        if self._async_group is None and dist.is_initialized():
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, quota, permissions): the run stops, nothing is lost."""


def _first_line(error: BaseException, rank: int = 0) -> str:
    """The gist of an error; for DCP's CheckpointException (every rank's failures), this rank's or the first."""
    if isinstance(error, CheckpointException) and error.failures:
        error = (error.failures.get(rank) or next(iter(error.failures.values())))[0]
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            return f"{free / 2**20:.1f} MiB" if free < 2**30 else f"{free / 2**30:.1f} GiB"
    return "unknown space"
