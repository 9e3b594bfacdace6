"""`llm-train compare`: several models on the same validation batches of the same datasets, against the first.

Models are run folders, checkpoint step folders or HF folders (anything `load_any` takes). They must share
one tokenizer: a dataset holds token ids, so two tokenizers cannot both be measured on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.errors import UserError
from trainer.evaluation import datasets_or_default, record_eval, run_dir_of, validation_losses
from trainer.models.generation import check_sampling, sample, tidy_sample
from trainer.models.load import LoadedModel, load_any, load_tokenizer
from trainer.names import unique_names
from trainer.task_eval import run_tasks


@dataclass
class ModelResult:
    name: str
    path: str
    step: int | None
    datasets: dict[str, dict[str, float]]  # NAME -> val_loss, val_ppl, d_loss, d_ppl_pct (vs the baseline)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # harness TASK -> METRIC -> value


@dataclass
class Comparison:
    baseline: str
    batches: int
    datasets: dict[str, str]  # NAME -> path
    models: list[ModelResult]
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"prompt", "outputs": {model: text}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskSettings:
    """lm-evaluation-harness tasks to run on every model (`compare --tasks`)."""

    tasks: list[str]
    task_dir: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class SampleSettings:
    prompts: list[str]
    max_new_tokens: int = 64
    temperature: float = 0.8
    seed: int = 0


def tokenizer_fingerprint(loaded: LoadedModel) -> str | None:
    """What decides the token ids: vocabulary, merges, normalizer, pre-tokenizer, added tokens."""
    if loaded.tokenizer_dir is None:
        return None
    tokenizer = load_tokenizer(loaded)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        spec: Any = sorted(tokenizer.get_vocab().items())
    else:
        full = json.loads(backend.to_str())
        spec = {key: full.get(key) for key in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _check_one_tokenizer(names: list[str], loaded: list[LoadedModel]) -> None:
    prints = [tokenizer_fingerprint(model) for model in loaded]
    odd = [name for name, fingerprint in zip(names, prints, strict=True) if fingerprint != prints[0]]
    if odd:
        raise UserError(
            f"{', '.join(odd)}: tokenizer differs from (or is missing next to) the baseline {names[0]}'s; "
            "compare only models that share a tokenizer (evaluate the others with `llm-train eval`)"
        )


def _with_differences(results: list[dict[str, dict[str, float]]]) -> list[dict[str, dict[str, float]]]:
    """d_loss = val_loss - baseline's (absolute), d_ppl_pct = how much higher val_ppl is, in percent."""
    base = results[0]
    return [
        {
            name: {
                **numbers,
                "d_loss": numbers["val_loss"] - base[name]["val_loss"],
                "d_ppl_pct": 100.0 * (numbers["val_ppl"] / base[name]["val_ppl"] - 1.0),
            }
            for name, numbers in result.items()
        }
        for result in results
    ]


def compare(
    paths: list[str], data: list[str] | None, batches: int, sampling: SampleSettings | None = None,
    tasks: TaskSettings | None = None, trust_remote_code: bool = False,
) -> Comparison:  # fmt: skip
    """Load every model (all stay in memory), check the tokenizers, evaluate, then sample each prompt."""
    if len(paths) < 2:
        raise UserError(f"compare needs at least two models, got {len(paths)}; name a baseline and another")
    if sampling is not None:
        check_sampling(sampling.max_new_tokens, sampling.temperature)
    names = unique_names(paths)
    loaded = [load_any(path, trust_remote_code) for path in paths]
    _check_one_tokenizer(names, loaded)
    data_paths = datasets_or_default(data, loaded[0].data_path, paths[0])
    measured = [validation_losses(model.model, data_paths, batches) for model in loaded]
    for path, model, numbers in zip(paths, loaded, measured, strict=True):
        if (run_dir := run_dir_of(path)) is not None:  # the same numbers in the run's metrics.jsonl and W&B
            record_eval(run_dir, model.step, numbers)
    results = _with_differences(measured)
    comparison = Comparison(
        baseline=names[0],
        batches=batches,
        datasets=dict(zip(unique_names(data_paths), data_paths, strict=True)),
        models=[
            ModelResult(name, str(path), model.step, result)
            for name, path, model, result in zip(names, paths, loaded, results, strict=True)
        ],
    )
    for result, path, model in (
        zip(comparison.models, paths, loaded, strict=True) if tasks is not None else []
    ):
        result.tasks = run_tasks(model.model, load_tokenizer(model), tasks.tasks, tasks.task_dir, tasks.limit)
        if (run_dir := run_dir_of(path)) is not None:
            record_eval(run_dir, model.step, result.tasks, kind="task")
    for prompt in sampling.prompts if sampling is not None else []:
        outputs = {
            name: sample(
                model.model,
                load_tokenizer(model),
                prompt,
                sampling.max_new_tokens,
                sampling.temperature,
                sampling.seed,
            )
            for name, model in zip(names, loaded, strict=True)
        }
        comparison.samples.append({"prompt": prompt, "outputs": outputs})
    return comparison


def _cells(model: ModelResult, dataset: str, baseline: bool) -> list[str]:
    numbers = model.datasets[dataset]
    if baseline:
        return [f"{numbers['val_loss']:.6f}", f"{numbers['val_ppl']:.3f}", "-", "-"]
    return [
        f"{numbers['val_loss']:.6f}",
        f"{numbers['val_ppl']:.3f}",
        f"{numbers['d_loss']:+.6f}",
        f"{numbers['d_ppl_pct']:+.2f}%",
    ]


def format_table(comparison: Comparison) -> str:
    """One row per model; per dataset: val_loss, val_ppl and the differences to the first row."""
    header = ["model", "step"]
    groups = [("", 2)]
    for dataset in comparison.datasets:
        header += ["val_loss", "val_ppl", "d_loss", "d_ppl"]
        groups.append((dataset, 4))
    rows = [
        [model.name, "-" if model.step is None else str(model.step)]
        + [cell for dataset in comparison.datasets for cell in _cells(model, dataset, index == 0)]
        for index, model in enumerate(comparison.models)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        aligned = (
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(aligned)

    group_line, start = [], 0
    for name, span in groups:
        span_width = sum(widths[start : start + span]) + 2 * (span - 1)
        group_line.append(f"{name} ".ljust(span_width, "-") if name else " " * span_width)
        start += span
    title = (
        f"val loss on {comparison.batches} batches of 8 sequences per dataset; "
        f"d_loss and d_ppl are relative to the baseline {comparison.baseline}"
    )
    return "\n".join([title, "  ".join(group_line).rstrip(), line(header), *(line(row) for row in rows)])


def format_tasks(comparison: Comparison) -> str:
    """One row per model, one column per task metric (lm-evaluation-harness)."""
    columns = sorted(
        {(task, metric) for model in comparison.models for task, m in model.tasks.items() for metric in m}
    )
    header = ["model", *(f"{task} {metric}" for task, metric in columns)]
    rows = [[model.name, *(f"{model.tasks.get(task, {}).get(metric, float('nan')):.4f}" for task, metric in columns)]
            for model in comparison.models]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def format_samples(comparison: Comparison) -> str:
    """One block per prompt, each model's text (prompt included) labelled with the model's name."""
    blocks = []
    for item in comparison.samples:
        lines = [f"prompt {item['prompt']!r}"]
        for name, text in item["outputs"].items():
            lines.append(f"  [{name}]")
            lines += [f"    {line}" for line in tidy_sample(item["prompt"], text).splitlines()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
