"""Model start-up: one full copy of the model per job, on rank 0; the other ranks build only their shards.

Most tests start real ranks of tests/startup_probe.py (torchrun's variables, gloo), which build the model
exactly as a training run does and report their memory, the files they opened and the initial weights;
one runs `llm-train train` itself, and the last checks the meta-device build's buffers in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.cli import main as cli_main
from launcher.local import free_port
from trainer.checkpoint import newest_valid_step
from trainer.config import load_config
from trainer.models.build import ModelRecipe, build_model, empty_model
from trainer.models.load import full_state_dict
from trainer.parallel.model_source import ModelSource, non_persistent_buffers

PROBE = Path(__file__).resolve().parent / "startup_probe.py"
BACKENDS = ("fsdp", "deepspeed")


def run_probe(out: Path, nproc: int, overrides: list[str], extra_env: dict[str, str] | None = None,
              weights: bool = False, timeout: float = 300) -> dict[str, list[dict]]:  # fmt: skip
    """Start `nproc` ranks of the probe and wait for them; returns each backend's reports, by rank.

    MALLOC_MMAP_THRESHOLD_ makes glibc give every allocation above 128 KiB back to the system when it is
    freed (by default it keeps freed heap memory resident, more or less depending on the timing of the
    ranks), so that the peak resident memory measures what the code holds.
    """
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    command = [sys.executable, str(PROBE), str(out), f"--backends={','.join(BACKENDS)}", *overrides]
    if weights:
        command.append("--weights")
    procs = []
    for rank in range(nproc):
        env = dict(base, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        log = (out / f"rank{rank}.log").open("w")
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = "\n".join((out / f"rank{rank}.log").read_text()[-3000:] for rank in range(nproc))
    assert codes == [0] * nproc, f"probe exit codes {codes}:\n{logs}"
    return {
        backend: [json.loads((out / f"{backend}-rank{rank}.json").read_text()) for rank in range(nproc)]
        for backend in BACKENDS
    }


def growth_bytes(report: dict, until: str = "hwm_model_kib") -> int:
    """How far the rank's peak resident memory rose above what it held before the model was built."""
    return (report[until] - report["rss_before_kib"]) * 1024


def test_no_rank_but_0_holds_half_a_model_copy_while_building_it(tmp_path):
    """gpt2-350m (vocab of the demo tokenizer) on 4 ranks: the model is built once, on rank 0.

    Before, every rank built the full fp32 model on its CPU (~1.2 GB here, ~6 GB for gpt2-1.5b, on each of
    8 ranks per node) before sharding it. Now the others hold their quarter of the weights plus one
    parameter in transit. For DeepSpeed the model's part ends where the engine starts: the engine's own
    buffers are sized by its config, not by the model.
    """
    overrides = ["model.size=gpt2-350m", "model.vocab_size=512", "model.seq_len=64", "train.precision=fp32",
                 "train.global_batch_size=4", "train.micro_batch_size=1"]  # fmt: skip
    reports = run_probe(tmp_path, 4, overrides)
    for backend, ranks in reports.items():
        full_copy = ranks[0]["fp32_model_bytes"]
        assert full_copy > 1.1e9, full_copy  # gpt2-350m's shape
        # The measurement sees a full copy where there is one: rank 0's.
        assert growth_bytes(ranks[0]) >= full_copy, (backend, growth_bytes(ranks[0]), full_copy)
        for report in ranks[1:]:
            peak = growth_bytes(report)
            assert peak < full_copy / 2, f"{backend} rank {report['rank']}: peak +{peak / 2**20:.0f} MiB"
            assert report["tied"] and report["training"], report


@pytest.fixture(scope="module")
def reference_model():
    """The model every rank built before: the full seeded model of the tiny shape, in this process."""
    cfg = load_config(
        "tiny", ["run.dir=unused", "data.path=unused", "model.vocab_size=257", "model.seq_len=32"]
    )
    return build_model(cfg.model, 257, 32, "sdpa", seed=cfg.run.seed)


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_initial_weights_are_bitwise_the_same_for_every_world_size_and_backend(
    reference_model, nproc, tmp_path
):
    """The seed alone decides the initial weights and buffers: any world size, either backend, equal to the
    full model built in one process. A vocabulary of 257 rows shards unevenly over 2 and 4 ranks."""
    overrides = ["model.vocab_size=257", "model.seq_len=32", "train.precision=fp32",
                 "train.global_batch_size=4", "train.micro_batch_size=1"]  # fmt: skip
    reports = run_probe(tmp_path, nproc, overrides, weights=True)
    expected = reference_model.state_dict()
    buffers = {
        f"buffer:{name}": buffer for name, buffer in reference_model.named_buffers() if name not in expected
    }
    assert buffers, "GPT-2's attention has non-persistent buffers (its causal mask)"
    for backend in BACKENDS:
        state = torch.load(tmp_path / f"{backend}-weights.pt")
        assert state.keys() == expected.keys() | buffers.keys(), backend
        for name, tensor in {**expected, **buffers}.items():
            assert state[name].dtype == tensor.dtype, (backend, name)
            assert torch.equal(state[name], tensor), (backend, name)
        for report in reports[backend]:
            assert report["tied"] and report["training"], report
            assert report["n_params"] == reports["fsdp"][0]["n_params"]


@pytest.mark.parametrize("source", BACKENDS)
def test_init_from_a_run_folder_is_read_by_rank_0_alone(source, straight, tmp_path):
    """model.init_from=RUN_DIR: rank 0 reads the newest checkpoint, once; the other ranks read nothing of
    it and get its weights by the same broadcast as a seeded start. Reading it opens nothing under TMPDIR
    (importing torch, dill or DeepSpeed's ops does create folders there; that is not the loading's doing).

    An FSDP checkpoint's optimizer files are not read at all. A DeepSpeed ZeRO-3 checkpoint keeps the fp32
    weights nowhere but in its optimizer partitions (`*optim_states.pt`), so those are read there.
    """
    run_dir = straight[source]
    step_dir = newest_valid_step(run_dir / "checkpoints").step_dir
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    overrides = [f"model.init_from={run_dir}", "model.vocab_size=1", "model.seq_len=1",
                 "train.precision=fp32", "train.global_batch_size=4", "train.micro_batch_size=2"]  # fmt: skip
    reports = run_probe(tmp_path / "out", 2, overrides, extra_env={"TMPDIR": str(tmpdir)}, weights=True)
    for backend, (rank0, rank1) in reports.items():
        read = [path for path in rank0["opened"] if path.startswith(str(run_dir))]
        assert any(path.startswith(str(step_dir)) for path in read), (backend, read)
        optimizer_files = [path for path in read if "optim" in Path(path).name]
        assert bool(optimizer_files) == (source == "deepspeed"), (backend, optimizer_files)
        assert not [path for path in rank1["opened"] if path.startswith(str(run_dir))], backend
        for report in (rank0, rank1):
            assert not [p for p in report["opened_by_source"] if p.startswith(str(tmpdir))], backend
            assert report["tied"] and report["training"], report
    expected = full_state_dict(step_dir)
    for backend in BACKENDS:
        state = torch.load(tmp_path / "out" / f"{backend}-weights.pt")
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), (backend, name)


def test_an_init_from_that_cannot_be_loaded_stops_every_rank_with_one_user_error(
    demo_dataset, tmp_path, capfd
):
    """Only rank 0 reads init_from, so only rank 0 finds it missing: its UserError reaches the other ranks
    (which would otherwise wait for its weights until the collective timeout), every rank stops with it,
    the run exits 2 (a user error), and the console gets it once."""
    missing = tmp_path / "no-such-model"
    args = [f"run.dir={tmp_path / 'run'}", f"data.path={demo_dataset.path}", f"model.init_from={missing}",
            "log.wandb=off", "parallel.timeout_s=600"]  # fmt: skip
    assert cli_main(["train", "tiny", *args, "--nproc", "2"]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("llm-train: error:")]
    assert len(errors) == 1 and f"model.init_from='{missing}' cannot be loaded" in errors[0], errors
    rank1 = (tmp_path / "run" / "logs" / "rank1.log").read_text()
    assert f"model.init_from='{missing}' cannot be loaded" in rank1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_non_persistent_buffers_come_from_the_full_model_after_to_empty(arch):
    """`to_empty` leaves the buffers no state dict carries (GPT-2's causal masks, Llama's rotary frequencies)
    as whatever memory it got; they are copied from the full model, whichever family computes them."""
    cfg = load_config("tiny", ["run.dir=unused", "data.path=unused", f"model.arch={arch}", "model.size=" +
                      ("tiny" if arch == "gpt2" else "llama-tiny")]).model  # fmt: skip
    recipe = ModelRecipe(cfg, 257, 32, "eager", seed=1)
    full = recipe.full()
    expected = {name: buffer.clone() for name, buffer in non_persistent_buffers(full)}
    assert expected, f"{arch} has non-persistent buffers"
    with torch.device("meta"):
        model = empty_model(full.config, cfg, "eager")
    model.to_empty(device="cpu")
    for buffer in model.buffers():
        buffer.fill_(True if buffer.dtype == torch.bool else 7.0)  # not what __init__ makes
    ModelSource(recipe, full.config, full).share_buffers(model)
    got = dict(non_persistent_buffers(model))
    assert got.keys() == expected.keys()
    for name, buffer in expected.items():
        assert torch.equal(got[name], buffer), name
