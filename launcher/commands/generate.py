"""`llm-train generate HF_DIR|RUN_DIR --prompt TEXT`: sample text from a trained model."""

from __future__ import annotations

import argparse

from trainer.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample text from an HF folder or a run's newest checkpoint"
    )
    parser.add_argument("model", help="HF folder, RUN_DIR or checkpoint step folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print(generate_text(args.model, args.prompt, args.max_new_tokens, args.temperature, args.seed))
    return 0


def generate_text(model_path: str, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    import torch

    from trainer.hf_export import load_any, load_tokenizer

    if max_new_tokens < 1 or temperature < 0:
        raise UserError(
            f"--max-new-tokens {max_new_tokens} must be >= 1 and --temperature {temperature} >= 0"
        )
    loaded = load_any(model_path)
    tokenizer = load_tokenizer(loaded)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    room = loaded.model.config.n_positions - input_ids.shape[1]
    if room < 1:
        raise UserError(
            f"--prompt is {input_ids.shape[1]} tokens, the model's context is {loaded.model.config.n_positions}"
        )
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    output = loaded.model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=min(max_new_tokens, room),
        pad_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    return tokenizer.decode(output[0], skip_special_tokens=True)
