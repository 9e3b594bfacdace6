"""Tokenize documents in `--workers` processes and stream the results, in input order, to a file.

The workers run `trainer.data.prepare.worker` (kept free of heavy imports); this is the parent's side.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.prepare.clean import Document
from trainer.data.prepare.worker import encode_texts, init_process

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 18  # text per task: small enough to balance 2 workers on a few MB
CHUNK_DOCS = 4096
_IN_FLIGHT_PER_WORKER = 3  # bounded read-ahead: the corpus never sits in memory all at once
# Never fork: the parent may hold CUDA, torch, arrow or tokenizer threads; spawned workers are cheap
# because `worker` imports almost nothing.
START_METHOD = "spawn"


def chunk_documents(documents: Iterable[Document]) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Group documents into tasks of about `CHUNK_CHARS` characters: (hash fractions, texts)."""
    texts: list[str] = []
    fractions: list[float] = []
    chars = 0
    for document in documents:
        texts.append(document.text)
        fractions.append(document.fraction)
        chars += len(document.text)
        if chars >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
            yield np.array(fractions, dtype=np.float64), texts
            texts, fractions, chars = [], [], 0
    if texts:
        yield np.array(fractions, dtype=np.float64), texts


class TokenizerPool:
    """`workers` tokenizer processes; use as a context manager."""

    def __init__(self, workers: int, start_method: str = START_METHOD) -> None:
        self.workers = workers
        context = multiprocessing.get_context(start_method)
        self._pool = context.Pool(workers, initializer=init_process)

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.terminate()
        self._pool.join()

    def tokenize_to_file(
        self,
        documents: Iterable[Document],
        *,
        tokenizer_file: Path,
        eos_id: int,
        dtype: str,
        out_file: Path,
        on_chunk: Callable[[int, int], None] = lambda docs, tokens: None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Write every document's tokens (+EOS) to `out_file` as raw `dtype`, in input order.

        Returns per-document lengths and hash fractions. A bounded number of tasks is in flight and
        results are taken in submission order, so the file is the same for any number of workers.
        """
        lengths: list[np.ndarray] = []
        fractions: list[np.ndarray] = []
        pending: deque[tuple[np.ndarray, Any]] = deque()
        with open(out_file, "wb") as sink:

            def collect() -> None:
                chunk_fractions, result = pending.popleft()
                tokens, chunk_lengths = result.get()
                sink.write(tokens)
                lengths.append(np.frombuffer(chunk_lengths, dtype=np.int64))
                fractions.append(chunk_fractions)
                on_chunk(len(chunk_lengths), len(tokens))

            for chunk_fractions, texts in chunk_documents(documents):
                task = (str(tokenizer_file), eos_id, dtype, texts)
                pending.append((chunk_fractions, self._pool.apply_async(encode_texts, task)))
                if len(pending) >= _IN_FLIGHT_PER_WORKER * self.workers:
                    collect()
            while pending:
                collect()
        if not lengths:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return np.concatenate(lengths), np.concatenate(fractions)
