"""Instruction tuning: chat data prepared with a loss mask, packed examples kept apart, the loss over response
tokens right under accumulation and data parallelism, bitwise resume, eval, export with the chat template."""

from __future__ import annotations

import json
import logging
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_runs import by_step, host_conversions, read_metrics, train

from launcher.cli import main as cli_main
from trainer.checkpoint import newest_valid_step
from trainer.checkpoint.steps import step_dir_name
from trainer.config import DataConfig, load_config
from trainer.data.batches import instruction_targets
from trainer.data.loader import build_loader
from trainer.data.prepare import PrepareOptions, run_prepare
from trainer.data.prepare.instructions import RecordCounts, encode
from trainer.data.prepare.stdlib_instructions import stdlib_records
from trainer.errors import UserError
from trainer.models.build import build_model
from trainer.models.load import full_state_dict
from trainer.parallel.inputs import model_inputs, prepare_attention

SEQ_LEN = 128
BAD_LINES = {
    "invalid_json": "{not json",
    "missing_field": json.dumps({"messages": [{"role": "user"}]}),
    "bad_role": json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
    "no_response": json.dumps({"messages": [{"role": "user", "content": "hello"}]}),
    "empty_response": json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
    "prompt_too_long": json.dumps({"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "yes"}]}),
}  # fmt: skip
SFT = ["train.global_batch_size=8", "train.max_steps=6", "checkpoint.every_steps=3", "train.lr=3e-3"]


@pytest.fixture(scope="module")
def chat_data(demo_dataset, tmp_path_factory) -> tuple[Path, Path, dict]:
    """150 standard-library records with one bad record of each kind among them, prepared with the demo's
    tokenizer (which has no chat template: the default one is added)."""
    root = tmp_path_factory.mktemp("chat")
    lines = [json.dumps(record) for record in stdlib_records(limit=150)]
    for offset, line in enumerate(BAD_LINES.values()):
        lines.insert(10 * offset + 5, line)
    records = root / "chat.jsonl"
    records.write_text("\n".join(lines) + "\n")
    options = PrepareOptions(inputs=[str(records)], out=root / "data", tokenizer=str(demo_dataset.path / "tokenizer"),
                             seq_len=SEQ_LEN, format="chat", val_fraction=0.1, workers=1)  # fmt: skip
    stats = run_prepare(options)
    return records, root / "data", stats


def test_every_bad_record_is_counted_by_reason_and_named_by_line(demo_dataset, tmp_path, caplog):
    lines = [json.dumps(record) for record in stdlib_records(limit=3)] + list(BAD_LINES.values())
    records = tmp_path / "chat.jsonl"
    records.write_text("\n".join(lines) + "\n")
    options = PrepareOptions(inputs=[str(records)], out=tmp_path / "data", tokenizer=str(demo_dataset.path / "tokenizer"),
                             seq_len=SEQ_LEN, format="chat", workers=1)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        stats = run_prepare(options)
    assert stats["bad_records"] == dict.fromkeys(BAD_LINES, 1)
    assert stats["records"] == len(lines) and stats["kept_records"] == 3
    for number, reason in enumerate(BAD_LINES, start=4):
        assert f"{records}:{number}" in caplog.text, reason


def test_shards_are_plain_mds_with_a_loss_mask_and_example_lengths(chat_data):
    _, data, stats = chat_data
    sample = _raw_samples(data, 1)[0]
    assert len(sample["tokens"]) == len(sample["loss_mask"]) == SEQ_LEN == int(sample["doc_lengths"].sum())
    assert len(sample["doc_lengths"]) >= 2 and 0 < int(sample["loss_mask"].sum()) < SEQ_LEN
    assert stats["chat_template"] == "default" and stats["format"] == "chat"
    assert (
        stats["train_examples"] + stats["val_examples"] == stats["kept_records"] >= 140
        and stats["val_examples"]
    )


def _batch(data: Path, micro: int = 4) -> dict[str, torch.Tensor]:
    return next(iter(build_loader(DataConfig(path=str(data), shuffle=False), "train", micro, seed=0)))


def _raw_samples(data: Path, count: int) -> list[dict]:
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(data / "train"), shuffle=False, batch_size=1)
    return [dataset[index] for index in range(count)]


def test_prompt_tokens_get_no_gradient_and_response_tokens_do(chat_data):
    _, data, _ = chat_data
    samples = _raw_samples(data, 4)
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    masks = np.stack([s["loss_mask"] for s in samples]).astype(bool)
    positions = torch.from_numpy(
        np.stack([instruction_targets(s["tokens"], s["loss_mask"], s["doc_lengths"])[1] for s in samples])
    )
    config = load_config("tiny", ["run.dir=x", f"data.path={data}"]).model
    model = build_model(config, 512, SEQ_LEN, "sdpa", seed=0)

    def loss_and_grads(targets: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss when the tokens to predict are `targets` (the inputs stay `tokens`)."""
        labels = [
            instruction_targets(t, s["loss_mask"], s["doc_lengths"])[0]
            for t, s in zip(targets, samples, strict=True)
        ]
        batch = {"input_ids": tokens, "labels": torch.from_numpy(np.stack(labels)), "position_ids": positions}
        model.zero_grad()
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(tokens.numpy())
    other_prompt = np.where(masks, tokens.numpy(), (tokens.numpy() + 1) % 512)  # every prompt token changed
    same_loss, same_grads = loss_and_grads(other_prompt)
    assert torch.equal(same_loss, loss) and all(
        torch.equal(a, b) for a, b in zip(grads, same_grads, strict=True)
    )
    row, column = np.argwhere(masks & (positions.numpy() > 0))[0]
    other_response = tokens.numpy().copy()
    other_response[row, column] = (other_response[row, column] + 1) % 512  # one response token changed
    other_loss, other_grads = loss_and_grads(other_response)
    assert other_loss != loss and any(not torch.equal(a, b) for a, b in zip(grads, other_grads, strict=True))


def _varlen_attention(seen: list[dict]):
    """flash-attn's varlen contract, computed with SDPA on CPU (flash-attn runs only on a GPU): the rows come
    flattened into one, and each example attends causally within `cu_seq_lens_q` alone."""

    def attend(module, query, key, value, attention_mask, **kwargs):
        seen.append({"rows": query.shape[0], **kwargs})
        bounds = kwargs["cu_seq_lens_q"].tolist()
        parts = [
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, enable_gqa=True,
                scale=kwargs.get("scaling"),
            )
            for a, b in pairwise(bounds)
        ]  # fmt: skip
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None

    return attend


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_packed_example_is_computed_as_if_alone(arch, chat_data, monkeypatch):
    """Micro batches of 1, 2 and 4 packed rows, on SDPA, eager and flash-attn's varlen path: the example
    boundaries reach the attention explicitly (a block-causal mask; flattened rows with `cu_seq_lens`), and
    every example's logits equal those of the example run alone."""
    from transformers import AttentionInterface

    _, data, _ = chat_data
    seen: list[dict] = []
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", _varlen_attention(seen))
    size = "tiny" if arch == "gpt2" else "llama-tiny"
    config = load_config(
        "tiny", ["run.dir=x", f"data.path={data}", f"model.arch={arch}", f"model.size={size}"]
    ).model
    models = {attn: build_model(config, 512, SEQ_LEN, attn, seed=0).eval() for attn in ("sdpa", "eager")}
    models["flash_attention_2"] = build_model(config, 512, SEQ_LEN, "sdpa", seed=0).eval()
    models["flash_attention_2"].config._attn_implementation = "flash_attention_2"
    prepare_attention(models["flash_attention_2"])  # as the training engines do
    batch = _batch(data, micro=4)
    starts = [np.flatnonzero(row.numpy() == 0).tolist() + [SEQ_LEN] for row in batch["position_ids"]]
    assert len(starts[0]) >= 3 and sum(len(row) - 1 for row in starts) >= 6  # rows of several examples
    with torch.no_grad():
        alone = [
            [models["sdpa"](input_ids=batch["input_ids"][r : r + 1, a:b]).logits[0] for a, b in pairwise(row)]
            for r, row in enumerate(starts)
        ]  # fmt: skip
        for micro in (1, 2, 4):
            rows = {name: tensor[:micro] for name, tensor in batch.items()}
            for attention, model in models.items():
                inputs = model_inputs(rows, attention=attention)
                if attention == "flash_attention_2":
                    offsets = [r * SEQ_LEN + a for r in range(micro) for a in starts[r][:-1]]
                    assert inputs["cu_seq_lens_q"].tolist() == offsets + [micro * SEQ_LEN]
                    assert (
                        inputs["input_ids"].shape == (1, micro * SEQ_LEN) and "attention_mask" not in inputs
                    )
                else:
                    mask = inputs["attention_mask"]
                    allowed = mask if attention == "sdpa" else mask == 0
                    assert mask.shape == (micro, 1, SEQ_LEN, SEQ_LEN)
                    a, b = starts[0][1], starts[0][2]  # the second example sees itself only
                    assert allowed[0, 0, b - 1, a:b].all() and not allowed[0, 0, b - 1, :a].any()
                seen.clear()
                packed = model(**inputs).logits.reshape(micro, SEQ_LEN, -1)
                if attention == "flash_attention_2":
                    assert seen and all(call["rows"] == 1 and "cu_seq_lens_q" in call for call in seen)
                for r in range(micro):
                    for (a, b), expected in zip(pairwise(starts[r]), alone[r], strict=True):
                        assert torch.allclose(packed[r, a:b], expected, atol=2e-5, rtol=1e-5), (
                            attention,
                            micro,
                            r,
                            a,
                        )
        # Another first example leaves the second one's logits bitwise as they were.
        inputs = model_inputs(batch, attention="sdpa")
        before = models["sdpa"](**inputs).logits[0]
        first = starts[0][1]
        inputs["input_ids"] = inputs["input_ids"].clone()
        inputs["input_ids"][0, :first] = (inputs["input_ids"][0, :first] + 7) % 512
        again = models["sdpa"](**inputs).logits[0]
    second = slice(first, starts[0][2])
    assert torch.equal(again[second], before[second]) and not torch.equal(again[:first], before[:first])


def test_instruction_targets_restart_positions_and_never_predict_across_a_boundary():
    tokens = np.arange(10, 20)
    labels, positions = instruction_targets(
        tokens, np.array([0, 1, 1, 1, 1, 0, 1, 1, 0, 0]), np.array([5, 3, 2])
    )
    assert positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert labels.tolist() == [-100, 11, 12, 13, 14, -100, 16, 17, -100, -100]


# --- runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_runs(chat_data, tmp_path_factory) -> dict[str, Path]:
    """6 steps of global batch 8 on the chat data: 1 rank x micro 8, 1 rank x micro 2 (4 accumulated),
    2 ranks x micro 2 (2 accumulated) with each backend straight, and each of these resumed in a run folder
    of its own from the straight run's step-3 checkpoint (checkpoint.resume=that folder)."""
    _, data, _ = chat_data
    root = tmp_path_factory.mktemp("sft")
    evals = ["eval.every_steps=6", "eval.batches=2"]
    train(root / "1x8", data, nproc=1, overrides=[*SFT, "train.micro_batch_size=8", *evals])
    train(root / "1x2", data, nproc=1, overrides=[*SFT, "train.micro_batch_size=2"])
    for backend in ("fsdp", "deepspeed"):
        common = [*SFT, "train.micro_batch_size=2", f"parallel.backend={backend}"]
        train(root / f"{backend}-2x2", data, nproc=2, overrides=common)
        step_3 = root / f"{backend}-2x2" / "checkpoints" / step_dir_name(3)
        train(root / f"{backend}-resumed", data, nproc=2, overrides=[*common, f"checkpoint.resume={step_3}"])
    return {path.name: path for path in root.iterdir()}


def _grad_norms(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in records if "grad_norm" in r}


def test_loss_and_gradients_do_not_depend_on_micro_batch_or_world_size(sft_runs):
    """Samples hold different numbers of response tokens; the step's loss is one mean over all of them."""
    reference = read_metrics(sft_runs["1x8"])
    for name in ("1x2", "fsdp-2x2", "deepspeed-2x2"):
        records = read_metrics(sft_runs[name])
        for step in range(1, 7):
            assert math.isclose(by_step(records)[step], by_step(reference)[step], rel_tol=1e-5), (name, step)
            assert math.isclose(_grad_norms(records)[step], _grad_norms(reference)[step], rel_tol=1e-4), (
                name,
                step,
            )
    counts = [r["response_tokens"] for r in reference if "loss" in r]
    assert len(set(counts)) > 1 and all(0 < count < 8 * SEQ_LEN for count in counts)
    assert by_step(reference)[6] < by_step(reference)[1]


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_an_sft_run_resumes_bitwise_mid_epoch(backend, sft_runs):
    """From the step-3 checkpoint (mid-epoch), steps 4-6 and the final weights are bitwise the straight run's.
    (A run stopped by train.stop_at_step saves what the straight run saves at that step: the same save;
    stop-and-resume in one folder is tests/test_checkpoint.py's.)"""
    straight, resumed = read_metrics(sft_runs[f"{backend}-2x2"]), read_metrics(sft_runs[f"{backend}-resumed"])
    assert any(r.get("event") == "resume" and r["step"] == 3 for r in resumed)
    expected = by_step(straight)
    assert by_step(resumed) == {step: expected[step] for step in range(4, 7)} and len(expected) == 6
    final = full_state_dict(newest_valid_step(sft_runs[f"{backend}-resumed"] / "checkpoints").step_dir)
    reference = full_state_dict(newest_valid_step(sft_runs[f"{backend}-2x2"] / "checkpoints").step_dir)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], tensor) for name, tensor in reference.items())


def test_validation_is_over_response_tokens_in_training_and_in_eval(sft_runs, capsys):
    logged = [r["val_loss"] for r in read_metrics(sft_runs["1x8"]) if "val_loss" in r]
    assert cli_main(["eval", str(sft_runs["1x8"]), "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isclose(result["val_loss"], logged[-1], rel_tol=1e-5), (result, logged)


def test_the_export_renders_chats_as_training_did_and_generate_chat_answers(
    chat_data, sft_runs, tmp_path, capsys
):
    from transformers import AutoTokenizer

    records, _, _ = chat_data
    out = tmp_path / "hf"
    assert cli_main(["export", str(sft_runs["1x8"]), "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    line = records.read_text().splitlines()[0]
    example = encode(line, "chat", tokenizer, 10**6, RecordCounts(), "first")
    rendered = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True)
    assert rendered == example.tokens.tolist()
    capsys.readouterr()
    args = [
        "generate",
        str(out),
        "--chat",
        "--prompt",
        "What does `glob(pathname)` do?",
        "--max-new-tokens",
        "8",
    ]
    assert cli_main([*args, "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_prompt_completion_records_unpacked_train_on_the_completion_and_its_end(demo_dataset, tmp_path):
    from transformers import AutoTokenizer

    records = [{"prompt": f"what is {i} plus {i}?\n", "completion": f"it is {2 * i}"} for i in range(20)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    options = PrepareOptions(inputs=[str(path)], out=tmp_path / "data", tokenizer=str(demo_dataset.path / "tokenizer"),
                             seq_len=64, format="prompt-completion", packing="none", workers=1)  # fmt: skip
    stats = run_prepare(options)
    assert stats["train_samples"] + stats["val_samples"] == 20 and stats["padding_tokens"] > 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "data" / "tokenizer")
    for sample in _raw_samples(tmp_path / "data", 3):
        assert len(sample["doc_lengths"]) == 2  # the example, then its padding
        trained = tokenizer.decode(sample["tokens"][sample["loss_mask"].astype(bool)])
        assert trained.startswith("it is ") and trained.endswith(tokenizer.eos_token), trained


def test_chat_records_from_a_hugging_face_dataset(demo_dataset, tmp_path):
    import datasets

    records = list(stdlib_records(limit=20))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    options = PrepareOptions(hf_dataset=str(tmp_path / "hf"), out=tmp_path / "data", format="chat",
                             tokenizer=str(demo_dataset.path / "tokenizer"), seq_len=SEQ_LEN, workers=1)  # fmt: skip
    stats = run_prepare(options)
    assert stats["records"] == 20 and stats["kept_records"] + sum(stats["bad_records"].values()) == 20
    assert stats["kept_records"] >= 18 and stats["hf_dataset"] == str(tmp_path / "hf")


def test_instruction_steps_that_do_not_log_read_nothing_from_the_device(chat_data, tmp_path):
    """The response-token count (the loss's divisor, all-reduced before the forward) stays on the device
    too: two ranks, accumulation 2, steps 2-11 convert no tensor to a host value."""
    _, data, _ = chat_data
    extra = [
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=12",
        "checkpoint.every_steps=100",
    ]
    assert host_conversions(tmp_path / "run", data, 2, extra, steps=(2, 11)) == {0: [], 1: []}


POSITIONAL_TEMPLATE = (  # like templates that keep <think> only in the last reply: a turn renders by its position
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
    "{% if m['role'] == 'assistant' %}{% if loop.last %}{{ '<think></think>' }}{% endif %}"
    "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def test_a_template_that_renders_a_turn_by_its_position_is_refused_or_read_from_its_marks(demo_dataset):
    """Two exchanges; the template renders the first reply differently once another turn follows. Without its
    {% generation %} marks the prefixes do not line up and preparing is refused, naming the tokenizer; with them
    the loss mask is exactly the two replies and their end markers, and no token of the second question."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_dataset.path / "tokenizer")
    messages = [{"role": "user", "content": "What is glob?"}, {"role": "assistant", "content": "A module."},
                {"role": "user", "content": "And fnmatch?"}, {"role": "assistant", "content": "Another one."}]  # fmt: skip
    line = json.dumps({"messages": messages})
    tokenizer.chat_template = POSITIONAL_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    with pytest.raises(
        UserError, match=r"renders a conversation's first 2 turns differently.*\{% generation %\}"
    ):
        encode(line, "chat", tokenizer, 10**6, RecordCounts(), "x")
    tokenizer.chat_template = POSITIONAL_TEMPLATE
    example = encode(line, "chat", tokenizer, 10**6, RecordCounts(), "x")
    trained = tokenizer.decode(example.tokens[example.mask.astype(bool)])
    assert trained == "A module." + tokenizer.eos_token + "Another one." + tokenizer.eos_token, trained
    assert example.tokens.tolist() == tokenizer.apply_chat_template(messages, tokenize=True)
