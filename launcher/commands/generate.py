"""`llm-train generate HF_DIR|RUN_DIR --prompt TEXT`: sample text from a trained model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample text from an HF folder or a run's newest checkpoint"
    )
    parser.add_argument("model", help="HF folder, RUN_DIR or checkpoint step folder")
    parser.add_argument("--prompt", required=True)
    add_sampling_arguments(parser)
    parser.set_defaults(handler=run)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --seed; shared with `compare --prompt`."""
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    print(generate_text(args.model, args.prompt, args.max_new_tokens, args.temperature, args.seed))
    return 0


def generate_text(model_path: str, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    from trainer.models.generation import check_sampling, sample, tidy_sample
    from trainer.models.load import load_any, load_tokenizer

    check_sampling(max_new_tokens, temperature)
    loaded = load_any(model_path)
    text = sample(loaded.model, load_tokenizer(loaded), prompt, max_new_tokens, temperature, seed)
    return tidy_sample(prompt, text)
