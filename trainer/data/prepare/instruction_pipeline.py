"""`llm-train prepare --format chat|prompt-completion`: JSONL records -> packed, loss-masked MDS shards.

`prepare.json` holds what the text pipeline's does where it applies (`seq_len`, `vocab_size`, `eos_id`,
`dtype`, `tokenizer`, `inputs`, `train_samples`, `val_samples`, `tokens`, `val_fraction`, `compression`),
and: `format`, `packing`, `records` (non-blank lines read), `kept_records`, `truncated_records`,
`bad_records` (count per reason), `train_examples`, `val_examples`, `response_tokens`, `padding_tokens`,
`chat_template` (`tokenizer` when the tokenizer had one, `default` when ours was added).
Records are tokenized in this process, and held in memory until they are packed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainer.data.prepare.instruction_pack import val_examples, write_instruction_splits
from trainer.data.prepare.instructions import (
    BAD_REASONS,
    Example,
    RecordCounts,
    encode,
    ensure_chat_template,
    read_records,
    record_texts,
)
from trainer.data.prepare.options import PrepareOptions, bpe_vocab_size
from trainer.data.prepare.output import common_stats
from trainer.data.prepare.tokenizer import save_tokenizer, train_bpe
from trainer.errors import UserError

log = logging.getLogger(__name__)


def prepare_instructions(temp: Path, opts: PrepareOptions, source: Any, pretrained: Any) -> dict[str, Any]:
    """Write the tokenizer and the train/val splits of the instruction records of `source` (JSONL files or a
    Hugging Face dataset, see `read_records`) into `temp`; return the stats."""
    assert opts.seq_len is not None and opts.tokenizer is not None
    tokenizer = pretrained
    if tokenizer is None:
        vocab = bpe_vocab_size(opts.tokenizer)
        assert vocab is not None
        log.info("training a byte-level BPE with %d tokens on the records' text", vocab)
        tokenizer = train_bpe(vocab, record_texts(source, opts.format))
    template = "tokenizer"
    if opts.format == "chat" and ensure_chat_template(tokenizer):
        template = "default"
        log.info("the tokenizer has no chat template: using the default one (saved with the tokenizer)")
    info = save_tokenizer(tokenizer, temp / "tokenizer")
    counts = RecordCounts()
    examples: list[Example] = []
    for where, line in read_records(source):
        example = encode(line, opts.format, tokenizer, opts.seq_len, counts, where)
        if example is not None:
            examples.append(example)
    for reason, count in counts.bad.items():
        log.warning(
            "skipped %d records: %s (%s%s)", count, BAD_REASONS[reason], ", ".join(counts.where[reason]),
            ", ..." if count > len(counts.where[reason]) else "",
        )  # fmt: skip
    if not examples:
        raise UserError(
            f"{'--hf-dataset ' + opts.hf_dataset if opts.hf_dataset else '--input ' + ' '.join(opts.inputs)}: "
            f"none of the {counts.records} records is a usable --format "
            f"{opts.format} record ({', '.join(f'{n} {r}' for r, n in counts.bad.items()) or 'no records'})"
        )
    if counts.truncated:
        log.warning(
            "cut %d records at --seq-len %d (their responses' end is not trained)",
            counts.truncated,
            opts.seq_len,
        )
    is_val = val_examples(examples, opts.val_fraction or 0.0)
    split = write_instruction_splits(
        examples, is_val, out=temp, seq_len=opts.seq_len, dtype=info.dtype, pad_id=info.eos_id,
        packing=opts.packing, compression=opts.compression,
    )  # fmt: skip
    log.info(
        "train: %d samples (%d examples), val: %d samples (%d examples) of %d tokens",
        split.train_samples, split.train_examples, split.val_samples, split.val_examples, opts.seq_len,
    )  # fmt: skip
    return {
        "format": opts.format,
        "packing": opts.packing,
        **counts.summary(),
        "train_examples": split.train_examples,
        "val_examples": split.val_examples,
        "response_tokens": split.response_tokens,
        "padding_tokens": split.padding_tokens,
        **common_stats(opts, info, split.train_samples, split.val_samples),
        "chat_template": template if opts.format == "chat" else None,
        "compression": opts.compression,
        "val_fraction": opts.val_fraction,
    }
