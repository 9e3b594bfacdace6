"""Model families: llama-tiny with both backends (equal across world sizes, bitwise resume, export), any
Hugging Face decoder by its config folder (Qwen2- and Mistral-style), FLOPs per token by hand, and a
vocabulary above 65,535 (uint32 tokens)."""

from __future__ import annotations

import json
import math
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_checks import assert_gguf_follows_the_export
from trainer_runs import by_step, read_metrics, train

from launcher.cli import main as cli_main
from trainer.checkpoint import newest_valid_step
from trainer.checkpoint.steps import step_dir_name
from trainer.config import DataConfig, load_config, model_shape
from trainer.errors import UserError
from trainer.evaluation import validation_loss
from trainer.models.build import build_model, model_facts
from trainer.models.families import FAMILIES
from trainer.models.load import full_state_dict
from trainer.models.pretrained import load_pretrained

LLAMA = ["model.arch=llama", "model.size=llama-tiny", "train.max_steps=8", "checkpoint.every_steps=4",
         "train.global_batch_size=8", "train.micro_batch_size=2"]  # fmt: skip
FP32_REL = 1e-4  # another world size sums the same numbers in another order


def assert_close(got: dict[int, float], expected: dict[int, float], steps: range) -> None:
    for step in steps:
        assert math.isclose(got[step], expected[step], rel_tol=FP32_REL), (step, got[step], expected[step])


@pytest.fixture(scope="module")
def llama_runs(demo_dataset, tmp_path_factory) -> dict[str, Path]:
    """llama-tiny, 8 steps: FSDP on 2 ranks straight; FSDP on 2 ranks resumed from the straight run's step-4
    checkpoint in a run folder of its own; FSDP on 1 rank stopped at 4 and resumed on 2 (a stop and resume in
    one folder); DeepSpeed on 2 ranks straight."""
    root = tmp_path_factory.mktemp("llama")
    data = demo_dataset.path
    train(root / "fsdp", data, nproc=2, overrides=LLAMA)
    step_4 = root / "fsdp" / "checkpoints" / step_dir_name(4)
    train(root / "stopped", data, nproc=2, overrides=[*LLAMA, f"checkpoint.resume={step_4}"])
    train(root / "one-rank", data, nproc=1, overrides=[*LLAMA, "train.stop_at_step=4"])
    train(root / "one-rank", data, nproc=2, overrides=LLAMA)
    train(root / "deepspeed", data, nproc=2, overrides=[*LLAMA, "parallel.backend=deepspeed"])
    return {name: root / name for name in ("fsdp", "stopped", "one-rank", "deepspeed")}


def test_llama_tiny_resumes_bitwise_after_a_stop(llama_runs):
    straight, resumed = read_metrics(llama_runs["fsdp"]), read_metrics(llama_runs["stopped"])
    assert next(r for r in straight if r.get("event") == "start")["arch"] == "llama"
    expected_losses = by_step(straight)
    assert (
        by_step(resumed) == {step: expected_losses[step] for step in range(5, 9)}
        and len(expected_losses) == 8
    )
    assert any(r.get("event") == "resume" and r["step"] == 4 for r in resumed)
    final = full_state_dict(newest_valid_step(llama_runs["stopped"] / "checkpoints").step_dir)
    expected = full_state_dict(newest_valid_step(llama_runs["fsdp"] / "checkpoints").step_dir)
    assert final.keys() == expected.keys() and "lm_head.weight" in final  # untied: a head of its own
    assert all(torch.equal(final[name], tensor) for name, tensor in expected.items())


def test_llama_tiny_on_one_rank_equals_two_and_resumes_on_another_world_size(llama_runs):
    """Steps 1-4 on 1 rank, 5-8 on 2 from its checkpoint: the 2-rank run's losses within fp32 tolerance."""
    expected = by_step(read_metrics(llama_runs["fsdp"]))
    records = read_metrics(llama_runs["one-rank"])
    assert next(r for r in records if r.get("event") == "resume")["from_world_size"] == 1
    assert_close(by_step(records), expected, range(1, 9))


def test_llama_tiny_trains_the_same_under_deepspeed(llama_runs):
    expected, got = by_step(read_metrics(llama_runs["fsdp"])), by_step(read_metrics(llama_runs["deepspeed"]))
    assert_close(got, expected, range(1, 9))
    assert got[8] < got[1] - 0.1


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_llama_export_loads_in_transformers_with_the_trainers_logits(backend, llama_runs, tmp_path):
    """fp32 from either backend: the trainer's logits (1e-5); and the GGUF files (f16, q8_0) beside it."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "hf"
    gguf = (
        ["--gguf", "f16", "--gguf", "q8_0"] if backend == "fsdp" else []
    )  # the same folder for both backends
    assert cli_main(["export", str(llama_runs[backend]), "--out", str(out), "--dtype", "fp32", *gguf]) == 0
    exported = load_pretrained(out).eval()
    assert isinstance(exported, LlamaForCausalLM) and exported.config.num_key_value_heads == 2
    step_dir = newest_valid_step(llama_runs[backend] / "checkpoints").step_dir
    config = load_config(step_dir / "config.yaml")
    state = full_state_dict(step_dir)
    vocab, seq_len = state["model.embed_tokens.weight"].shape[0], exported.config.max_position_embeddings
    trainer_model = build_model(config.model, vocab, seq_len, "sdpa", seed=0)  # built as training builds it
    trainer_model.load_state_dict(state)
    input_ids = AutoTokenizer.from_pretrained(out)("def parse(text):\n    return text", return_tensors="pt")
    with torch.no_grad():
        expected = trainer_model.eval()(input_ids["input_ids"]).logits
        got = exported(input_ids["input_ids"]).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    if gguf:  # llama.cpp's files: see tests/gguf_checks.py
        assert_gguf_follows_the_export(out, Path(__file__).read_text()[:4000])


# --- any Hugging Face decoder, from a config folder ------------------------------------------------


def hf_folder(kind: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random model of a family the trainer has no module for, and the data's tokenizer, saved."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
    torch.manual_seed(7)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    else:
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=None))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_any_hf_decoder_starts_at_its_own_loss_trains_and_exports(kind, demo_dataset, tmp_path):
    folder = hf_folder(kind, demo_dataset.path / "tokenizer", tmp_path / kind)
    before = validation_loss(
        load_pretrained(folder).eval(), str(demo_dataset.path), batches=2, micro_batch_size=4
    )
    run_dir = tmp_path / "run"
    overrides = ["model.arch=hf", "model.size=null", f"model.init_from={folder}", "eval.every_steps=6", "eval.batches=2",
                 "train.max_steps=6", "train.global_batch_size=4", "train.micro_batch_size=4", "train.lr=3e-3"]  # fmt: skip
    records = train(run_dir, demo_dataset.path, nproc=1, overrides=overrides)
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert math.isclose(evals[0], before["val_loss"], rel_tol=1e-5), (evals[0], before)
    assert evals[-1] < evals[0] - 0.05, evals
    out = tmp_path / "export"
    assert cli_main(["export", str(run_dir), "--out", str(out), "--dtype", "fp32"]) == 0
    exported = load_pretrained(out)
    assert exported.config.model_type == kind
    after = validation_loss(exported.eval(), str(demo_dataset.path), batches=2, micro_batch_size=4)
    assert math.isclose(after["val_loss"], evals[-1], rel_tol=1e-5), (after, evals[-1])


def test_an_init_from_of_another_family_names_model_arch(demo_dataset, tmp_path):
    folder = hf_folder("qwen2", demo_dataset.path / "tokenizer", tmp_path / "qwen2")
    config = load_config(
        "tiny", [f"run.dir={tmp_path}", f"data.path={demo_dataset.path}", f"model.init_from={folder}"]
    )
    with pytest.raises(UserError, match=r"is a 'qwen2' model but model.arch=gpt2; set model.arch=hf"):
        build_model(config.model, 512, 64, "sdpa", seed=0)


def test_a_folder_with_its_own_code_runs_nothing_unless_trusted(demo_dataset, tmp_path):
    """A config.json whose auto_map points at a Python file next to it: refused naming the key, and the
    file (which would leave a mark) never runs."""
    folder = hf_folder("qwen2", demo_dataset.path / "tokenizer", tmp_path / "custom")
    mark = tmp_path / "code-ran"
    (folder / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(mark)!r}).write_text('ran')\n"
        "from transformers import Qwen2Config\nclass CustomConfig(Qwen2Config):\n    model_type = 'custom'\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    overrides = [f"run.dir={tmp_path / 'run'}", f"data.path={demo_dataset.path}", "model.arch=hf",
                 "model.size=null", f"model.hf_config={folder}"]  # fmt: skip
    config = load_config("tiny", overrides)
    with pytest.raises(
        UserError, match=r"model.hf_config='.*' ships its own model code.*model.trust_remote_code=true"
    ):
        build_model(config.model, 512, 64, "sdpa", seed=0)
    assert not mark.exists()


def test_hf_shape_keys_and_the_datas_vocabulary_apply_to_a_config_folder(demo_dataset, tmp_path):
    folder = hf_folder("mistral", demo_dataset.path / "tokenizer", tmp_path / "mistral")
    overrides = [f"run.dir={tmp_path}", f"data.path={demo_dataset.path}", "model.arch=hf", "model.size=null",
                 f"model.hf_config={folder}", "model.n_layer=3", "model.n_kv_head=1"]  # fmt: skip
    model = build_model(load_config("tiny", overrides).model, 300, 256, "sdpa", seed=0)
    assert type(model).__name__ == "MistralForCausalLM"
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (3, 1)
    assert model.config.vocab_size == 300 and model.config.max_position_embeddings == 256


# --- FLOPs by hand -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", ["tiny", "gpt2-124m", "gpt2-1.5b", "llama-tiny", "llama-150m", "llama-1b", "llama-3b"]
)
def test_flops_per_token_of_each_preset_match_a_count_of_its_matmuls(size):
    """6 FLOPs per weight of every matrix product a token goes through, plus attention's scores and
    weighted sum, 12 * layers * width * context; counted here from the shapes alone."""
    arch = "llama" if size.startswith("llama") else "gpt2"
    config = load_config("tiny", ["run.dir=x", "data.path=x", f"model.arch={arch}", f"model.size={size}"])
    vocab, seq_len = 50257, 1024
    with torch.device("meta"):
        facts = model_facts(build_model(config.model, vocab, seq_len, "sdpa", seed=0), seq_len, arch)
    shape = model_shape(config.model)
    d, layers = shape["n_embd"], shape["n_layer"]
    if arch == "gpt2":
        per_layer = d * 3 * d + d * d + 2 * d * 4 * d  # qkv, out, fc + proj
    else:
        kv = d // shape["n_head"] * shape["n_kv_head"]
        per_layer = d * d + 2 * d * kv + d * d + 3 * d * shape["intermediate_size"]  # q, k+v, o, gate/up/down
    head = d * vocab  # the output layer, tied or not; the input embedding is a lookup
    expected = 6 * (layers * per_layer + head) + 12 * layers * d * seq_len
    assert facts.flops_per_token() == expected


# --- a vocabulary above 65,535 --------------------------------------------------------------------


def test_a_vocabulary_above_uint16_is_prepared_as_uint32_and_trains(tmp_path):
    """A word-level tokenizer of 70,000 entries whose corpus words all sit above id 65,535."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trainer.data.prepare import PrepareOptions, run_prepare

    corpus = [
        Path(sysconfig.get_paths()["stdlib"]) / name for name in ("textwrap.py", "string.py", "glob.py")
    ]
    words = sorted({word for path in corpus for word in re.findall(r"\S+", path.read_text())})
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {f"<filler{i}>": i for i in range(2, 66000)}
    vocab |= {word: 66000 + index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>"
    ).save_pretrained(tmp_path / "tokenizer")
    data = tmp_path / "data"
    run_prepare(
        PrepareOptions(
            inputs=[str(path) for path in corpus],
            out=data,
            tokenizer=str(tmp_path / "tokenizer"),
            seq_len=32,
            workers=1,
        )
    )
    prepared = json.loads((data / "prepare.json").read_text())
    assert prepared["vocab_size"] == len(vocab) > 65536
    from trainer.data.loader import build_loader

    batch = next(iter(build_loader(DataConfig(path=str(data), shuffle=False), "train", 4, seed=0)))
    assert int(batch["input_ids"].max()) > 65535 and batch["input_ids"].dtype == torch.int64
    records = train(tmp_path / "run", data, nproc=1, overrides=[*LLAMA[:2], "train.max_steps=4", "train.lr=1e-2",
                                                                "train.global_batch_size=4", "train.micro_batch_size=4"])  # fmt: skip
    losses = [r["loss"] for r in records if "loss" in r]
    assert (
        len(losses) == 4
        and all(np.isfinite(losses))
        and losses[0] == pytest.approx(math.log(len(vocab)), rel=0.02)
    )


def test_the_readme_llama_command_trains_and_status_names_the_family(demo_dataset, tmp_path, capsys):
    """The README's `llm-train train llama-tiny ...` line as written, with this test's data, folder and steps."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("llm-train train llama-tiny "))
    args = line.split()[1:]
    args = [f"data.path={demo_dataset.path}" if a.startswith("data.path=") else a for a in args]
    args = [f"run.dir={tmp_path / 'run'}" if a.startswith("run.dir=") else a for a in args]
    args = ["train.max_steps=3" if a.startswith("train.max_steps=") else a for a in args]
    assert cli_main([*args, "log.wandb=off", "eval.every_steps=0", "checkpoint.every_steps=3"]) == 0
    capsys.readouterr()
    assert cli_main(["status", str(tmp_path / "run")]) == 0
    assert re.search(r"^model\s+llama llama-tiny, 0\.\d\dM parameters$", capsys.readouterr().out, re.M)


@pytest.mark.parametrize(
    ("size", "published"),
    [  # from meta-llama/Llama-3.2-1B and -3B's and Llama-3.1-8B's config.json
        ("llama-1b", {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "intermediate_size": 8192,
                      "tie_word_embeddings": True, "rope_scaling": {"factor": 32.0}}),
        ("llama-3b", {"hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24, "intermediate_size": 8192,
                      "tie_word_embeddings": True, "rope_scaling": {"factor": 32.0}}),
        ("llama-8b", {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 14336,
                      "tie_word_embeddings": False, "rope_scaling": {"factor": 8.0}}),
    ],
)  # fmt: skip
def test_the_llama_3_presets_are_the_published_configs(size, published):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = load_config("tiny", ["run.dir=x", "data.path=x", "model.arch=llama", f"model.size={size}"])
    ours = FAMILIES["llama"].make_config(config.model, model_shape(config.model), 128256, 2048)
    scaling = {"high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
               "rope_type": "llama3", **published["rope_scaling"]}  # fmt: skip
    reference = LlamaConfig(
        **{**published, "rope_scaling": scaling}, vocab_size=128256, num_key_value_heads=8,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    )  # fmt: skip
    keys = ["rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "head_dim", "max_position_embeddings",
            "num_key_value_heads", *published]  # fmt: skip
    assert {k: getattr(ours, k) for k in keys} == {k: getattr(reference, k) for k in keys}
    assert torch.equal(LlamaRotaryEmbedding(ours).inv_freq, LlamaRotaryEmbedding(reference).inv_freq)


def _own_code_folder(out: Path, vocab_size: int) -> Path:
    """A 2-layer GPT-2 subclass as a folder with its own code (auto_map), as a new user would write one."""
    out.mkdir()
    (out / "configuration_tinygpt.py").write_text(
        "from transformers import GPT2Config\n\n\nclass TinyGPTConfig(GPT2Config):\n    model_type = 'tinygpt'\n"
    )
    (out / "modeling_tinygpt.py").write_text(
        "from transformers import GPT2LMHeadModel\n\nfrom .configuration_tinygpt import TinyGPTConfig\n\n\n"
        "class TinyGPTForCausalLM(GPT2LMHeadModel):\n    config_class = TinyGPTConfig\n"
    )
    auto_map = {"AutoConfig": "configuration_tinygpt.TinyGPTConfig",
                "AutoModelForCausalLM": "modeling_tinygpt.TinyGPTForCausalLM"}  # fmt: skip
    config = {"model_type": "tinygpt", "architectures": ["TinyGPTForCausalLM"], "n_layer": 2, "n_embd": 64,
              "n_head": 4, "n_positions": 128, "vocab_size": vocab_size, "auto_map": auto_map}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_a_model_with_its_own_code_trains_on_two_ranks_and_loads_with_the_flag(
    backend, demo_dataset, tmp_path, capsys
):
    """model.trust_remote_code=true: every rank imports the folder's code (rank 1 used to fail to unpickle rank
    0's config class); the checkpoint keeps the code, so eval and export load it with --trust-remote-code and
    the exported folder loads in transformers."""
    folder = _own_code_folder(tmp_path / "custom", 512)
    run_dir = tmp_path / "run"
    overrides = ["model.arch=hf", "model.size=null", f"model.hf_config={folder}", "model.trust_remote_code=true",
                 f"parallel.backend={backend}", "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=4"]  # fmt: skip
    records = train(run_dir, demo_dataset.path, nproc=2, overrides=overrides)
    assert records[-1]["event"] == "done" and records[0]["world_size"] == 2
    step = newest_valid_step(run_dir / "checkpoints").step_dir
    assert sorted(p.name for p in (step / "model_code").iterdir()) == [
        "configuration_tinygpt.py",
        "modeling_tinygpt.py",
    ]
    capsys.readouterr()
    assert cli_main(["eval", str(run_dir), "--batches", "1", "--trust-remote-code"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2  # DeepSpeed prints first
    if backend == "fsdp":  # the export path is the same for both
        out = tmp_path / "hf"
        assert cli_main(["export", str(run_dir), "--out", str(out), "--trust-remote-code"]) == 0
        model = load_pretrained(out, trust_remote_code=True)
        assert type(model).__name__ == "TinyGPTForCausalLM"


def test_flops_per_token_of_a_moe_count_the_experts_a_token_uses():
    """Qwen2-MoE with 8 experts, 2 per token: the estimate (forward: a third of flops_per_token) against
    torch's FLOP counter over a real forward pass, which runs only the chosen experts. Counting every expert
    overstated MFU and `plan` by experts/top-k."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2_moe", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    tokens = torch.randint(0, 512, (4, 64))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=tokens)
    measured = counter.get_total_flops() / tokens.numel()
    estimate = model_facts(model, 64, "hf").flops_per_token() / 3
    assert abs(estimate / measured - 1) < 0.10, (estimate, measured)
