"""`llm-train prepare`: text -> cleaned, deduplicated, tokenized, packed MDS shards.

Library use::

    from trainer.data.prepare import PrepareOptions, run_prepare, stdlib_corpus_glob
    stats = run_prepare(PrepareOptions(inputs=stdlib_corpus_glob(), out="data/demo",
                                       tokenizer="bpe:4096", seq_len=256, workers=2))

Modules: `options` (what to do, early checks), `sources` (files, jsonl, HF datasets), `clean`
(normalise, filter, dedupe, hash), `tokenizer` (HF or trained BPE), `encode` (worker processes),
`pack` (split, pack, MDS), `output` (atomic output folder), `pipeline` (`run_prepare`), `corpus`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.data.prepare.corpus import stdlib_corpus_glob
from trainer.data.prepare.options import PrepareOptions

if TYPE_CHECKING:
    from trainer.data.prepare.pipeline import run_prepare

__all__ = ["PrepareOptions", "run_prepare", "stdlib_corpus_glob"]


def __getattr__(name: str) -> Any:
    # Lazy: the spawned tokenizer workers import this package, and the pipeline's imports
    # (streaming pulls in torch) would add seconds to every worker start.
    if name == "run_prepare":
        from trainer.data.prepare.pipeline import run_prepare

        return run_prepare
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
