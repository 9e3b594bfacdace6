"""The tokenizer of a prepared dataset: a Hugging Face fast tokenizer, or a byte-level BPE trained here.

Whatever the source, it is saved with `save_pretrained` into `DIR/tokenizer/` (with `tokenizer.json`
and an end-of-text token set), and the tokenizer workers load that `tokenizer.json`, so the saved
tokenizer is by construction the one that produced the shards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.data.prepare.options import MAX_SEQ_LEN
from trainer.errors import UserError, offline_hint

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# transformers writes int(1e30) as model_max_length when a tokenizer declares no limit.
_NO_LIMIT = 10**12
UINT16_VOCAB = 1 << 16


@dataclass(frozen=True)
class TokenizerInfo:
    folder: Path  # written by save_pretrained
    eos_id: int
    vocab_size: int  # len(tokenizer), added tokens included
    dtype: str  # numpy dtype of the token column: uint16 when every id fits, else uint32

    @property
    def file(self) -> Path:
        return self.folder / "tokenizer.json"


def load_pretrained(spec: str, seq_len: int) -> Any:
    """Load a fast tokenizer by HF name or local path and check `seq_len` against its real limit."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, use_fast=True)
    except Exception as error:  # noqa: BLE001 - OSError, ValueError, ...: all mean "cannot load this name"
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--tokenizer {spec}: cannot load it ({reason}); {offline_hint()}; or give a folder with "
            "tokenizer files, or bpe:VOCAB"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"--tokenizer {spec}: only a slow (Python) tokenizer exists for it; prepare needs a fast one "
            "(with tokenizer.json) - pick another tokenizer or bpe:VOCAB"
        )
    limit = int(tokenizer.model_max_length)
    if limit < _NO_LIMIT and seq_len > limit:
        raise UserError(
            f"--seq-len {seq_len}: larger than the {limit} tokens that tokenizer {spec} supports "
            f"(model_max_length); use --seq-len {limit} or less"
        )
    if seq_len > MAX_SEQ_LEN:  # validate() checks this too; kept here for direct callers
        raise UserError(f"--seq-len {seq_len}: must be at most {MAX_SEQ_LEN}")
    _ensure_eos(tokenizer)
    return tokenizer


def _ensure_eos(tokenizer: Any) -> None:
    """Documents are separated by EOS: reuse the separator token if there is no EOS, else add one."""
    if tokenizer.eos_token is not None:
        return
    if tokenizer.sep_token is not None:
        log.info("tokenizer has no eos token; using its separator %r as end of document", tokenizer.sep_token)
        tokenizer.eos_token = tokenizer.sep_token
    else:
        log.info("tokenizer has no eos or separator token; adding %r", EOS_TOKEN)
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})


def train_bpe(vocab_size: int, texts: Iterable[str]) -> Any:
    """Train a GPT-2 style byte-level BPE (GPT-2 pre-tokenizer regex, no prefix space) with
    `<|endoftext|>` as its only special token (id 0, also bos and unk), offline.

    The trainer runs on all cores (Rust threads) whatever `--workers` says; its result is
    deterministic for a given document stream. A small corpus may yield fewer tokens than asked.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.get_vocab_size() < vocab_size:
        log.warning(
            "the corpus is small: the BPE has %d tokens, not %d", backend.get_vocab_size(), vocab_size
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )


def save_tokenizer(tokenizer: Any, folder: Path) -> TokenizerInfo:
    """`save_pretrained` into `folder` and describe what the shards need (eos id, vocab size, dtype)."""
    from tokenizers import Tokenizer

    tokenizer.save_pretrained(str(folder))
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"--tokenizer: saving it wrote no tokenizer.json into {folder}; use a fast tokenizer")
    # Load-check here: a file the workers cannot read would make multiprocessing respawn them forever.
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    largest_id = max(backend.get_vocab(with_added_tokens=True).values())
    vocab_size = len(tokenizer)
    dtype = "uint16" if max(vocab_size, largest_id + 1) <= UINT16_VOCAB else "uint32"
    return TokenizerInfo(
        folder=folder, eos_id=int(tokenizer.eos_token_id), vocab_size=vocab_size, dtype=dtype
    )
