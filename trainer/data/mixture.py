"""The datasets a split reads, as mosaicml-streaming `Stream`s: data.path alone, or a `data.streams` mixture.

Mixture semantics (streaming 0.13, relative weights: every stream has a `proportion`). An epoch draws
`epoch_size` samples: data.epoch_size, else the streams' samples added up. Stream i gives
`floor(epoch_size * p_i / sum(p))` of them, one more for a few streams picked with the seed so that
the counts add up to epoch_size. A stream with fewer samples than its share is repeated (all its
samples a whole number of times, then a seeded random subset for the rest), one with more is
down-sampled (a seeded random subset); the subsets change every epoch (the seed plus the epoch
number). The drawn samples of all streams are then shuffled together and dealt out to ranks like a
single dataset's, so the order is a function of the seed, the epoch and num_canonical_nodes alone,
and resume (`TokenBatches.state_dict`) and the 1-to-N layout guarantees of `trainer.data.loader` hold as they
are; a resume under another run.seed shares the epoch out with the checkpoint's seed (`reseed_weights`).
`repeat`/`choose` (absolute weights) are not offered: proportions say what a mixture means.

Only the train split mixes: validation reads data.path's val split, so that val loss stays
comparable while the mixture changes. data.path also gives the tokenizer and the model's shape,
so every stream must agree with it on seq_len, vocab_size and eos_id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from trainer.config import DataConfig
from trainer.data.dataset_info import DatasetInfo, node_cache_dir, read_dataset_info
from trainer.errors import UserError

if TYPE_CHECKING:  # streaming imports transformers: not for the launcher's `check_mixture`
    from streaming import Stream, StreamingDataset

_MUST_AGREE = ("seq_len", "vocab_size", "eos_id")


def check_mixture(data: DataConfig, reference: DatasetInfo) -> list[DatasetInfo]:
    """Every data.streams dataset's info, checked against data.path's (`reference`).

    A dataset without prepare.json has no vocab_size/eos_id to compare: only its seq_len is checked.
    Missing or truncated shards of any stream are named here (`read_dataset_info`).
    """
    infos = [read_dataset_info(stream.path, stream.remote) for stream in data.streams]
    for info in infos:
        differences = [
            f"{name} {getattr(info, name)} vs {getattr(reference, name)}"
            for name in _MUST_AGREE
            if None not in (getattr(info, name), getattr(reference, name))
            and getattr(info, name) != getattr(reference, name)
        ]
        if differences:
            raise UserError(
                f"data.streams dataset '{info.source}' does not match data.path '{reference.source}' "
                f"({', '.join(differences)}); prepare every stream with the same tokenizer and --seq-len "
                "(`llm-train prepare --append-to` reuses a dataset's)"
            )
    return infos


def split_streams(data: DataConfig, split: str, reference: DatasetInfo) -> list[Stream]:
    """The streams `split` reads: the data.streams mixture for train when set, else data.path alone.

    `reference` is data.path's info; the mixture is checked against it first (`check_mixture`).
    """
    if split != "train" or not data.streams:
        return [_stream(data.path, data.remote, split)]
    check_mixture(data, reference)
    return [_stream(stream.path, stream.remote, split, stream.proportion) for stream in data.streams]


def _stream(path: str, remote: str | None, split: str, proportion: float | None = None) -> Stream:
    """A remote is cached per node under `path` (see `node_cache_dir`); a local folder is read in place.

    Its shards were checked by `read_dataset_info` (data.path's by the caller, the streams' in `check_mixture`).
    """
    from streaming import Stream

    if remote:
        return Stream(local=str(node_cache_dir(path)), remote=remote, split=split, proportion=proportion)
    return Stream(local=path, split=split, proportion=proportion)


def describe(streams: Sequence[Stream]) -> str:
    """Where the samples come from, for the log; with several streams, each one's samples per epoch."""
    parts = []
    for stream in streams:
        where = f"{stream.remote} cached in {stream.local}" if stream.remote else stream.local
        if len(streams) > 1:  # streaming has derived every stream's choose and proportion by now
            where += f" ({stream.choose} samples, {stream.proportion:.1%})"
        parts.append(where)
    return ", ".join(parts)


def reseed_weights(dataset: StreamingDataset, seed: int) -> None:
    """Share the epoch out among the streams again as `seed` does (a resume with the checkpoint's seed).

    Streaming derives each stream's samples per epoch once, at construction, with the seed it has
    then, and hands the few left over by rounding to streams that seed picks: a dataset built with
    another run.seed would otherwise give one stream a sample more than the checkpointed run did.
    """
    if dataset.num_streams < 2 or any(stream._proportion is None for stream in dataset.streams):
        return  # one stream takes every sample whatever the seed; ours always have proportions
    from streaming import Stream

    for stream in dataset.streams:  # back to the weights as given: streaming then derives the rest
        stream.proportion = stream._proportion
        del stream.repeat, stream.choose
    epoch_size = Stream.apply_weights(dataset.streams, dataset.samples_per_stream, dataset.epoch_size, seed)
    assert epoch_size == dataset.epoch_size
