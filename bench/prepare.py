"""Throughput of `prepare` and of reading what it wrote (not a test: prints figures, asserts nothing).

1. `prepare` tokens/s on the demo corpus (the standard library's top-level modules) with the
   tokenizer it trained, against the raw batch-encode throughput of the same tokenizer on the
   same documents with the same number of worker processes (target ratio >= 0.8). Prepare's time
   is the whole `run_prepare` call (read, clean, dedupe, load and save the tokenizer, start the
   workers, tokenize, split, pack, write and hash the shards, rename); the raw baseline is only
   `encode_batch_fast` in an already started, warmed pool. Runs alternate to share the noise.
2. The loader's tokens/s reading the train split as LongTensor batches (8, seq_len), against a
   plain numpy memmap of the same tokens read the same way (target ratio >= 0.5). Each repeat runs
   the memmap baseline, then plain streaming and the trainer's loader with 0 and 2 DataLoader
   workers; with 2 workers the trainer's loader makes a second pass in the same, persistent
   workers (`_second_pass`, what every later epoch and evaluation of a run costs). Ratios are taken
   within a repeat, then their median is reported.

Usage: .venv/bin/python bench/prepare.py [--workers 2] [--repeats 5] [--seq-len 256]
           [--loader-repeats 5] [--loader-only]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Only light imports at module level: the spawned tokenizer workers re-import this file.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.data.prepare import PrepareOptions, stdlib_corpus_glob  # noqa: E402

BATCH = 8


def _documents() -> list[str]:
    from trainer.data.prepare.clean import Counts, clean_documents
    from trainer.data.prepare.sources import FileSource, resolve_inputs

    counts = Counts()
    source = FileSource(files=resolve_inputs(stdlib_corpus_glob()), text_field="text")
    return [doc.text for doc in clean_documents(source.iter_raw(counts), counts, min_chars=1, dedupe=True)]


def _fast_encode(tokenizer_file: str, eos_id: int, dtype: str, texts: list[str]) -> tuple[int, float]:
    """The raw baseline: prepare's own worker call (`encode_batch_fast`), nothing around it."""
    from trainer.data.prepare.worker import encode_texts

    started = time.process_time()
    tokens, _ = encode_texts(tokenizer_file, eos_id, dtype, texts)
    return len(tokens), time.process_time() - started


def _hf_encode(tokenizer_dir: str, texts: list[str]) -> tuple[int, float]:
    """What a user would write: the transformers fast tokenizer called on a batch."""
    from transformers import AutoTokenizer

    tokenizer = _HF_CACHE.get(tokenizer_dir)
    if tokenizer is None:
        tokenizer = _HF_CACHE[tokenizer_dir] = AutoTokenizer.from_pretrained(tokenizer_dir)
    started = time.process_time()
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return sum(len(doc) + 1 for doc in ids), time.process_time() - started


_HF_CACHE: dict[str, Any] = {}


def _raw_run(pool: Any, function: Any, tasks: list[tuple[Any, ...]]) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds summed over the workers) of one pass over `tasks`."""
    started = time.perf_counter()
    results = pool.starmap(function, tasks, chunksize=1)
    seconds = time.perf_counter() - started
    return sum(r[0] for r in results), seconds, sum(r[1] for r in results)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children: prepare's pool included."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_prepare(work: Path, workers: int, repeats: int, seq_len: int) -> dict[str, Any]:
    import multiprocessing

    from trainer.data.prepare import run_prepare
    from trainer.data.prepare.encode import chunk_documents
    from trainer.data.prepare.worker import init_process

    demo = work / "demo"
    started = time.perf_counter()
    import streaming  # noqa: F401 - timed apart: a cold process pays these imports once
    import transformers  # noqa: F401

    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    demo_stats = run_prepare(
        PrepareOptions(
            inputs=stdlib_corpus_glob(), out=demo, tokenizer="bpe:4096", seq_len=seq_len, workers=workers
        )
    )
    demo_seconds = time.perf_counter() - started

    from trainer.data.prepare.clean import Document

    texts = _documents()
    chunks = [chunk for _, chunk in chunk_documents(Document(text, 0.5) for text in texts)]
    tokenizer_file = str(demo / "tokenizer" / "tokenizer.json")
    fast_tasks = [(tokenizer_file, demo_stats["eos_id"], demo_stats["dtype"], chunk) for chunk in chunks]
    hf_tasks = [(str(demo / "tokenizer"), chunk) for chunk in chunks]
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_process)
    _raw_run(pool, _fast_encode, fast_tasks[:workers] * 2)  # start and load the tokenizer in every worker
    _raw_run(pool, _hf_encode, hf_tasks[:workers] * 2)

    prepare_rates, raw_rates, hf_rates, prepare_cpu, raw_cpu = [], [], [], [], []
    options = PrepareOptions(
        inputs=stdlib_corpus_glob(),
        out=work / "again",
        tokenizer=str(demo / "tokenizer"),
        seq_len=seq_len,
        workers=workers,
        overwrite=True,
    )
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        stats = run_prepare(options)
        prepare_rates.append(stats["tokens_tokenized"] / (time.perf_counter() - started))
        prepare_cpu.append(stats["tokens_tokenized"] / (_cpu_seconds() - cpu_started))
        tokens, seconds, cpu = _raw_run(pool, _fast_encode, fast_tasks)
        raw_rates.append(tokens / seconds)
        raw_cpu.append(tokens / cpu)
        tokens, seconds, _ = _raw_run(pool, _hf_encode, hf_tasks)
        hf_rates.append(tokens / seconds)
    pool.terminate()
    median = statistics.median
    return {
        "corpus": {"files": demo_stats["files"], "mb": round(sum(map(len, texts)) / 1e6, 2)},
        "tokens": demo_stats["tokens_tokenized"],
        "imports_streaming_transformers_s": round(import_seconds, 2),
        "demo_prepare_bpe4096_s": round(demo_seconds, 2),
        "prepare_tokens_per_s": round(median(prepare_rates)),
        "raw_encode_batch_fast_tokens_per_s": round(median(raw_rates)),
        "raw_hf_tokenizer_call_tokens_per_s": round(median(hf_rates)),
        "ratio_prepare_to_raw_median_of_pairs": round(
            median(p / r for p, r in zip(prepare_rates, raw_rates, strict=True)), 3
        ),
        "ratio_prepare_to_raw_best_to_best": round(max(prepare_rates) / max(raw_rates), 3),
        "prepare_tokens_per_cpu_s": round(median(prepare_cpu)),
        "raw_tokens_per_cpu_s": round(median(raw_cpu)),
        "ratio_prepare_to_raw_per_cpu_s": round(median(prepare_cpu) / median(raw_cpu), 3),
        "per_repeat_prepare": [round(r) for r in prepare_rates],
        "per_repeat_raw": [round(r) for r in raw_rates],
    }


def _memmap_rate(flat: Path, seq_len: int, dtype: str) -> tuple[float, float]:
    """Baseline: the plain memmap loader (nanoGPT style): each sample a slice, stacked, as int64.

    Returns tokens per wall second and tokens per CPU second of this process.
    """
    import numpy as np
    import torch

    tokens = np.memmap(flat, dtype=dtype, mode="r")
    samples = len(tokens) // seq_len
    started, cpu_started = time.perf_counter(), time.process_time()
    count = 0
    for first in range(0, samples - BATCH + 1, BATCH):
        rows = [
            torch.from_numpy(tokens[i * seq_len : (i + 1) * seq_len].astype(np.int64))
            for i in range(first, first + BATCH)
        ]
        count += torch.stack(rows).numel()
    return count / (time.perf_counter() - started), count / (time.process_time() - cpu_started)


def _rates(batches: Any) -> tuple[float, float, float]:
    """Tokens/s over a whole pass, from the first batch on (without the epoch's start-up), and per
    CPU second of this process (which leaves out DataLoader workers)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    first_at, first_count, count = 0.0, 0, 0
    for batch in batches:
        count += batch.numel()
        if not first_at:
            first_at, first_count = time.perf_counter(), count
    ended = time.perf_counter()
    cpu = time.process_time() - cpu_started
    return count / (ended - started), (count - first_count) / (ended - first_at), count / cpu


def _plain_streaming_rates(split: Path, num_workers: int) -> tuple[float, float, float]:
    import torch
    from streaming import StreamingDataLoader, StreamingDataset

    dataset = StreamingDataset(local=str(split), shuffle=False, batch_size=BATCH)
    loader = StreamingDataLoader(dataset, batch_size=BATCH, num_workers=num_workers, drop_last=True)
    return _rates(torch.as_tensor(batch["tokens"]).long() for batch in loader)


def _trainer_loader_rates(
    folder: Path, num_workers: int, passes: int
) -> list[tuple[float, float, float]] | str:
    """Rates of `passes` passes of one loader: with workers, the first forks them and the later ones
    reuse them (persistent workers), as later epochs and evaluations of a run do."""
    try:
        from trainer.config import DataConfig
        from trainer.data.loader import build_loader

        config = DataConfig(path=str(folder), num_workers=num_workers, shuffle=False)
        loader = build_loader(config, "train", BATCH, 0, shuffle=False)
        return [_rates(batch["input_ids"] for batch in loader.iter_batches()) for _ in range(passes)]
    except Exception as error:  # noqa: BLE001 - another engineer's module may not be ready; say so
        return f"unavailable ({type(error).__name__}: {error})"


def _loader_runs(folder: Path, workers: int) -> dict[str, tuple[float, float, float] | str]:
    """One repeat's loader rates with `workers` DataLoader workers, by result key."""
    runs: dict[str, tuple[float, float, float] | str] = {
        f"streaming_dataloader_w{workers}": _plain_streaming_rates(folder / "train", workers)
    }
    passes = _trainer_loader_rates(folder, workers, 2 if workers else 1)
    key = f"trainer_build_loader_w{workers}"
    if isinstance(passes, str):
        return {**runs, key: passes}
    runs[key] = passes[0]
    if workers:
        runs[f"{key}_second_pass"] = passes[1]  # the same worker processes, kept from the first pass
    return runs


def bench_loader(work: Path, seq_len: int, repeats: int) -> dict[str, Any]:
    import numpy as np
    from streaming import StreamingDataset

    folder = work / "demo"
    stats = json.loads((folder / "prepare.json").read_text())
    dataset = StreamingDataset(local=str(folder / "train"), shuffle=False, batch_size=BATCH)
    flat = work / "train.bin"
    np.concatenate([dataset[i]["tokens"] for i in range(dataset.num_samples)]).tofile(flat)
    median = statistics.median
    memmap: list[tuple[float, float]] = []
    runs: dict[str, list[tuple[tuple[float, float], tuple[float, float, float]]]] = {}  # (memmap, loader)
    errors: dict[str, str] = {}
    for _ in range(repeats):  # alternate the baseline and the loaders, so that they share the noise
        memmap.append(_memmap_rate(flat, seq_len, stats["dtype"]))
        for workers in (0, 2):
            for name, rates in _loader_runs(folder, workers).items():
                if isinstance(rates, str):
                    errors[name] = rates
                else:
                    runs.setdefault(name, []).append((memmap[-1], rates))
    result: dict[str, Any] = {
        "train_samples": stats["train_samples"],
        "repeats": repeats,
        "memmap_tokens_per_s": round(median(rate for rate, _ in memmap)),
        "memmap_tokens_per_cpu_s": round(median(cpu for _, cpu in memmap)),
        **errors,
    }
    for key, pairs in runs.items():
        result[f"{key}_tokens_per_s"] = round(median(r[0] for _, r in pairs))
        result[f"{key}_ratio_to_memmap"] = round(median(r[0] / m[0] for m, r in pairs), 4)
        result[f"{key}_after_first_batch_ratio_to_memmap"] = round(median(r[1] / m[0] for m, r in pairs), 4)
        if "_w0" in key:  # with workers the reading happens in other processes
            result[f"{key}_per_cpu_s_ratio_to_memmap"] = round(median(r[2] / m[1] for m, r in pairs), 4)
        result[f"{key}_per_repeat_ratio"] = [round(r[0] / m[0], 3) for m, r in pairs]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--loader-repeats", type=int, default=5)
    parser.add_argument(
        "--loader-only", action="store_true", help="prepare the demo once, then only the loader part"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        result: dict[str, Any] = {"workers": args.workers, "seq_len": args.seq_len, "cpus": os.cpu_count()}
        result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
        if args.loader_only:
            from trainer.data.prepare import run_prepare

            options = PrepareOptions(
                inputs=stdlib_corpus_glob(),
                out=work / "demo",
                tokenizer="bpe:4096",
                seq_len=args.seq_len,
                workers=args.workers,
            )
            run_prepare(options)
        else:
            result["prepare"] = bench_prepare(work, args.workers, args.repeats, args.seq_len)
        result["loader"] = bench_loader(work, args.seq_len, args.loader_repeats)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
