"""The exported model's README.md: a Hugging Face model card written from what the run recorded.

YAML front matter (license, language, tags, datasets, metrics) as the Hub reads it, then: the architecture and
parameter count, the data (from the dataset's prepare.json: inputs, documents, tokens, de-duplication, tokenizer),
the training (steps, tokens seen, batch, precision, backend), the final validation perplexity and every
`eval --tasks` result (from metrics.jsonl), the hardware and the goodput, and how to load the folder. A field the
run did not record is left out, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from trainer.resilience.goodput import summarize
from trainer.run_records import read_records

MAX_INPUTS_LISTED = 10


def run_folder(path: Path) -> Path | None:
    """The run a RUN_DIR or a checkpoint step folder belongs to; None for an exported folder."""
    path = Path(path)
    if (path / "metrics.jsonl").is_file():
        return path
    if path.parent.name == "checkpoints" and (path.parent.parent / "metrics.jsonl").is_file():
        return path.parent.parent
    return None


def _prepared(data_path: str | None) -> dict[str, Any]:
    try:
        return json.loads((Path(data_path) / "prepare.json").read_text()) if data_path else {}
    except (OSError, ValueError):
        return {}


def model_card(
    model: Any, run_dir: Path | None, step: int | None, data_path: str | None, dtype: str, license: str,
    language: str,
) -> str:  # fmt: skip
    records = read_records(run_dir) if run_dir else []
    start = next((r for r in records if r.get("event") == "start"), {})
    trained = [r for r in records if "loss" in r and (step is None or r["step"] <= step)]
    validation = [r for r in records if "val_ppl" in r and (step is None or r["step"] <= step)]
    tasks: dict[str, dict[str, float]] = {}
    for record in records:
        if "task" in record:
            tasks[record["task"]] = {k: v for k, v in record.items() if isinstance(v, float) and k != "time"}
    prepared = _prepared(data_path)
    config = model.config
    chat = bool(prepared.get("chat_template")) or prepared.get("format") not in (None, "text")
    front = {
        "license": license,
        "language": [language],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["llm-training", config.model_type, *(["instruction-tuned"] if chat else [])],
        "datasets": [prepared.get("hf_dataset") or Path(data_path or "data").name],
        "metrics": ["perplexity", *sorted({name for scores in tasks.values() for name in scores})],
    }
    params = sum(p.numel() for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {run_dir.name if run_dir else 'model'}", "",
             "Trained with llm-training and exported by `llm-train export`.", "",
             "## Model", "",
             f"- architecture: `{type(model).__name__}` (`{config.model_type}`), {layers} layers, width {width}",
             f"- parameters: {params:,} ({params / 1e6:.1f}M)",
             f"- context: {getattr(config, 'max_position_embeddings', None) or getattr(config, 'n_positions', '?')} positions",
             f"- weights: {dtype}, safetensors"]  # fmt: skip
    if prepared:
        inputs = prepared.get("inputs") or []
        shown = ", ".join(f"`{Path(i).name}`" for i in inputs[:MAX_INPUTS_LISTED])
        more = f" and {len(inputs) - MAX_INPUTS_LISTED} more" if len(inputs) > MAX_INPUTS_LISTED else ""
        lines += ["", "## Data", "",
                  f"- inputs: {prepared.get('hf_dataset') or (shown + more) or 'not recorded'}",
                  f"- documents: {prepared.get('documents', prepared.get('records', '?'))} read, "
                  f"{prepared.get('kept_documents', prepared.get('kept_records', '?'))} kept, "
                  f"{prepared.get('duplicates', 0)} exact duplicates removed",
                  f"- tokens: {prepared.get('tokens', '?'):,}" if isinstance(prepared.get("tokens"), int) else "- tokens: ?",
                  f"- tokenizer: {prepared.get('tokenizer', '?')}, sequence length {prepared.get('seq_len', '?')}, "
                  f"format {prepared.get('format', 'text')}"]  # fmt: skip
    if trained:
        last = trained[-1]
        lines += ["", "## Training", "", f"- steps: {last['step']}, tokens seen: {last.get('tokens', 0):,}"]
        if start:
            lines.append(f"- {start.get('world_size')} ranks on {start.get('nodes', '?')} node(s), "
                         f"{start.get('device', 'device not recorded')}, {start.get('backend')} backend, "
                         f"accumulation {start.get('grad_accum')}")  # fmt: skip
        goodput = summarize(run_dir) if run_dir else None
        if goodput:
            lines.append(f"- goodput: {goodput.get('goodput_pct', 0):.1f}% of "
                         f"{goodput.get('allocated_s', 0) / 3600:.2f} allocated hours")  # fmt: skip
    if validation or tasks:
        lines += ["", "## Evaluation", ""]
        if validation:
            final = validation[-1]
            lines.append(
                f"- validation perplexity {final['val_ppl']:.3f} (loss {final['val_loss']:.4f}) at step {final['step']}"
            )
        lines += [f"- {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items()))
                  for task, scores in sorted(tasks.items())]  # fmt: skip
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("PATH")', 'model = AutoModelForCausalLM.from_pretrained("PATH", dtype="auto")',
              'output = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=32)',
              "print(tokenizer.decode(output[0]))", "```", "",
              "Every file's SHA-256 is in `checksums.sha256` (`sha256sum -c checksums.sha256`).", ""]  # fmt: skip
    return "\n".join(lines)
