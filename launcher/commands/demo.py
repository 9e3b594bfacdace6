"""`llm-train demo`: the embedded default run, end to end on this machine.

Prepares the Python standard library source as a corpus (bpe:4096, seq-len 256), trains the tiny
preset with 2 local processes, evaluates, exports a Hugging Face folder, generates a sample and
prints a summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from launcher.local import launch_local
from trainer.errors import UserError

# Measured on a 2-core machine: one tiny-preset step (16 x 256 tokens) with 2 processes.
SECONDS_PER_STEP = 0.6
NPROC = 2
SAMPLE_PROMPT = "def "


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="prepare the demo corpus, train a tiny model, evaluate, export, generate"
    )
    parser.add_argument("--out", default="demo", help="output folder (data/ and run/ inside)")
    parser.add_argument(
        "--minutes", type=float, default=3.0, help="approximate training time on a 2-core CPU"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.minutes <= 0:
        raise UserError(f"--minutes {args.minutes} must be positive")
    from trainer.data.prepare import PrepareOptions, run_prepare, stdlib_corpus_glob

    out = Path(args.out)
    data_dir, run_dir, model_dir = out / "data", out / "run", out / "model"
    if (data_dir / "prepare.json").is_file():
        print(f"demo: reusing the prepared corpus in {data_dir}")
    else:
        stats = run_prepare(
            PrepareOptions(
                inputs=stdlib_corpus_glob(), out=data_dir, tokenizer="bpe:4096", seq_len=256, workers=NPROC
            )
        )
        print("demo: prepared the Python standard library corpus: " + json.dumps(stats))
    for previous in (run_dir, model_dir):
        if previous.exists():
            shutil.rmtree(previous)  # the demo's own previous run; every demo starts fresh
    steps = max(20, int(args.minutes * 60 / SECONDS_PER_STEP))
    overrides = [
        f"run.dir={run_dir}",
        f"data.path={data_dir}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 15)}",
        f"eval.every_steps={max(1, steps // 4)}",
        f"checkpoint.every_steps={steps}",
        "log.wandb=offline",
    ]
    code = launch_local(NPROC, ["tiny", *overrides])
    if code != 0:
        return code
    from launcher.commands.generate import generate_text
    from trainer.models.export import export

    export(run_dir, model_dir)
    sample = generate_text(str(model_dir), SAMPLE_PROMPT, max_new_tokens=48, temperature=0.8, seed=0)
    print(summary(run_dir / "metrics.jsonl"))
    print(f"  exported model    {model_dir}")
    print("  sample            " + sample.replace("\n", "\n                    "))
    return 0


def summary(metrics_path: Path) -> str:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in train[1:]] or [train[-1]["tokens_per_s"]]
    first, last = evals[0], evals[-1]
    return "\n".join(
        [
            "demo summary",
            f"  steps             {train[-1]['step']}",
            f"  tokens            {train[-1]['tokens']}",
            f"  tokens/s          {sum(speeds) / len(speeds):.0f}",
            f"  val loss          {first['val_loss']:.3f} (step {first['step']}) -> {last['val_loss']:.3f} (step {last['step']})",
            f"  val perplexity    {first['val_ppl']:.1f} -> {last['val_ppl']:.1f}",
            f"  metrics           {metrics_path}",
        ]
    )
