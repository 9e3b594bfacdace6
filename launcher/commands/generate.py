"""`llm-train generate HF_DIR|RUN_DIR --prompt TEXT`: sample text from a trained model."""

from __future__ import annotations

import argparse
import sys

from trainer.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample text from an HF folder or a run's newest checkpoint"
    )
    parser.add_argument("model", help="HF folder, RUN_DIR or checkpoint step folder")
    parser.add_argument("--prompt", help="the text to continue; with --chat, the user's message")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="treat --prompt as a user message and answer it with the chat template the model was trained "
        "with; without --prompt on a terminal, a conversation (an empty line ends it)",
    )
    add_sampling_arguments(parser)
    add_trust_argument(parser)
    parser.set_defaults(handler=run)


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """--trust-remote-code, for every command that loads a model (a folder's own code never runs otherwise)."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a model that ships its own code (an auto_map in its config) run it; only for models you trust",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --seed; shared with `compare --prompt`."""
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.chat:
        return chat(args)
    if args.prompt is None:
        raise UserError("generate: --prompt is required (or --chat for a conversation on a terminal)")
    print(
        generate_text(
            args.model, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.trust_remote_code
        )
    )
    return 0


def chat(args: argparse.Namespace) -> int:
    """One answer to --prompt, or a conversation read from the terminal, each reply with the whole history."""
    from trainer.models.generation import chat_reply, check_sampling
    from trainer.models.load import load_any, load_tokenizer

    check_sampling(args.max_new_tokens, args.temperature)
    if args.prompt is None and not sys.stdin.isatty():
        raise UserError("generate --chat: give --prompt TEXT (stdin is not a terminal for a conversation)")
    loaded = load_any(args.model, args.trust_remote_code)
    tokenizer = load_tokenizer(loaded)
    messages: list[dict[str, str]] = []
    while True:
        text = args.prompt if args.prompt is not None else input("you> ")
        if not text.strip():
            return 0
        messages.append({"role": "user", "content": text})
        reply = chat_reply(
            loaded.model, tokenizer, messages, args.max_new_tokens, args.temperature, args.seed
        )
        messages.append({"role": "assistant", "content": reply})
        print(reply if args.prompt is not None else f"model> {reply}")
        if args.prompt is not None:
            return 0


def generate_text(
    model_path: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    trust_remote_code: bool = False,
) -> str:
    from trainer.models.generation import check_sampling, sample, tidy_sample
    from trainer.models.load import load_any, load_tokenizer

    check_sampling(max_new_tokens, temperature)
    loaded = load_any(model_path, trust_remote_code)
    text = sample(loaded.model, load_tokenizer(loaded), prompt, max_new_tokens, temperature, seed)
    return tidy_sample(prompt, text)
