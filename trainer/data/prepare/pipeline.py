"""`run_prepare`: read, clean, (train a tokenizer,) tokenize in `--workers` processes, split, pack,
write MDS shards and `prepare.json`, then move the finished folder into place. With `append_to`,
the new documents are added to a copy of an existing dataset instead (`append`).

`prepare.json` (also the return value of `run_prepare`):
- `files`: input files matched (0 for an HF dataset); `documents`: documents read, each of which
  ends in exactly one of `dropped_undecodable` (not UTF-8), `dropped_short` (under --min-chars, or
  empty), `duplicates` (exact, after normalisation) and `kept_documents` (= `train_documents` +
  `val_documents`);
- `tokens_tokenized`: tokens of the kept documents, one EOS each included; `tokens`: tokens written,
  `(train_samples + val_samples) * seq_len`; `tokens_dropped_tail`: the last partial sample of
  each split, not written;
- `seq_len`, `vocab_size` (len(tokenizer)), `eos_id`, `dtype` (of the `tokens` column),
  `tokenizer` (the --tokenizer value), `val_threshold` (documents whose hash fraction is below it
  are val, see `pack`), and the options that shaped the data (`inputs` or `hf_dataset` + `split`,
  `text_field`, `min_chars`, `dedupe`, `compression`, `val_fraction`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from trainer.data.prepare.append import NEW_PART, Parent, merge, options_for, read_parent
from trainer.data.prepare.clean import Counts, Document, clean_documents
from trainer.data.prepare.encode import TokenizerPool
from trainer.data.prepare.options import PrepareOptions, bpe_vocab_size, validate
from trainer.data.prepare.output import check_out, commit, common_stats, make_temp_dir
from trainer.data.prepare.pack import choose_val_threshold, write_splits
from trainer.data.prepare.sources import FileSource, HFSource, open_hf_dataset, resolve_inputs
from trainer.data.prepare.tokenizer import TokenizerInfo, load_pretrained, save_tokenizer, train_bpe
from trainer.errors import UserError

log = logging.getLogger(__name__)

Source = FileSource | HFSource


def run_prepare(options: PrepareOptions) -> dict[str, Any]:
    """Prepare an MDS dataset as described by `options`; return the stats written to prepare.json.

    With `options.append_to`, the dataset is a new version of that one (see `append`).
    Raises `UserError` for anything the user can fix; the output folder then is left as it was.
    """
    parent = read_parent(options.append_to) if options.append_to else None
    opts = validate(options_for(options, parent) if parent else options)
    out = Path(opts.out)
    check_out(out, opts.overwrite)
    source = _open_source(opts, out)
    pretrained = None
    if parent is None and not bpe_vocab_size(opts.tokenizer):
        pretrained = load_pretrained(opts.tokenizer, opts.seq_len)
    temp = make_temp_dir(out)
    try:
        if opts.format != "text":
            from trainer.data.prepare.instruction_pipeline import prepare_instructions

            stats = prepare_instructions(temp, opts, source, pretrained)
        else:
            stats = _prepare_into(temp, opts, source, pretrained, parent)
        if parent is not None:
            stats = merge(parent, temp, stats)
        # Last file of the dataset: a folder without it was never finished.
        (temp / "prepare.json").write_text(json.dumps(stats, indent=2) + "\n")
        commit(temp, out, opts.overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return stats


def _open_source(opts: PrepareOptions, out: Path) -> Source:
    if opts.hf_dataset:
        field = {"chat": "messages", "prompt-completion": "prompt"}.get(opts.format, opts.text_field)
        return open_hf_dataset(opts.hf_dataset, opts.split, field)
    files = resolve_inputs(opts.inputs)
    # An input folder that contains --out must not read an earlier output (shards, tokenizer) as text.
    ours = {f for f in files if f.is_relative_to(out) or _in_temp(f, out)}
    if ours:
        log.warning("not reading %d files of the output folder %s", len(ours), out)
        files = [f for f in files if f not in ours]
        if not files:
            raise UserError(
                f"--input {' '.join(opts.inputs)}: matches only files of --out {out}; point it at your text"
            )
    return FileSource(files=files, text_field=opts.text_field)


def _in_temp(path: Path, out: Path) -> bool:
    """Inside a `DIR.tmp-*` or `DIR.old-*` folder of another prepare into the same --out."""
    try:
        first = path.relative_to(out.parent).parts[0]
    except ValueError:
        return False
    return first.startswith((f"{out.name}.tmp-", f"{out.name}.old-"))


def _documents(source: Source, opts: PrepareOptions, counts: Counts) -> Iterator[Document]:
    return clean_documents(source.iter_raw(counts), counts, min_chars=opts.min_chars, dedupe=opts.dedupe)


def _require_documents(counts: Counts) -> None:
    if counts.kept_documents == 0:
        raise UserError(
            f"no documents left after filtering: {counts.documents} read, {counts.dropped_short} shorter than "
            f"--min-chars, {counts.dropped_undecodable} not UTF-8, {counts.duplicates} duplicates; "
            "lower --min-chars or check the input"
        )


def _tokenizer_for(temp: Path, opts: PrepareOptions, source: Source, pretrained: Any) -> TokenizerInfo:
    """Save the loaded tokenizer, or train the BPE on a first pass over the cleaned documents."""
    tokenizer = pretrained
    if tokenizer is None:
        vocab = bpe_vocab_size(opts.tokenizer)
        assert vocab is not None
        log.info("training a byte-level BPE with %d tokens on the input", vocab)
        started = time.perf_counter()
        counts = Counts()
        tokenizer = train_bpe(vocab, (document.text for document in _documents(source, opts, counts)))
        _require_documents(counts)
        seconds = time.perf_counter() - started
        log.info("trained the BPE on %d documents in %.1f s", counts.kept_documents, seconds)
    return save_tokenizer(tokenizer, temp / "tokenizer")


def _tokenize(
    pool: TokenizerPool,
    source: Source,
    opts: PrepareOptions,
    info: TokenizerInfo,
    counts: Counts,
    scratch: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize the cleaned documents into `scratch`, with a progress bar on a terminal."""
    show = opts.progress if opts.progress is not None else sys.stderr.isatty()
    with tqdm(total=source.known_documents, unit=" docs", disable=not show, file=sys.stderr) as bar:
        tokenized = 0

        def on_chunk(documents: int, tokens: int) -> None:
            nonlocal tokenized
            tokenized += tokens
            bar.update(documents)
            bar.set_postfix(tokens=tokenized, refresh=False)

        return pool.tokenize_to_file(
            _documents(source, opts, counts),
            tokenizer_file=info.file,
            eos_id=info.eos_id,
            dtype=info.dtype,
            out_file=scratch,
            on_chunk=on_chunk,
        )


def _prepare_into(
    temp: Path, opts: PrepareOptions, source: Source, pretrained: Any, parent: Parent | None
) -> dict[str, Any]:
    """Write the tokenizer and the splits into `temp` (the splits into `temp/NEW_PART` when appending
    to `parent`, see `append.merge`); return the stats of these documents."""
    log.info("reading %s", f"{len(source.files)} files" if isinstance(source, FileSource) else source.spec)
    # Started first: the workers start up while the tokenizer is trained or saved.
    with TokenizerPool(opts.workers or 1) as pool:
        if parent is None:
            info = _tokenizer_for(temp, opts, source, pretrained)
        else:
            info = parent.copy_tokenizer(temp)
        counts = Counts()
        scratch = temp / "tokens.scratch"
        started = time.perf_counter()
        lengths, fractions = _tokenize(pool, source, opts, info, counts, scratch)
    _require_documents(counts)
    seconds = time.perf_counter() - started
    total = int(lengths.sum())
    log.info(
        "tokenized %d documents into %d tokens in %.1f s (%.0f tokens/s, %d workers)",
        counts.kept_documents,
        total,
        seconds,
        total / max(seconds, 1e-9),
        opts.workers,
    )
    if parent is None:
        threshold = choose_val_threshold(lengths, fractions, opts.val_fraction, opts.seq_len)
    else:  # a document goes to the split it would have gone to in the parent
        threshold = parent.val_threshold
    split = write_splits(
        scratch,
        lengths,
        fractions < threshold,
        seq_len=opts.seq_len,
        dtype=info.dtype,
        out=temp if parent is None else temp / NEW_PART,
        compression=opts.compression,
    )
    scratch.unlink()
    log.info(
        "train: %d samples, val: %d samples of %d tokens",
        split.train_samples,
        split.val_samples,
        opts.seq_len,
    )
    return {
        "files": counts.files,
        "documents": counts.documents,
        "dropped_short": counts.dropped_short,
        "dropped_undecodable": counts.dropped_undecodable,
        "duplicates": counts.duplicates,
        "kept_documents": counts.kept_documents,
        "train_documents": split.train_documents,
        "val_documents": split.val_documents,
        "tokens_tokenized": total,
        "tokens_dropped_tail": split.tokens_dropped_tail,
        **common_stats(opts, info, split.train_samples, split.val_samples),
        "text_field": opts.text_field,
        "min_chars": opts.min_chars,
        "dedupe": opts.dedupe,
        "compression": opts.compression,
        "val_fraction": opts.val_fraction,
        "val_threshold": threshold,
    }
