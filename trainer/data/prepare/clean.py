"""Normalise, filter and exactly deduplicate documents, and give each a stable hash.

The hash of the normalised text serves twice: exact dedupe, and the train/val split (a document's
split depends only on its text, never on the order it was read in or on the number of workers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class Counts:
    """Document counts; every document read ends in exactly one of the last four."""

    files: int = 0
    documents: int = 0
    dropped_undecodable: int = 0
    dropped_short: int = 0
    duplicates: int = 0
    kept_documents: int = 0


@dataclass(frozen=True)
class Document:
    text: str
    fraction: float  # in [0, 1), from the hash; the split rule compares it with a threshold


def normalise(text: str) -> str:
    """Line endings to `\\n`, a leading BOM and the trailing whitespace of the document removed."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip()


def text_digest(text: str) -> bytes:
    """16-byte BLAKE2b of the (already normalised) text; UnicodeEncodeError for lone surrogates."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def digest_fraction(digest: bytes) -> float:
    """Map a digest uniformly to [0, 1) from its first 8 bytes."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


def clean_documents(
    raw: Iterable[str | None], counts: Counts, *, min_chars: int, dedupe: bool
) -> Iterator[Document]:
    """Yield the kept documents in input order and fill in `counts`.

    `raw` yields None for an undecodable document; text with lone surrogates (not encodable as
    UTF-8, so not tokenizable) counts as undecodable too. A document shorter than `min_chars` characters
    after normalisation is dropped as short, and so is an empty one whatever `min_chars` says
    (it would add nothing but an end-of-text token).
    """
    threshold = max(min_chars, 1)
    seen: set[bytes] = set()
    for text in raw:
        counts.documents += 1
        if text is None:
            counts.dropped_undecodable += 1
            continue
        text = normalise(text)
        if len(text) < threshold:
            counts.dropped_short += 1
            continue
        try:
            digest = text_digest(text)
        except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\\ud800" escape
            counts.dropped_undecodable += 1
            continue
        if dedupe:
            if digest in seen:
                counts.duplicates += 1
                continue
            seen.add(digest)
        counts.kept_documents += 1
        yield Document(text=text, fraction=digest_fraction(digest))
