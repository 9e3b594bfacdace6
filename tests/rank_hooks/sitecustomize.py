"""Test hooks in the ranks of local training runs: imported by Python at start-up, this folder being on PYTHONPATH
for the whole suite (tests/conftest.py puts it there before the suite's rank server starts).

Each hook does nothing until its variable is set in the rank's own environment, and reads it when it acts, not at
start-up: the variables start with LLM_TRAIN_TEST_, which the rank server applies to each rank it forks without
comparing them (launcher/rank_server.py, LAZY_ENV_PREFIXES). So a test that sets one keeps the suite's shared
server instead of starting one of its own (seconds of imports a launch). Nothing heavy is imported here: a module
to patch is patched when the process imports it (the server compares the environment it started with, which
importing torch would change), and only in rank processes (a rank server's, or `python -m trainer.main`).

- LLM_TRAIN_TEST_FIRST_STEP=PREFIX: each rank writes PREFIX.rankN.json after the first training step of its
  process: the step, whether the model was in train mode during it, how many times each transformer block's
  forward ran, the micro batches per step, and after each micro batch but the last the gradient elements the rank
  holds as a fraction of the model's parameters (FSDP: its shards, and any unsharded accumulated gradient FSDP2
  keeps between micro batches). With activation checkpointing at work every block runs twice per micro batch.
- LLM_TRAIN_TEST_HOST_SYNCS=PREFIX:FIRST:LAST: each rank writes PREFIX.rankN.json listing every conversion of a
  tensor to a host value (item, float, int, bool, cpu, tolist, numpy) made by the training thread from the start
  of step FIRST to the start of step LAST + 1, with where it was made, and the files it opened. The one read that
  is meant to happen, StepReport.read of its host buffer (trainer/step_report.py), is left out.
- LLM_TRAIN_TEST_CHECKSUMS=PREFIX: each rank appends to PREFIX.rankN.txt every file whose checksum it computes to
  verify a checkpoint (trainer.checkpoint.manifest.file_checksum).
- LLM_TRAIN_TEST_SLOW_CHECKSUMS=SECONDS: every such checksum takes SECONDS longer (a slow shared filesystem).
- LLM_TRAIN_TEST_SLOW_CONVERSION=SECONDS:MARKER: rank 0's conversion to DeepSpeed's universal format takes SECONDS
  longer, and rank 0 writes the file MARKER when it has slept.
- LLM_TRAIN_TEST_FSYNC_LOG=FILE: every os.fsync of the rank appends the path it synced to FILE.
- LLM_TRAIN_TEST_HIDE_FROM_RANK0=NAME: rank 0's os.scandir and os.listdir leave out entries named NAME, as an NFS
  client with a stale cache would.
All but the slowing ones observe only.
"""

import importlib.abc
import os
import sys

_PATCHES = {}
"""module name -> functions that patch the module once it has been executed."""


def _setting(name):
    return os.environ.get(f"LLM_TRAIN_TEST_{name}", "")


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of a module named in _PATCHES so that its patches run right after
    the module is executed."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            spec = (
                finder.find_spec(name, path, target)
                if finder is not self and hasattr(finder, "find_spec")
                else None
            )
            if spec is not None and spec.loader is not None:
                execute = spec.loader.exec_module

                def exec_module(module, _execute=execute, _name=name):
                    _execute(module)
                    for patch in _PATCHES[_name]:
                        patch(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


def _after_import(module_name):
    def register(patch):
        _PATCHES.setdefault(module_name, []).append(patch)
        return patch

    return register


# --- the training step: the first step's observation, and the host conversions of a window of steps ----------


@_after_import("trainer.loop")
def _observe_first_step(loop):
    import json
    from pathlib import Path

    train_step, observed = loop.train_step, []

    def gradient_fraction(module):
        """Gradient elements held on this rank over the model's parameter count (a DTensor counts globally)."""
        from torch.distributed.tensor import DTensor

        full = sum(p.numel() for p in module.parameters())
        held = sum(
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).numel()
            for p in module.parameters()
            if p.grad is not None
        )
        for sub in module.modules():
            state = sub._get_fsdp_state() if hasattr(sub, "_get_fsdp_state") else None
            group = state._fsdp_param_group if state is not None else None
            for fsdp_param in group.fsdp_params if group is not None else []:
                accumulated = getattr(fsdp_param, "unsharded_accumulated_grad", None)
                held += accumulated.numel() if accumulated is not None else 0
        return held / full

    def observed_train_step(ctx, batches, step, batch_index):
        prefix = _setting("FIRST_STEP")
        if not prefix or observed:
            return train_step(ctx, batches, step, batch_index)
        from trainer.models.build import decoder_layers

        observed.append(step)
        blocks = list(decoder_layers(ctx.backend.module))
        calls, training = [0] * len(blocks), []

        def count(index):
            def hook(module, args):
                calls[index] += 1
                training.append(module.training)

            return hook

        handles = [block.register_forward_pre_hook(count(i)) for i, block in enumerate(blocks)]
        forward_backward, held = ctx.backend.forward_backward, []

        def observed_forward_backward(*args, **kwargs):
            loss = forward_backward(*args, **kwargs)
            if not kwargs["last_micro_batch"]:
                held.append(gradient_fraction(ctx.backend.module))
            return loss

        ctx.backend.forward_backward = observed_forward_backward
        try:
            result = train_step(ctx, batches, step, batch_index)
        finally:
            del ctx.backend.forward_backward
            for handle in handles:
                handle.remove()
        record = {"step": step, "training": all(training) and bool(training), "block_calls": calls,
                  "grad_accum": ctx.plan.grad_accum, "gradient_held": held}  # fmt: skip
        Path(f"{prefix}.rank{ctx.rank}.json").write_text(json.dumps(record))
        return result

    loop.train_step = observed_train_step


@_after_import("trainer.loop")
def _count_host_conversions(loop):
    import json
    import threading
    import traceback
    from pathlib import Path

    import torch

    from trainer.step_report import StepReport

    window = {"open": False, "seen": [], "opened": []}
    main_thread = threading.main_thread()

    def audit(event, args):  # files the training thread opens in the window
        if event == "open" and window["open"] and threading.current_thread() is main_thread:
            window["opened"].append(str(args[0]))

    sys.addaudithook(audit)

    def where():
        frames = [f for f in traceback.extract_stack()[:-2] if "sitecustomize" not in f.filename]
        return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))

    def counted(name, original):
        def conversion(self, *args, **kwargs):
            if window["open"] and threading.current_thread() is main_thread:
                caller = sys._getframe(1).f_code
                if not (name == "numpy" and caller is StepReport.read.__code__):
                    window["seen"].append(f"Tensor.{name}: {where()}")
            return original(self, *args, **kwargs)

        return conversion

    for name in ("item", "__float__", "__int__", "__bool__", "cpu", "tolist", "numpy"):
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))

    train_step = loop.train_step

    def windowed_train_step(ctx, batches, step, batch_index):
        setting = _setting("HOST_SYNCS")
        if setting:
            prefix, first, last = setting.rsplit(":", 2)
            if step == int(first):
                window["open"] = True
            elif step == int(last) + 1 and window["open"]:
                window["open"] = False
                record = {"first": int(first), "last": int(last), "conversions": window["seen"],
                          "opened": window["opened"]}  # fmt: skip
                Path(f"{prefix}.rank{ctx.rank}.json").write_text(json.dumps(record, indent=1))
        return train_step(ctx, batches, step, batch_index)

    loop.train_step = windowed_train_step


# --- checkpoints: who checksums what, slowly if asked; DeepSpeed's conversion, slowly --------------------------


@_after_import("trainer.checkpoint.manifest")
def _watch_checksums(manifest):
    import time

    file_checksum = manifest.file_checksum

    def watched_file_checksum(path):
        listing = _setting("CHECKSUMS")
        if listing:
            with open(f"{listing}.rank{os.environ.get('RANK', '0')}.txt", "a") as out:
                out.write(f"{path}\n")
        seconds = float(_setting("SLOW_CHECKSUMS") or 0)
        if seconds:
            time.sleep(seconds)
        return file_checksum(path)

    manifest.file_checksum = watched_file_checksum


@_after_import("trainer.parallel.deepspeed")
def _slow_conversion(deepspeed_backend):
    import time
    from pathlib import Path

    convert = deepspeed_backend.to_universal

    def slowed(source, target):
        setting = _setting("SLOW_CONVERSION")
        if setting and os.environ.get("RANK") == "0":
            seconds, marker = setting.split(":", 1)
            time.sleep(float(seconds))
            Path(marker).write_text("slept")
        convert(source, target)

    deepspeed_backend.to_universal = slowed


# --- the filesystem as the rank sees it ---------------------------------------------------------------------


def _install_filesystem_hooks():
    fsync, scandir, listdir = os.fsync, os.scandir, os.listdir

    def recorded_fsync(fd):
        fsync(fd)
        log = _setting("FSYNC_LOG")
        if not log:
            return
        try:
            line = os.readlink(f"/proc/self/fd/{fd}") + "\n"
        except OSError:
            return
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(out, line.encode())
        finally:
            os.close(out)

    class Without:
        def __init__(self, entries, hidden):
            self._entries, self._hidden = entries, hidden

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._entries.close()

        def __iter__(self):
            return self

        def __next__(self):
            while True:
                entry = next(self._entries)
                if entry.name != self._hidden:
                    return entry

        def close(self):
            self._entries.close()

    def hidden():
        return _setting("HIDE_FROM_RANK0") if os.environ.get("RANK") == "0" else ""

    def stale_scandir(path="."):
        name = hidden()
        return Without(scandir(path), name) if name else scandir(path)

    def stale_listdir(path="."):
        name = hidden()
        return [entry for entry in listdir(path) if entry != name] if name else listdir(path)

    os.fsync, os.scandir, os.listdir = recorded_fsync, stale_scandir, stale_listdir


if any(arg in ("launcher.rank_server", "trainer.main") for arg in sys.orig_argv):
    sys.meta_path.insert(0, _PatchAfterImport())
    _install_filesystem_hooks()
