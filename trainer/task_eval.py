"""Task metrics beside perplexity: EleutherAI's lm-evaluation-harness on a loaded model (`eval --tasks`).

The model and tokenizer are handed to the harness as they are loaded (a run's or checkpoint's model is
"exported on the fly": nothing is written). Tasks are the harness's own (those that download their data work
where the cluster has the network or a local Hugging Face cache) or YAML task files in `--task-dir`.
"""

from __future__ import annotations

import logging
from typing import Any

from trainer.errors import UserError
from trainer.models.pretrained import context_length

log = logging.getLogger(__name__)


def parse_tasks(text: str) -> list[str]:
    tasks = [task.strip() for task in text.split(",") if task.strip()]
    if not tasks:
        raise UserError(
            f"--tasks {text!r}: give task names separated by commas, e.g. --tasks hellaswag,arc_easy"
        )
    return tasks


def run_tasks(
    model: Any, tokenizer: Any, tasks: list[str], task_dir: str | None = None, limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """{task: {metric: value}} (metric names without the harness's ",none" filter suffix)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise UserError(
            f"--tasks needs EleutherAI's lm-evaluation-harness ({error}); pip install 'llm-training[eval]'"
        ) from error
    manager = TaskManager(include_path=task_dir) if task_dir else TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = (
            f" or in --task-dir {task_dir}" if task_dir else "; give --task-dir DIR for your own task YAMLs"
        )
        raise UserError(f"--tasks: {', '.join(unknown)} not among the harness's tasks{where}")
    harness_model = HFLM(
        pretrained=model.eval(),
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=context_length(model.config),
    )
    output = simple_evaluate(
        model=harness_model,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    return {task: _metrics(output["results"].get(task, {})) for task in tasks}


def _metrics(results: dict[str, Any]) -> dict[str, float]:
    metrics = {}
    for key, value in results.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in key:
            metrics[key.split(",", 1)[0]] = float(value)
    return metrics
