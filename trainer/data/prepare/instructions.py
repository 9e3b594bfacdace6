"""Instruction data: prompt/response records -> tokens and a loss mask (response tokens only).

Formats (`--format`):
- `chat`: `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`, rendered with
  the tokenizer's chat template (or `DEFAULT_CHAT_TEMPLATE` for a tokenizer without one, which is then
  saved with the tokenizer so that export and generate render the same way); every assistant turn is a
  response, its end-of-turn marker included.
- `prompt-completion`: `{"prompt": "...", "completion": "..."}`: the prompt, then the completion and the
  end-of-text token, which are the response.

The text is rendered once and tokenized once (with character offsets), and a token is a response token
when it starts inside a response's characters: the tokens are exactly those of the rendered text, which
is what `apply_chat_template` gives at inference. A reply's characters are those its template marks with
{% generation %} when it does; else they lie between the render of the turns before it (with the generation
prompt) and that of the turns up to it, and both renders must be prefixes of the whole conversation's: a
template that renders a turn differently by its position (dropping earlier turns' <think> blocks) is refused.

A record that cannot be used is counted by reason (`BAD_REASONS`) and named by file:line in a warning,
never dropped silently. A response cut at `seq_len` is kept (counted as `truncated`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.data.prepare.options import FORMATS, PACKING
from trainer.errors import UserError

__all__ = ["FORMATS", "PACKING", "Example", "RecordCounts", "encode", "ensure_chat_template", "render"]
ROLES = ("system", "user", "assistant")
BAD_REASONS = {
    "invalid_json": "not a JSON object",
    "missing_field": "a field the format needs is missing or not text",
    "bad_role": "a message's role is not system, user or assistant",
    "no_response": "no assistant message",
    "empty_response": "an empty response",
    "prompt_too_long": "the prompt fills seq_len: no response token fits",
}
GENERATION_MARK = "generation %}"  # {% generation %} or {%- generation %}: the template marks its replies
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""For tokenizers without a chat template: a role line before each message, the end-of-text token after
each assistant message (it is trained, so the model learns to stop)."""


@dataclass
class Example:
    tokens: np.ndarray
    mask: np.ndarray
    """1 where the token is a response token (trained on), else 0."""
    fraction: float
    """Where the record's hash falls in [0, 1): below --val-fraction it is a val example."""


@dataclass
class RecordCounts:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    bad: Counter = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=dict)
    """file:line of the first few records of each bad reason."""

    def reject(self, reason: str, where: str) -> None:
        self.bad[reason] += 1
        examples = self.where.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(where)

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "kept_records": self.kept,
            "truncated_records": self.truncated,
            "bad_records": {reason: self.bad[reason] for reason in BAD_REASONS if self.bad[reason]},
        }


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template the default one; True when it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def read_records(source: Any) -> Iterator[tuple[str, str]]:
    """(where, JSON text) of every record: each non-blank line of the JSONL files in order (where = file:line),
    or each row of a Hugging Face dataset (where = its row number)."""
    files = getattr(source, "files", None)
    if files is None:
        for index, row in enumerate(source.dataset):
            yield f"--hf-dataset {source.spec} row {index}", json.dumps(row)
        return
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{path}:{number}", line


def render(record: Any, fmt: str, tokenizer: Any) -> tuple[str, list[tuple[int, int]]] | str:
    """The record's text and its responses' character spans, or the reason it is bad."""
    if not isinstance(record, dict):
        return "invalid_json"
    if fmt == "prompt-completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return "missing_field"
        if not completion.strip():
            return "empty_response"
        text = prompt + completion + tokenizer.eos_token
        return text, [(len(prompt), len(text))]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing_field"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return "missing_field"
        if message.get("role") not in ROLES:
            return "bad_role"
    if not any(message["role"] == "assistant" for message in messages):
        return "no_response"
    if any(message["role"] == "assistant" and not message["content"].strip() for message in messages):
        return "empty_response"
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if GENERATION_MARK in (tokenizer.chat_template or ""):
        return text, _marked_spans(messages, tokenizer, text)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(after)):
            raise UserError(inconsistent_template(tokenizer, index))
        spans.append((len(before), len(after)))
    return text, spans


def inconsistent_template(tokenizer: Any, index: int) -> str:
    return (
        f"the chat template of tokenizer '{tokenizer.name_or_path}' renders a conversation's first {index + 1} "
        "turns differently once later turns follow (as templates that drop earlier turns' <think> blocks do), "
        "so the replies cannot be found by rendering prefixes and the next turns' tokens would be trained on; "
        "mark the assistant content in the template with {% generation %}...{% endgeneration %} "
        "(transformers' assistant mask), or prepare with a template that renders every turn the same wherever "
        "it stands"
    )


def _marked_spans(messages: list[dict[str, str]], tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """The replies' character spans from the template's own {% generation %} marks (transformers' assistant
    mask over the tokens of `text`): right however the template renders a turn by its position."""
    marked = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) != len(marked["assistant_masks"]):
        raise UserError(inconsistent_template(tokenizer, len(messages) - 1))
    spans: list[tuple[int, int]] = []
    for inside, (start, end) in zip(marked["assistant_masks"], offsets, strict=True):
        if not inside:
            continue
        if spans and spans[-1][1] >= start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def encode(
    line: str, fmt: str, tokenizer: Any, seq_len: int, counts: RecordCounts, where: str
) -> Example | None:
    """One JSONL line as an Example of at most `seq_len` tokens, or None (counted by reason)."""
    counts.records += 1
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        counts.reject("invalid_json", where)
        return None
    rendered = render(record, fmt, tokenizer)
    if isinstance(rendered, str):
        counts.reject(rendered, where)
        return None
    text, spans = rendered
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens = np.asarray(encoded["input_ids"], dtype=np.int64)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(tokens), dtype=np.uint8)
    for begin, end in spans:
        mask[(starts >= begin) & (starts < end)] = 1
    if not mask.any():
        counts.reject("empty_response", where)
        return None
    if int(np.argmax(mask)) >= seq_len:
        counts.reject("prompt_too_long", where)
        return None
    if len(tokens) > seq_len:
        counts.truncated += 1
        tokens, mask = tokens[:seq_len], mask[:seq_len]
    counts.kept += 1
    digest = hashlib.blake2b(line.strip().encode(), digest_size=8).digest()
    return Example(tokens, mask, int.from_bytes(digest, "big") / 2**64)


def record_texts(source: Any, fmt: str) -> Iterator[str]:
    """The text of every usable record's fields, for training a BPE tokenizer on instruction data."""
    for _, line in read_records(source):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if fmt == "prompt-completion":
            yield from (
                value for key in ("prompt", "completion") if isinstance(value := record.get(key), str)
            )
        elif isinstance(record.get("messages"), list):
            yield from (
                m["content"]
                for m in record["messages"]
                if isinstance(m, dict) and isinstance(m.get("content"), str)
            )
