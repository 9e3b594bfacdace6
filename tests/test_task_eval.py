"""`llm-train eval --tasks`: lm-evaluation-harness on a local multiple-choice task, recorded like eval lines."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from trainer_runs import read_metrics, train

from launcher.cli import main as cli_main
from trainer.data.prepare import PrepareOptions, run_prepare

NOUNS = ["apple", "river", "tomato", "grass", "sky", "lemon", "cherry", "leaf", "ocean", "banana", "ruby", "frog",
         "sea", "corn", "blood", "lime", "lake", "sun", "rose", "mint"]  # fmt: skip
COLORS = ["red", "green", "blue", "yellow"]
TASK = "local_colors"


def _answers() -> dict[str, int]:
    rng = random.Random(3)
    return {noun: rng.randrange(len(COLORS)) for noun in NOUNS}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A 4-way multiple-choice task in the harness's YAML format, its data a local JSONL file."""
    folder = tmp_path_factory.mktemp("tasks")
    items = [{"question": f"the color of the {noun} is", "choices": COLORS, "answer": answer}
             for noun, answer in _answers().items()]  # fmt: skip
    (folder / "colors.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / "colors.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'colors.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def trained_on_the_answers(demo_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """An untrained run (0 steps) and one trained on sentences stating the task's answers."""
    root = tmp_path_factory.mktemp("colors")
    rng = random.Random(0)
    facts = [f"the color of the {noun} is {COLORS[answer]}.\n" for noun, answer in _answers().items()]
    for index in range(12):
        lines = facts * 4
        rng.shuffle(lines)
        (root / f"facts{index}.txt").write_text("".join(lines))
    data = root / "data"
    run_prepare(PrepareOptions(inputs=[str(root / "facts*.txt")], out=data, dedupe=False,
                               tokenizer=str(demo_dataset.path / "tokenizer"), seq_len=64, workers=1))  # fmt: skip
    common = ["train.global_batch_size=16", "train.micro_batch_size=16", "checkpoint.every_steps=1000"]
    untrained = train(
        root / "untrained",
        data,
        nproc=1,
        overrides=[*common, "train.max_steps=1", "train.lr=1e-9", "train.min_lr=0"],
    )
    assert untrained
    train(
        root / "trained",
        data,
        nproc=1,
        overrides=[*common, "train.max_steps=150", "train.lr=3e-3", "train.min_lr=3e-4"],
    )
    return root / "untrained", root / "trained"


def test_eval_tasks_scores_chance_untrained_and_well_above_it_trained_and_compare_puts_them_side_by_side(
    task_dir, trained_on_the_answers, capsys
):
    """`eval --tasks` of the trained run records its score like an eval line; `compare` of both runs scores
    them in one table with the same harness: chance for the untrained one, the eval's score for the trained."""
    untrained, trained = trained_on_the_answers
    capsys.readouterr()
    assert cli_main(["eval", str(trained), "--tasks", TASK, "--task-dir", str(task_dir)]) == 0
    output = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    score = output["tasks"][TASK]["acc"]
    lines = [r for r in read_metrics(trained) if r.get("task") == TASK]
    assert lines and lines[-1]["acc"] == score and lines[-1]["source"] == "llm-train eval"
    args = [
        "compare",
        str(untrained),
        str(trained),
        "--tasks",
        TASK,
        "--task-dir",
        str(task_dir),
        "--batches",
        "1",
    ]
    assert cli_main([*args, "--json"]) == 0
    models = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"]
    assert [model["name"] for model in models] == ["untrained", "trained"]
    scores = [model["tasks"][TASK]["acc"] for model in models]
    assert scores[0] <= 0.5 and scores[1] == score >= 0.8, scores


def test_an_unknown_task_is_a_user_error_naming_it(task_dir, trained_on_the_answers, capsys):
    untrained, _ = trained_on_the_answers
    assert cli_main(["eval", str(untrained), "--tasks", "no_such_task", "--task-dir", str(task_dir)]) == 2
    assert "--tasks: no_such_task" in capsys.readouterr().err
