"""One checkpoint manager for both backends: step folders, manifest last, `latest`, retention, resume.

    RUN_DIR/checkpoints/step_00000100/
        model/ or deepspeed/     backend shards (DCP, or the DeepSpeed engine's own format)
        rng/rank00000.pt         per-rank RNG states
        train_state.json         step, tokens, data-loader position, world size
        config.yaml              the resolved config
        model_config.json        the model's architecture (its transformers config), read by export and init_from
        model_code/*.py          the model's own code, when it has some (an auto_map)
        manifest.json            written last, by rank 0, once every rank's files are durable
    RUN_DIR/checkpoints/latest   the newest complete step, replaced atomically
    RUN_DIR/checkpoints/run_id   which run writes here (each manifest names its run too)
    RUN_DIR/checkpoints/.removing-*  old steps that retention is deleting in the background

A step counts only once its manifest exists and verifies (torchtitan's rule). Saving is a
collective: every rank calls `save` at the same step.

Shared filesystems (Lustre, GPFS, NFS) are the normal case: each rank checksums and fsyncs the files it
wrote itself (in parallel across ranks, so a preemption save fits in SLURM's grace time) and reports them;
rank 0 writes the manifest from the reports, never from a directory listing, which on NFS can lag
behind what other nodes wrote (attribute and directory caches differ between nodes).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from trainer.atomic import atomic_write_bytes, atomic_write_text, fsync_path
from trainer.checkpoint.dcp_read import check_plain_data
from trainer.checkpoint.manifest import MANIFEST, describe_files, read_manifest
from trainer.checkpoint.resume import RunCheckpoints
from trainer.checkpoint.retention import retain
from trainer.checkpoint.rng import load_rng_file, rng_state, set_rng_state
from trainer.checkpoint.step_contents import (
    MODEL_CODE,
    MODEL_CONFIG,
    IncompleteReportError,
    backend_files,
    check_complete,
    package_versions,
)
from trainer.checkpoint.steps import LATEST, ResumePoint, step_dir_name
from trainer.checkpoint.write_agreement import (
    CheckpointDiskFullError,
    CheckpointWriteError,
    exchange,
    write_error,
)
from trainer.config import Config, config_hash, to_yaml
from trainer.distributed import DistEnv
from trainer.errors import UserError
from trainer.resilience.fault_injection import save_faults

log = logging.getLogger(__name__)


class CheckpointManager:
    def __init__(self, config: Config, env: DistEnv) -> None:
        self.config = config
        self.model_config: str | None = None
        self.model_code: dict[str, str] = {}
        """The model's own Python files (step_contents.model_code_files), saved with every step."""
        """The model's `transformers` config as JSON (set once the model is known), saved in every step."""
        self.env = env
        self.root = Path(config.run.dir) / "checkpoints"
        self._pending: threading.Thread | None = None
        self._staging: Future | None = None
        """A background save's copy of the live state into host buffers; the weights must not change before it is done."""
        self._pending_error: BaseException | None = None
        self._async_group = None
        self.run = RunCheckpoints(config, env, self.root)
        self.last_saved_step: int | None = None

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def find_resume(self) -> ResumePoint | None:
        """The checkpoint to resume from, the same on every rank (see trainer/checkpoint/resume.py)."""
        return self.run.find_resume()

    def newest_complete(self) -> ResumePoint | None:
        """The newest verified checkpoint of this run (a rollback's target), the same on every rank."""
        return self.run.newest_complete()

    def is_own(self, point: ResumePoint) -> bool:
        return self.run.is_own(point)

    def _belongs(self, manifest: dict[str, Any]) -> bool:
        return self.run.belongs(manifest)

    # ---- resume -------------------------------------------------------------------------

    def load(self, point: ResumePoint, backend: Any, loader: Any) -> dict[str, Any]:
        """Restore backend shards, RNG streams and the data position; returns the train state dict."""
        self.wait()  # a background save still reading the weights must finish before they are replaced
        manifest = point.manifest
        if manifest["backend"] != backend.name:
            raise UserError(
                f"checkpoint {point.step_dir} was written by parallel.backend={manifest['backend']}, this run uses "
                f"{backend.name}; resume with the same backend, or `llm-train export` it and start with model.init_from"
            )
        if manifest.get("config_hash") != config_hash(self.config):
            log.warning("the config differs from the one checkpoint %s was written with", point.step_dir)
        rng = self._read_untrusted(point, backend)
        backend.load(point.step_dir, point.world_size)
        if rng is not None:
            set_rng_state(rng)
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

    def _read_untrusted(self, point: ResumePoint, backend: Any) -> dict[str, Any] | None:
        """This rank's RNG state, and the check that nothing the backend will unpickle can run code.

        Every rank learns whether any rank found a problem before any of them starts the backend's
        collective load: all stop with the same UserError instead of waiting on the one that stopped.
        DeepSpeed's own files are the exception: its engine unpickles them (docs/checkpoints.md, "What
        loading trusts").
        """
        rng, problem = None, None
        rng_file = point.step_dir / "rng" / f"rank{self.env.rank:05d}.pt"
        try:
            if self.env.is_main and backend.name == "fsdp":
                check_plain_data(point.step_dir / "model")
            if point.world_size == self.env.world_size and rng_file.is_file():
                rng = load_rng_file(rng_file, point.step_dir)
        except UserError as error:
            problem = str(error)
        problems, _ = self._exchange(problem, None, None)
        if any(problems):
            raise UserError(next(p for p in problems if p))
        return rng

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
                    self._clear(step_dir)
                (step_dir / "rng").mkdir(parents=True)
            except OSError as error:
                failure = error
        self._agree(step, step_dir, failure)
        use_async = self.config.checkpoint.async_save and not blocking and backend.supports_async
        future = None
        written = [f"rng/rank{self.env.rank:05d}.pt"]  # this rank's own files, besides the backend's
        try:
            self._staging, future = _split(
                backend.save(step_dir, self._checkpoint_group() if use_async else None)
            )
            torch.save(rng_state(), step_dir / written[0])
            if self.env.is_main:
                state = {**train_state, "world_size": self.env.world_size, "data": loader.state_dict()}
                atomic_write_text(step_dir / "train_state.json", json.dumps(state, indent=1))
                atomic_write_text(step_dir / "config.yaml", to_yaml(self.config))
                written += ["train_state.json", "config.yaml"]
                if self.model_config is not None:
                    atomic_write_text(step_dir / MODEL_CONFIG, self.model_config)
                    written.append(MODEL_CONFIG)
                for name, text in self.model_code.items():
                    (step_dir / MODEL_CODE).mkdir(exist_ok=True)
                    atomic_write_text(step_dir / MODEL_CODE / name, text)
                    written.append(f"{MODEL_CODE}/{name}")
        except (Exception, CheckpointException) as error:  # torch.save reports a full disk as RuntimeError
            failure = error
        self._agree(step, step_dir, failure)
        if future is None:
            self._finalize(step, step_dir, None, backend, written, group=None)
            log.info("checkpoint step %d saved in %.2f s", step, time.perf_counter() - started)
        else:
            self._pending = threading.Thread(
                target=self._finalize_in_background,
                args=(step, step_dir, future, backend, written),
                name=f"ckpt-{step}",
                daemon=True,
            )
            self._pending.start()
            log.info("checkpoint step %d: training resumes after %.2f s, shards written in the background",
                     step, time.perf_counter() - started)  # fmt: skip

    def before_update(self) -> None:
        """Block until a background save has its copy of the state; call it before every optimizer step.

        The copy (staging) runs while the next step's forward and backward compute; only the update may
        not start before it is done. A no-op without a background save. A failed copy fails the write
        too; that failure is raised by `wait()`, never here: ranks learn it at different moments, and
        one rank raising alone would leave the others waiting in the step's collectives.
        """
        if self._staging is not None:
            concurrent.futures.wait([self._staging])
            self._staging = None

    @property
    def failed_in_background(self) -> bool:
        """This rank's background save has ended with an error (`wait()` raises it)."""
        pending = self._pending
        return pending is not None and not pending.is_alive() and self._pending_error is not None

    def wait(self) -> None:
        """Block until a background save has finished (its manifest written or its failure raised)."""
        self._staging = None  # the write needs the staged copy: once it is done, so is staging
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            if isinstance(error, (CheckpointWriteError, CheckpointDiskFullError)):
                raise error
            raise RuntimeError(f"background checkpoint save failed: {error}") from error

    def _clear(self, step_dir: Path) -> None:
        """Make room for this step: an unfinished attempt at it (or a resume=none rerun's) goes; a complete
        step of another run (copied in by hand) is moved aside, never deleted."""
        try:
            manifest = read_manifest(step_dir)
        except ValueError:
            manifest = None
        if manifest is None or self._belongs(manifest):
            shutil.rmtree(step_dir)
            return
        theirs = manifest.get("run_id") or f"config-{manifest.get('config_hash')}"
        for index in itertools.count():
            aside = step_dir.with_name(f"{step_dir.name}.run-{theirs}" + (f".{index}" if index else ""))
            if not aside.exists():
                break
        log.warning(
            "%s belongs to another run (%s): moved to %s to save this run's step", step_dir, theirs, aside
        )
        step_dir.rename(aside)

    def _finalize_in_background(
        self, step: int, step_dir: Path, future: Future, backend: Any, written: list[str]
    ) -> None:
        try:
            self._finalize(step, step_dir, future, backend, written, group=self._async_group)
        except BaseException as error:  # re-raised in the training thread by wait()
            self._pending_error = error

    def _exchange(self, value: Any, failure: BaseException | None, group: Any) -> tuple[list[Any], list[str]]:
        return exchange(value, failure, self.env.rank, self.env.world_size, group)

    def _agree(self, step: int, step_dir: Path, failure: BaseException | None, group: Any = None) -> None:
        """Every rank learns whether any rank failed to write; if one did, all raise the same error."""
        _, problems = self._exchange(None, failure, group)
        self._fail_if(step, step_dir, problems, failure)

    def _fail_if(self, step: int, step_dir: Path, problems: list[str], failure: BaseException | None) -> None:
        if not problems:
            return
        # On every rank (whichever rank's message is shown names it), by manifest and sizes: no checksums.
        previous = self.run.newest_own(checksums=False)
        error = write_error(step, step_dir, problems, previous.step_dir.name if previous else None)
        if self.env.is_main:
            shutil.rmtree(step_dir, ignore_errors=True)
        raise error from failure

    def _finalize(
        self, step: int, step_dir: Path, future: Future | None, backend: Any, written: list[str], group: Any
    ) -> None:
        """Once every rank's writes are done: each rank checksums and fsyncs the files it wrote and reports
        them; rank 0 writes the manifest from the reports."""
        failure = None
        if future is not None:
            try:
                future.result()
            except (Exception, CheckpointException) as error:
                failure = error
        failure = failure or save_faults(self.env.rank, step)
        self._agree(step, step_dir, failure, group)
        mine: dict[str, Any] = {}
        try:
            mine = describe_files(
                step_dir, written + backend_files(backend, step_dir, self.env.rank), durable=True
            )
        except OSError as error:
            failure = error
        reports, problems = self._exchange(mine, failure, group)
        self._fail_if(step, step_dir, problems, failure)
        if self.env.is_main:
            files = {name: entry for report in reports for name, entry in report.items()}
            try:
                check_complete(backend, step_dir, files)
                fsync_path(self.root)  # the step folder's own name
                manifest = {
                    "step": step,
                    "world_size": self.env.world_size,
                    "backend": self.config.parallel.backend,
                    "config_hash": config_hash(self.config),
                    "run_id": self.run_id,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "versions": package_versions(),
                    "files": dict(sorted(files.items())),
                }
                atomic_write_bytes(step_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
                atomic_write_text(self.root / LATEST, step_dir.name + "\n")
            except (OSError, UserError, IncompleteReportError) as error:
                failure = error
                (step_dir / MANIFEST).unlink(missing_ok=True)
        self._agree(step, step_dir, failure, group)
        if self.env.is_main:
            retain(self.root, self._belongs, self.config.checkpoint.keep_last)
        self.last_saved_step = step

    def _checkpoint_group(self) -> Any:
        """A separate gloo group, so background-save collectives never interleave with training's."""
        if self._async_group is None and dist.is_initialized():
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group


def _split(result: Any) -> tuple[Future | None, Future | None]:
    """A backend save's (staging, write) futures: None (written already), a future of the write (the
    state was copied before it returned), or DCP's AsyncSaveResponse (copied in the background too)."""
    if result is None or isinstance(result, Future):
        return None, result
    return result.staging_completion, result.upload_completion
