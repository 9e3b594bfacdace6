"""Model start-up: no rank holds the whole model; every rank builds only its shards, from a replay of the seeded
build (or init_from's files read in turns), and rank 0 holds no more than the others.

Most tests start real ranks of tests/startup_probe.py (torchrun's variables, gloo), which build the model
exactly as a training run does and report their memory, the files they opened and the initial weights;
one runs `llm-train train` itself, and the last checks the meta-device build's buffers in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.cli import main as cli_main
from launcher.local import launch_local
from trainer.checkpoint import newest_valid_step
from trainer.config import load_config
from trainer.models.build import ModelRecipe, build_model, empty_model
from trainer.models.load import full_state_dict
from trainer.parallel.fsdp import materialize
from trainer.parallel.model_source import ModelSource, non_persistent_buffers

BACKENDS = ("fsdp", "deepspeed")


def run_probe(out: Path, nproc: int, overrides: list[str], weights: bool = False) -> dict[str, list[dict]]:
    """Start `nproc` ranks of the probe (forks of the suite's rank server) and wait for them; returns each
    backend's reports, by rank. The probe makes glibc give every allocation above 128 KiB back to the system
    when it is freed (by default it keeps freed heap memory resident, more or less depending on the timing of
    the ranks), so that the peak resident memory measures what the code holds."""
    out.mkdir(parents=True, exist_ok=True)
    args = [str(out), f"--backends={','.join(BACKENDS)}", *overrides, *(["--weights"] if weights else [])]
    assert launch_local(nproc, args, module="tests.startup_probe") == 0, (
        "the probe failed (its output is above)"
    )
    return {
        backend: [json.loads((out / f"{backend}-rank{rank}.json").read_text()) for rank in range(nproc)]
        for backend in BACKENDS
    }


def growth_bytes(report: dict, until: str = "hwm_model_kib") -> int:
    """How far the rank's peak resident memory rose above what it held before the model was built."""
    return (report[until] - report["rss_before_kib"]) * 1024


def test_every_rank_builds_only_its_shards_and_rank_0_no_more_than_one_layer_beyond_the_others(tmp_path):
    """12 layers of gpt2-350m (vocab of the demo tokenizer) on 4 ranks: no rank builds the full model. Before,
    rank 0 built it in full (~0.6 GB here, 280 GB for a 70B model) while the others waited in a timed broadcast;
    before that, every rank did. Now each rank replays the seeded build one tensor at a time and keeps its quarter:
    every rank's peak is a fraction of a model copy, and rank 0's is within one decoder layer (in fp32) of
    the others'. For DeepSpeed the model's part ends where the engine starts: the engine's own buffers are
    sized by its config, not by the model.
    """
    overrides = ["model.size=gpt2-350m", "model.n_layer=12", "model.vocab_size=512", "model.seq_len=64",
                 "train.precision=fp32", "train.global_batch_size=4", "train.micro_batch_size=1"]  # fmt: skip
    reports = run_probe(tmp_path, 4, overrides)
    for backend, ranks in reports.items():
        full_copy, layer = ranks[0]["fp32_model_bytes"], ranks[0]["fp32_layer_bytes"]
        assert full_copy > 6e8 and layer > 4e7, (full_copy, layer)  # gpt2-350m's layers
        peaks = [growth_bytes(report) for report in ranks]
        # The measurement sees what a rank holds: at least its quarter of the weights.
        assert min(peaks) >= full_copy / 5, (backend, peaks)
        assert max(peaks) < full_copy / 2, f"{backend}: peaks {[p // 2**20 for p in peaks]} MiB"
        assert peaks[0] <= max(peaks[1:]) + layer, f"{backend}: peaks {[p // 2**20 for p in peaks]} MiB"
        for report in ranks:
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
def test_init_from_a_run_folder_is_checked_and_read_by_every_rank_a_share_each(source, straight, tmp_path):
    """model.init_from=RUN_DIR: the newest checkpoint's files are checksummed by the two ranks, each file once
    in all. The weights are then read one tensor at a time by the rank whose turn it is, and sent to the other:
    each rank reads a share, no rank the whole model. An FSDP checkpoint's optimizer entries are never read; a
    DeepSpeed ZeRO-3 checkpoint keeps the fp32 weights nowhere but in its optimizer partitions
    (`*optim_states.pt`), mapped into memory, a tensor's pieces read when it is its turn. Nothing is opened under
    TMPDIR (importing torch, dill or DeepSpeed's ops does create folders there; that is not the loading's
    doing)."""
    run_dir = straight[source]
    step_dir = newest_valid_step(run_dir / "checkpoints").step_dir
    manifest = json.loads((step_dir / "manifest.json").read_text())
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    overrides = [f"model.init_from={run_dir}", "model.vocab_size=1", "model.seq_len=1",
                 "train.precision=fp32", "train.global_batch_size=4", "train.micro_batch_size=2"]  # fmt: skip
    reports = run_probe(tmp_path / "out", 2, [*overrides, f"--tmpdir={tmpdir}"], weights=True)
    expected = full_state_dict(step_dir)
    for backend, (rank0, rank1) in reports.items():
        read = [
            [path for path in report["opened"] if path.startswith(str(step_dir))] for report in (rank0, rank1)
        ]
        assert all(read), (backend, read)  # both ranks take a share
        assert {str(step_dir / name) for name in manifest["files"]} <= set(read[0]) | set(read[1])
        optimizer_files = [path for path in read[0] + read[1] if "optim" in Path(path).name]
        assert bool(optimizer_files) == (source == "deepspeed"), (backend, optimizer_files)
        for report in (rank0, rank1):
            assert not [p for p in report["opened_by_source"] if p.startswith(str(tmpdir))], backend
            assert report["tied"] and report["training"], report
        state = torch.load(tmp_path / "out" / f"{backend}-weights.pt")
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), (backend, name)
        tensors = [report["weights_read"] for report in (rank0, rank1)]  # the weights: a share each
        assert all(tensors) and not set(tensors[0]) & set(tensors[1]), (backend, tensors)
        assert set(tensors[0] + tensors[1]) <= set(expected), (backend, tensors)


def test_init_from_a_hugging_face_folder_is_read_in_turns(reference_model, tmp_path):
    """model.init_from=an HF folder of safetensors shards (a head model's names): each saved tensor is read by
    one of the two ranks, and the model starts from exactly those weights under both backends."""
    folder = tmp_path / "hf"
    reference_model.save_pretrained(folder, max_shard_size="100KB")  # several files and an index
    assert (folder / "model.safetensors.index.json").is_file()
    overrides = [f"model.init_from={folder}", "model.vocab_size=1", "model.seq_len=1",
                 "train.precision=fp32", "train.global_batch_size=4", "train.micro_batch_size=2"]  # fmt: skip
    reports = run_probe(tmp_path / "out", 2, overrides, weights=True)
    expected = reference_model.state_dict()
    for backend in BACKENDS:
        state = torch.load(tmp_path / "out" / f"{backend}-weights.pt")
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), (backend, name)
        tensors = [report["weights_read"] for report in reports[backend]]
        assert all(tensors) and not set(tensors[0]) & set(tensors[1]), (backend, tensors)


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
def test_non_persistent_buffers_come_from_the_replay_after_to_empty(arch):
    """`to_empty` leaves the buffers no state dict carries (GPT-2's causal masks, Llama's rotary frequencies)
    as whatever memory it got; the replay of the seeded build gives them the values the full build computes,
    whichever family computes them."""
    cfg = load_config("tiny", ["run.dir=unused", "data.path=unused", f"model.arch={arch}", "model.size=" +
                      ("tiny" if arch == "gpt2" else "llama-tiny")]).model  # fmt: skip
    recipe = ModelRecipe(cfg, 257, 32, "eager", seed=1)
    full = recipe.full()
    expected = {name: buffer.clone() for name, buffer in non_persistent_buffers(full)}
    assert expected, f"{arch} has non-persistent buffers"
    model, recording = recipe.record()
    source = ModelSource(recipe, model.config, recorded=(model, recording))
    with torch.device("meta"):
        module = empty_model(full.config, cfg, "eager")
    materialize(module, source, torch.device("cpu"))
    got = dict(non_persistent_buffers(module))
    assert got.keys() == expected.keys()
    for name, buffer in expected.items():
        assert torch.equal(got[name], buffer), name
    for name, param in full.named_parameters():
        assert torch.equal(module.get_parameter(name), param), name


def test_the_replay_gives_every_familys_seeded_weights_and_leaves_the_generator_where_the_full_build_does():
    """Every decoder family of the matrix (padding rows, QK-norm, sliding windows, MoE experts, fused QKV), GPT-2 and
    Llama: the tensors the replay yields (parameters and buffers, tied ones under each name) equal `from_config`
    after the same seed, bit for bit, and so does the generator's state after it. A construction that reads a
    value back (`.item()`) cannot be recorded: NotRecordable, so that rank 0 builds it as before."""
    from test_decoder_matrix import COMMON, DECODERS
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.models.deferred_init import NotRecordable, record, replay, state_refs

    configs = {
        name: AutoConfig.for_model(kind, **{**COMMON, **extra}) for name, (kind, extra) in DECODERS.items()
    }
    configs["gpt2"] = AutoConfig.for_model(
        "gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=32
    )
    configs["llama"] = AutoConfig.for_model("llama", **COMMON)
    for name, config in configs.items():
        build = lambda config=config: AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # noqa: E731
        torch.manual_seed(3)
        full = build()
        expected, after = {**full.state_dict(), **dict(full.named_buffers())}, torch.get_rng_state()
        torch.manual_seed(3)
        model, recording = record(build)
        got = {key: tensor.clone() for group in replay(recording, state_refs(model)) for key, tensor in group}
        assert got.keys() == expected.keys(), name
        assert all(torch.equal(got[key], tensor) for key, tensor in expected.items()), name
        assert torch.equal(torch.get_rng_state(), after), name

    class ReadsAValue(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4))
            self.size = int(self.weight.sum().item())

    with pytest.raises(NotRecordable):
        record(ReadsAValue)
