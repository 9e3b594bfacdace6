"""What `prepare` is asked to do (`PrepareOptions`) and the checks that need no data yet.

Every check raises `UserError` with one line that names the option, the value and the fix, so the
CLI can exit 2 before any expensive work (imports, tokenizer training, reading the corpus).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError

FORMATS = ("text", "chat", "prompt-completion")
PACKING = ("greedy", "none")

BPE_PREFIX = "bpe:"
# A byte-level BPE needs the 256 byte symbols plus the end-of-text token.
BPE_MIN_VOCAB = 257
BPE_MAX_VOCAB = 1 << 20
# Tokenizers without a real `model_max_length` (our trained BPE, many HF tokenizers whose config
# says 1e30) still get a sane cap: no GPT-2 position table is anywhere near a million tokens.
MAX_SEQ_LEN = 1 << 20
MAX_DEFAULT_WORKERS = 8
DEFAULT_VAL_FRACTION = 0.05


def default_workers() -> int:
    """One tokenizer process per usable core, at most `MAX_DEFAULT_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


@dataclass(kw_only=True)
class PrepareOptions:
    """The arguments of `llm-train prepare`, usable without the CLI.

    Exactly one of `inputs` (globs, file or folder paths) and `hf_dataset` (`NAME[:CONFIG]` or the
    path of a folder written by `datasets.Dataset.save_to_disk`) must be given. `tokenizer` and
    `seq_len` are required, except with `append_to` (a prepared dataset: its tokenizer, seq_len and
    split rule are used, see `trainer.data.prepare.append`).
    """

    out: str | Path
    tokenizer: str | None = None
    seq_len: int | None = None
    inputs: list[str] = field(default_factory=list)
    hf_dataset: str | None = None
    split: str = "train"
    text_field: str = "text"
    val_fraction: float | None = None  # None: DEFAULT_VAL_FRACTION
    workers: int | None = None  # None: default_workers()
    min_chars: int = 1
    dedupe: bool = True
    compression: str | None = None
    overwrite: bool = False
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal
    append_to: str | Path | None = None
    format: str = "text"  # text | chat | prompt-completion (trainer.data.prepare.instructions)
    packing: str = "greedy"  # greedy | none: instruction examples per sample


def bpe_vocab_size(spec: str) -> int | None:
    """The vocabulary size of a `bpe:VOCAB` spec, or None for an HF name or path."""
    if not spec.startswith(BPE_PREFIX):
        return None
    value = spec[len(BPE_PREFIX) :]
    try:
        vocab = int(value)
    except ValueError:
        raise UserError(
            f"--tokenizer {spec!r}: VOCAB must be an integer, e.g. bpe:4096 (a byte-level BPE trained on the input)"
        ) from None
    if not BPE_MIN_VOCAB <= vocab <= BPE_MAX_VOCAB:
        raise UserError(
            f"--tokenizer {spec!r}: VOCAB must be between {BPE_MIN_VOCAB} (256 bytes + end-of-text) "
            f"and {BPE_MAX_VOCAB}, e.g. bpe:4096"
        )
    return vocab


def validate(options: PrepareOptions) -> PrepareOptions:
    """Check the options that need no data; return a copy with defaults filled in."""
    if bool(options.inputs) == bool(options.hf_dataset):
        raise UserError("prepare: give either --input GLOB... or --hf-dataset NAME[:CONFIG] (exactly one)")
    if options.tokenizer is None or options.seq_len is None:
        missing = "--tokenizer" if options.tokenizer is None else "--seq-len"
        raise UserError(f"prepare: {missing} is required (or --append-to DIR, which reuses DIR's)")
    if not options.tokenizer:
        raise UserError("--tokenizer is empty: give a Hugging Face name or path, or bpe:VOCAB")
    bpe_vocab_size(options.tokenizer)
    if not isinstance(options.seq_len, int) or options.seq_len < 2:
        raise UserError(f"--seq-len {options.seq_len}: must be an integer >= 2 (tokens per training sample)")
    if options.seq_len > MAX_SEQ_LEN:
        raise UserError(f"--seq-len {options.seq_len}: must be at most {MAX_SEQ_LEN}")
    fraction = DEFAULT_VAL_FRACTION if options.val_fraction is None else options.val_fraction
    if not isinstance(fraction, (int, float)) or math.isnan(fraction) or not 0 <= fraction < 1:
        raise UserError(
            f"--val-fraction {fraction}: must be in [0, 1), the share of documents held out "
            "for validation, e.g. 0.05"
        )
    if options.format not in FORMATS:
        raise UserError(f"--format {options.format!r}: must be one of {', '.join(FORMATS)}")
    if options.packing not in PACKING:
        raise UserError(f"--packing {options.packing!r}: must be one of {', '.join(PACKING)}")
    if options.format != "text" and options.append_to:
        raise UserError(
            f"--append-to takes text (--format text); prepare --format {options.format} data anew"
        )
    workers = default_workers() if options.workers is None else options.workers
    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1 (tokenizer processes)")
    if options.min_chars < 0:
        raise UserError(f"--min-chars {options.min_chars}: must be >= 0")
    if not options.text_field:
        raise UserError("--text-field is empty: give the name of the field that holds the text, e.g. text")
    if options.compression:
        from streaming.base.compression import get_compressions, is_compression

        if not is_compression(options.compression):
            known = ", ".join(sorted(name for name in get_compressions() if ":" not in name))
            raise UserError(f"--compression {options.compression!r}: unknown; use one of {known} (e.g. zstd)")
    return PrepareOptions(
        out=Path(os.path.abspath(os.path.expanduser(str(options.out)))),
        tokenizer=options.tokenizer,
        seq_len=options.seq_len,
        inputs=list(options.inputs),
        hf_dataset=options.hf_dataset,
        split=options.split,
        text_field=options.text_field,
        val_fraction=float(fraction),
        workers=workers,
        min_chars=options.min_chars,
        dedupe=options.dedupe,
        compression=options.compression or None,
        overwrite=options.overwrite,
        progress=options.progress,
        append_to=options.append_to,
        format=options.format,
        packing=options.packing,
    )
