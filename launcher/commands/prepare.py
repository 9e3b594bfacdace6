"""`llm-train prepare`: clean, filter, exact-dedupe, tokenize, pack and write MDS shards."""

from __future__ import annotations

import argparse
import json

from trainer.data.prepare import PrepareOptions
from trainer.data.prepare.instructions import FORMATS, PACKING
from trainer.data.prepare.options import DEFAULT_VAL_FRACTION, MAX_DEFAULT_WORKERS
from trainer.logs import setup_logging


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="turn text files or a Hugging Face dataset into tokenized MDS shards",
        description="Read text, normalise line endings, drop short and undecodable documents, remove exact "
        "duplicates, tokenize (an HF fast tokenizer or a byte-level BPE trained on the input), append EOS to "
        "every document, pack into --seq-len samples and write DIR/train, DIR/val (MDS), DIR/tokenizer and "
        "DIR/prepare.json. The stats are printed to stdout as JSON.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="GLOB",
        help="files, folders or globs (quoted; ** recurses): .txt/source files are one document each, "
        ".jsonl lines one document each (.gz is decompressed)",
    )
    source.add_argument(
        "--hf-dataset",
        metavar="NAME[:CONFIG]",
        help="a Hugging Face dataset (hub or local HF cache), or a folder written by Dataset.save_to_disk",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text: documents (default); chat: JSONL records {messages: [{role, content}, ...]}, rendered with "
        "the tokenizer's chat template (a default one if it has none), loss on every assistant turn; "
        "prompt-completion: JSONL records {prompt, completion}, loss on the completion",
    )
    parser.add_argument(
        "--packing",
        choices=PACKING,
        default="greedy",
        help="chat/prompt-completion: greedy packs several examples per sample, attention kept apart "
        "(default); none gives each example a padded sample of its own",
    )
    parser.add_argument("--split", default="train", help="split of --hf-dataset (default: train)")
    parser.add_argument(
        "--text-field", default="text", help="field holding the text in jsonl/HF (default: text)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset folder")
    parser.add_argument(
        "--tokenizer",
        metavar="HF_NAME|PATH|bpe:VOCAB",
        help="an HF fast tokenizer name or folder, or bpe:VOCAB to train a byte-level BPE on the input "
        "(required unless --append-to)",
    )
    parser.add_argument(
        "--seq-len", type=int, metavar="N", help="tokens per sample (required unless --append-to)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        metavar="F",
        help=f"share of documents held out for validation, chosen by text hash (default: {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument(
        "--append-to",
        metavar="PARENT",
        help="write --out as a new version of the prepared dataset PARENT: its shards (hard-linked or copied, "
        "unchanged) plus the input's documents, tokenized, packed and split as PARENT was; PARENT is not "
        "modified, and duplicates are removed among the new documents only",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help=f"tokenizer processes (default: CPU cores, at most {MAX_DEFAULT_WORKERS})",
    )
    parser.add_argument(
        "--min-chars",
        type=int,
        default=1,
        metavar="N",
        help="drop documents shorter than N characters after normalisation (default: 1; empty ones always)",
    )
    parser.add_argument("--no-dedupe", action="store_true", help="keep exact duplicates")
    parser.add_argument("--compression", default=None, metavar="ALGO", help="shard compression, e.g. zstd")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.set_defaults(handler=run)


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    return PrepareOptions(
        inputs=list(args.input or []),
        hf_dataset=args.hf_dataset,
        split=args.split,
        text_field=args.text_field,
        out=args.out,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        workers=args.workers,
        min_chars=args.min_chars,
        dedupe=not args.no_dedupe,
        compression=args.compression,
        overwrite=args.overwrite,
        append_to=args.append_to,
        format=args.format,
        packing=args.packing,
    )


def run(args: argparse.Namespace) -> int:
    from trainer.data.prepare.pipeline import run_prepare

    setup_logging()
    stats = run_prepare(options_from_args(args))
    print(json.dumps(stats, indent=2))
    return 0
