"""Text from a loaded model, seeded (`llm-train generate`, `compare --prompt`, the demo)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.errors import UserError
from trainer.models.pretrained import context_length


def check_sampling(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 1 or temperature < 0:
        raise UserError(
            f"--max-new-tokens {max_new_tokens} must be >= 1 and --temperature {temperature} >= 0"
        )


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> str:
    """The prompt and its continuation; greedy at temperature 0, else the same text for the same seed."""
    check_sampling(max_new_tokens, temperature)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    output = _generate(model, tokenizer, input_ids, max_new_tokens, temperature, seed)
    return tokenizer.decode(output[0], skip_special_tokens=True)


@torch.no_grad()
def chat_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> str:
    """The assistant's next message, rendered with the tokenizer's chat template (the one the model was
    trained with), up to its end-of-turn token."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the model's tokenizer has no chat template: fine-tune it on `prepare --format chat` data, "
            "or generate without --chat"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stop = {"eos_token_id": tokenizer.eos_token_id}
    output = _generate(model, tokenizer, input_ids, max_new_tokens, temperature, seed, **stop)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    **stop: int,
) -> torch.Tensor:
    room = context_length(model.config) - input_ids.shape[1]
    if room < 1:
        raise UserError(
            f"--prompt is {input_ids.shape[1]} tokens, the model's context is {context_length(model.config)}"
        )
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    return model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=min(max_new_tokens, room),
        pad_token_id=tokenizer.eos_token_id,
        **stop,
        **sampling,
    )


def tidy_sample(prompt: str, text: str) -> str:
    """A sample for the terminal: runs of blank lines made one (a tiny model emits many) and trailing blank
    lines removed, and a note instead of nothing when the model added no text to the prompt."""
    lines, previous_blank = [], False
    for line in text.rstrip().splitlines():
        blank = not line.strip()
        if not (blank and previous_blank):
            lines.append("" if blank else line)
        previous_blank = blank
    tidy = "\n".join(lines)
    if not tidy.strip() or tidy.strip() == prompt.strip():
        return f"{prompt.rstrip()}\n(no text generated: the model ended the sample at once)"
    return tidy
