"""`llm-train prepare`: counts, token round trip, shard format, determinism, atomic output, user errors.

Every corpus is built here (or taken from the running interpreter's standard library); nothing is
downloaded. The expected token streams are computed with the tokenizer that prepare saved, from the
documented rules: documents in sorted-file order, normalised (line endings, trailing whitespace),
EOS after each, a document is val when its hash fraction is below `val_threshold`, each split is
cut into `seq_len` samples and its last partial sample is dropped.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from streaming import StreamingDataset

from launcher.cli import main
from trainer.data.prepare import PrepareOptions, run_prepare, stdlib_corpus_glob
from trainer.data.prepare.clean import digest_fraction, text_digest

EOS = "<|endoftext|>"
WORDS = (
    "the of model token shard train value sample batch node loss step data text corpus packing "
    "stream hash split window layer vector gradient optimizer checkpoint resume cluster queue"
).split()


def _text(seed: int, sentences: int = 8) -> str:
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
        for _ in range(sentences)
    ]
    return "\n".join(lines)


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)


def build_corpus(root: Path) -> list[str]:
    """Write the planted corpus; return the kept documents' normalised texts in prepare's order.

    20 files, 25 documents: 12 distinct .txt (one with a BOM), 2 duplicates (one only after line-ending/trailing
    whitespace normalisation), 3 short files (one empty, one whitespace), 1 binary, a .jsonl with
    6 documents (kept, duplicate, short, not UTF-8, kept with a literal EOS string, kept with CRLF)
    and a blank line, and a gzipped .txt.
    """
    texts = [_text(seed) for seed in range(12)]
    for i, text in enumerate(texts):
        _write(root / f"a_{i:02d}.txt", ("\ufeff" if i == 11 else "") + text + "\n")
    _write(root / "b_dup.txt", texts[3])
    _write(root / "c_dup_crlf.txt", texts[5].replace("\n", "\r\n") + "  \r\n\r\n")
    _write(root / "d_short.txt", "hi there")
    _write(root / "e_empty.txt", "")
    _write(root / "f_spaces.txt", " \n\t\n")
    _write(root / "g_binary.bin", bytes(range(256)) * 4)
    j0, j1 = _text(100), f"Before {EOS} after. " + _text(101)
    j2 = _text(102).replace("\n", "\r\n")
    lines = [
        json.dumps({"text": j0}).encode(),
        b"",
        json.dumps({"text": texts[3]}).encode(),
        json.dumps({"text": "tiny"}).encode(),
        b'{"text": "\xff\xfe broken"}',
        json.dumps({"text": j1}).encode(),
        json.dumps({"text": j2, "id": 7}).encode(),
    ]
    _write(root / "h.jsonl", b"\n".join(lines) + b"\n")
    g0 = _text(200)
    _write(root / "i.txt.gz", gzip.compress(g0.encode()))
    return [*texts, j0, j1, j2.replace("\r\n", "\n"), g0]


EXPECTED_COUNTS = {
    "files": 20,
    "documents": 25,
    "dropped_short": 4,
    "dropped_undecodable": 2,
    "duplicates": 3,
    "kept_documents": 16,
}


def read_split(folder: Path) -> list[np.ndarray]:
    """Every sample of an MDS split in order, read by a plain StreamingDataset (which refuses an
    empty split, so that one is read as [] from its index)."""
    if not json.loads((folder / "index.json").read_text())["shards"]:
        return []
    dataset = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    return [dataset[i]["tokens"] for i in range(dataset.num_samples)]


def expected_streams(out: Path, texts: list[str]) -> tuple[list[int], list[int]]:
    """The train and val token streams (each document + EOS) that prepare must have packed."""
    from transformers import AutoTokenizer

    stats = json.loads((out / "prepare.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    train: list[int] = []
    val: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
        is_val = digest_fraction(text_digest(text)) < stats["val_threshold"]
        (val if is_val else train).extend([*ids, tokenizer.eos_token_id])
    return train, val


def assert_round_trip(out: Path, texts: list[str]) -> dict:
    """Decoded samples = the expected streams cut into seq_len samples, tails shorter than seq_len."""
    stats = json.loads((out / "prepare.json").read_text())
    seq_len = stats["seq_len"]
    train, val = expected_streams(out, texts)
    for name, stream in (("train", train), ("val", val)):
        samples = read_split(out / name)
        assert len(samples) == stats[f"{name}_samples"] == len(stream) // seq_len
        assert all(
            sample.shape == (seq_len,) and sample.dtype == np.dtype(stats["dtype"]) for sample in samples
        )
        written = np.concatenate(samples).tolist() if samples else []
        assert written == stream[: len(samples) * seq_len]
    assert stats["tokens"] == (stats["train_samples"] + stats["val_samples"]) * seq_len
    assert stats["tokens_tokenized"] == len(train) + len(val)
    assert stats["tokens_dropped_tail"] == len(train) % seq_len + len(val) % seq_len
    return stats


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(*args: str) -> int:
    return main(["prepare", *args])


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line: last on stderr, after at most some log lines, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("llm-train: error: ")] == lines[-1:], lines
    return lines[-1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


def prepare_corpus(root: Path, out: Path, workers: int) -> dict:
    return run_prepare(
        PrepareOptions(
            inputs=[str(root / "*")],
            out=out,
            tokenizer="bpe:300",
            seq_len=32,
            val_fraction=0.2,
            min_chars=20,
            workers=workers,
        )
    )


@pytest.fixture(scope="module")
def prepared(corpus: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "data"
    return out, prepare_corpus(corpus[0], out, workers=1)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF tokenizer folder (byte-level BPE, eos set) with a real model_max_length of 64."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_text(seed) for seed in range(50)], trainer=trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, model_max_length=64).save_pretrained(
        folder
    )
    return folder


def test_prepare_counts_are_exact(prepared: tuple[Path, dict]) -> None:
    out, stats = prepared
    assert {key: stats[key] for key in EXPECTED_COUNTS} == EXPECTED_COUNTS
    assert stats == json.loads((out / "prepare.json").read_text())
    assert stats["train_documents"] + stats["val_documents"] == stats["kept_documents"]
    assert (stats["seq_len"], stats["tokenizer"], stats["dtype"], stats["eos_id"]) == (
        32,
        "bpe:300",
        "uint16",
        0,
    )
    assert not list(out.parent.glob("data.tmp-*"))


def test_decoded_samples_are_the_kept_documents_in_order_each_followed_by_eos(
    prepared: tuple[Path, dict], corpus: tuple[Path, list[str]]
) -> None:
    out, _ = prepared
    stats = assert_round_trip(out, corpus[1])
    assert stats["train_samples"] > 0 and stats["val_samples"] > 0
    # The literal "<|endoftext|>" inside a document is text: EOS only ends documents.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    literal = tokenizer(corpus[1][13], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.eos_token_id not in literal


def test_tokenizer_folder_loads_with_autotokenizer(prepared: tuple[Path, dict]) -> None:
    from transformers import AutoTokenizer

    out, stats = prepared
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == stats["eos_id"]
    assert len(tokenizer) == stats["vocab_size"] == 300
    assert tokenizer.decode(tokenizer("Train the model.")["input_ids"]) == "Train the model."


def test_plain_streaming_dataset_reads_the_shards_with_hashes(prepared: tuple[Path, dict]) -> None:
    out, stats = prepared
    for split in ("train", "val"):
        index = json.loads((out / split / "index.json").read_text())
        for shard in index["shards"]:
            assert shard["column_names"] == ["tokens"]
            assert shard["column_encodings"] == ["ndarray:uint16"]
            assert shard["hashes"] == ["sha1", "xxh64"]
            assert set(shard["raw_data"]["hashes"]) == {"sha1", "xxh64"}
    dataset = StreamingDataset(local=str(out / "train"), shuffle=False, batch_size=4)
    samples = list(dataset)
    assert len(samples) == stats["train_samples"]
    assert all(sample["tokens"].shape == (32,) for sample in samples)


def test_workers_2_writes_byte_identical_shards_to_workers_1(
    prepared: tuple[Path, dict], corpus: tuple[Path, list[str]], tmp_path: Path
) -> None:
    out_1, _ = prepared
    prepare_corpus(corpus[0], tmp_path / "data", workers=2)
    assert tree(tmp_path / "data") == tree(out_1)


def test_stdlib_corpus_with_bpe_512_round_trips(tmp_path: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["bisect.py", "colorsys.py", "heapq.py", "keyword.py", "textwrap.py", "this.py"]
    stats = run_prepare(
        PrepareOptions(
            inputs=[str(stdlib / name) for name in names],
            out=tmp_path / "std",
            tokenizer="bpe:512",
            seq_len=64,
            workers=2,
        )
    )
    assert (stats["files"], stats["documents"], stats["kept_documents"]) == (6, 6, 6)
    assert stats["vocab_size"] == 512 and stats["val_samples"] >= 1
    texts = [(stdlib / name).read_text("utf-8").replace("\r\n", "\n").rstrip() for name in names]
    assert_round_trip(tmp_path / "std", texts)


def test_stdlib_corpus_glob_finds_the_standard_library() -> None:
    (pattern,) = stdlib_corpus_glob()
    files = sorted(Path(pattern).parent.glob(Path(pattern).name))
    assert Path(pattern).parent / "os.py" in files
    size = sum(f.stat().st_size for f in files)
    assert 1_000_000 < size < 20_000_000
    assert not any("test" in f.parts or "site-packages" in f.parts for f in files)


def test_hf_dataset_built_on_disk_with_split_field_and_zstd(
    tmp_path: Path, small_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets

    rows = [_text(300 + i) for i in range(10)]
    validation = datasets.Dataset.from_dict(
        {"body": [*rows, rows[2], None, "short"], "n": list(range(13))}
    )  # 13 rows: 10 kept, a duplicate, a null, one under --min-chars
    train = datasets.Dataset.from_dict({"body": ["unused"], "n": [0]})
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "data"
    rc = run_cli(
        "--hf-dataset",
        str(tmp_path / "hf"),
        "--split",
        "validation",
        "--text-field",
        "body",
        "--out",
        str(out),
        "--tokenizer",
        str(small_tokenizer),
        "--seq-len",
        "16",
        "--min-chars",
        "10",
        "--compression",
        "zstd",
        "--workers",
        "2",
    )
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats == json.loads((out / "prepare.json").read_text())
    assert (stats["files"], stats["documents"], stats["duplicates"], stats["dropped_short"]) == (0, 13, 1, 2)
    assert stats["kept_documents"] == 10 and stats["compression"] == "zstd"
    assert sorted(p.name for p in (out / "train").iterdir()) == ["index.json", "shard.00000.mds.zstd"]
    assert_round_trip(out, rows)


@pytest.mark.parametrize("val_fraction", [1e-9, 0.0])
def test_val_gets_one_sample_unless_val_fraction_is_zero(
    val_fraction: float, corpus: tuple[Path, list[str]], small_tokenizer: Path, tmp_path: Path
) -> None:
    stats = run_prepare(
        PrepareOptions(
            inputs=[str(corpus[0] / "a_*.txt")],
            out=tmp_path / "data",
            tokenizer=str(small_tokenizer),
            seq_len=32,
            val_fraction=val_fraction,
            workers=1,
        )
    )
    assert stats["train_samples"] >= 1
    if val_fraction:
        assert stats["val_samples"] >= 1 and stats["val_threshold"] > val_fraction
    else:
        assert stats["val_samples"] == 0 == stats["val_documents"]
    assert_round_trip(tmp_path / "data", corpus[1][:12])


def test_no_dedupe_keeps_duplicates(
    corpus: tuple[Path, list[str]], small_tokenizer: Path, tmp_path: Path
) -> None:
    stats = run_prepare(
        PrepareOptions(
            inputs=[str(corpus[0] / "a_*.txt"), str(corpus[0] / "b_dup.txt")],
            out=tmp_path / "data",
            tokenizer=str(small_tokenizer),
            seq_len=32,
            dedupe=False,
            workers=1,
        )
    )
    assert (stats["documents"], stats["duplicates"], stats["kept_documents"]) == (13, 0, 13)


def _raise_after(monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.data.prepare.pipeline as pipeline

    write_splits = pipeline.write_splits

    def write_then_fail(*args: object, **kwargs: object) -> object:
        write_splits(*args, **kwargs)
        raise RuntimeError("simulated crash after the shards were written")

    monkeypatch.setattr(pipeline, "write_splits", write_then_fail)


def test_failed_prepare_leaves_no_output_and_keeps_an_old_dataset(
    prepared: tuple[Path, dict],
    corpus: tuple[Path, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    _raise_after(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_corpus(corpus[0], tmp_path / "new", workers=1)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    shutil.copytree(prepared[0], old)
    before = tree(old)
    options = PrepareOptions(
        inputs=[str(corpus[0] / "a_*.txt")], out=old, tokenizer="bpe:300", seq_len=32, overwrite=True
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_prepare(options)
    assert tree(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_killed_prepare_never_leaves_a_complete_looking_folder(
    corpus: tuple[Path, list[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "data"
    script = f"""
import os
import trainer.data.prepare.pipeline as pipeline
from trainer.data.prepare import PrepareOptions

write_splits = pipeline.write_splits
def write_then_die(*args, **kwargs):
    write_splits(*args, **kwargs)
    os._exit(9)  # like SIGKILL: no cleanup runs
pipeline.write_splits = write_then_die
pipeline.run_prepare(PrepareOptions(inputs=[{str(corpus[0] / "a_*.txt")!r}], out={str(out)!r},
                                    tokenizer="bpe:300", seq_len=32, workers=1))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 9, result.stderr
    assert not out.exists()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith("data.tmp-") and (leftover / "train").is_dir()
    assert not (leftover / "prepare.json").exists()
    # A later prepare into the same folder works and warns about the leftover.
    stats = run_prepare(
        PrepareOptions(
            inputs=[str(corpus[0] / "a_*.txt")], out=out, tokenizer="bpe:300", seq_len=32, workers=1
        )
    )
    assert json.loads((out / "prepare.json").read_text()) == stats
    assert any(leftover.name in r.message and "interrupted" in r.message for r in caplog.records)


def test_input_folder_holding_the_output_does_not_read_the_output(
    small_tokenizer: Path, tmp_path: Path
) -> None:
    for seed in range(4):
        _write(tmp_path / "texts" / f"{seed}.txt", _text(seed))
    options = PrepareOptions(
        inputs=[str(tmp_path / "texts")],
        out=tmp_path / "texts" / "ds",
        tokenizer=str(small_tokenizer),
        seq_len=16,
    )
    first = run_prepare(options)
    options.overwrite = True
    assert run_prepare(options) == first
    assert (first["files"], first["kept_documents"]) == (4, 4)


def test_overwrite_replaces_an_existing_dataset(
    corpus: tuple[Path, list[str]], small_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    args = ["--input", str(corpus[0] / "a_0*.txt"), "--out", str(out), "--tokenizer", str(small_tokenizer)]
    assert run_cli(*args, "--seq-len", "16", "--workers", "1") == 0
    capsys.readouterr()
    assert run_cli(*args, "--seq-len", "32", "--workers", "1") == 2
    assert "--overwrite" in error_line(capsys)
    assert run_cli(*args, "--seq-len", "32", "--workers", "1", "--overwrite") == 0
    assert json.loads((out / "prepare.json").read_text())["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def prepare_error(
    capsys: pytest.CaptureFixture[str], out: Path, *args: str, tokenizer: str = "bpe:300"
) -> str:
    """Run `llm-train prepare` (`args` name the source and any extra options); it must exit 2 with
    one error line, which is returned."""
    if "--seq-len" not in args:
        args = (*args, "--seq-len", "8")
    assert run_cli(*args, "--out", str(out), "--tokenizer", tokenizer) == 2
    return error_line(capsys)


def test_error_missing_input_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope" / "corpus.txt"
    line = prepare_error(capsys, tmp_path / "o", "--input", str(missing))
    assert str(missing) in line and "no such file" in line


def test_error_glob_matching_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pattern = str(tmp_path / "*.nothing")
    line = prepare_error(capsys, tmp_path / "o", "--input", pattern)
    assert pattern in line and "matched no files" in line


def test_error_no_documents_left_after_filtering(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "in" / "a.txt", "short")
    _write(tmp_path / "in" / "b.txt", "")
    line = prepare_error(capsys, tmp_path / "o", "--input", str(tmp_path / "in"), "--min-chars", "10")
    assert "no documents left after filtering" in line and "2 read" in line and "--min-chars" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_error_seq_len_larger_than_tokenizer_limit(
    corpus: tuple[Path, list[str]], small_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = ("--input", str(corpus[0] / "a_00.txt"))
    line = prepare_error(capsys, tmp_path / "o", *source, "--seq-len", "128", tokenizer=str(small_tokenizer))
    assert "--seq-len 128" in line and "64" in line
    assert "--seq-len 2097152" in prepare_error(capsys, tmp_path / "o", *source, "--seq-len", str(2**21))


def test_error_output_already_holds_a_dataset(
    prepared: tuple[Path, dict], corpus: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out = prepared[0]
    before = tree(out)
    line = prepare_error(capsys, out, "--input", str(corpus[0] / "*"), "--seq-len", "32")
    assert str(out) in line and "already holds a dataset" in line and "--overwrite" in line
    assert tree(out) == before


def test_error_output_is_a_non_empty_folder_without_a_dataset(
    corpus: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "mine" / "notes.txt", "keep me")
    line = prepare_error(capsys, tmp_path / "mine", "--input", str(corpus[0] / "a_00.txt"), "--overwrite")
    assert "non-empty folder" in line
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_error_unknown_tokenizer_name(
    corpus: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "no-such-org/no-such-tokenizer-xyz"
    line = prepare_error(capsys, tmp_path / "o", "--input", str(corpus[0] / "a_00.txt"), tokenizer=name)
    assert f"--tokenizer {name}" in line and "bpe:VOCAB" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec", ["bpe:abc", "bpe:100"])
def test_error_bad_bpe_vocab(spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "a.txt", _text(1))
    assert f"--tokenizer {spec!r}" in prepare_error(
        capsys, tmp_path / "o", "--input", str(tmp_path / "a.txt"), tokenizer=spec
    )


@pytest.mark.parametrize("fraction", ["1.5", "-0.1", "1", "nan"])
def test_error_bad_val_fraction(fraction: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "a.txt", _text(1))
    line = prepare_error(
        capsys, tmp_path / "o", "--input", str(tmp_path / "a.txt"), "--val-fraction", fraction
    )
    assert f"--val-fraction {float(fraction)}" in line and "[0, 1)" in line


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('{"text": "fine document here"}\n{not json}\n', [":2: not valid JSON"]),
        ('{"content": "a document in another field"}\n', [":1: no field 'text'", "content", "--text-field"]),
    ],
)
def test_error_bad_jsonl_line_names_file_line_and_fix(
    lines: str, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "d.jsonl", lines)
    line = prepare_error(capsys, tmp_path / "o", "--input", str(tmp_path / "d.jsonl"))
    assert all(
        f"{tmp_path / 'd.jsonl'}{part}" in line if part.startswith(":") else part in line for part in expected
    )
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))


def test_error_hf_dataset_without_the_text_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": [_text(1)]}).save_to_disk(str(tmp_path / "hf"))
    line = prepare_error(capsys, tmp_path / "o", "--hf-dataset", str(tmp_path / "hf"))
    assert "no column 'text'" in line and "body" in line and "--text-field" in line


def test_error_from_the_installed_command_is_one_line_without_traceback(tmp_path: Path) -> None:
    command = Path(sys.executable).parent / "llm-train"
    missing = tmp_path / "missing.txt"
    args = [
        "prepare",
        "--input",
        str(missing),
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        "bpe:300",
        "--seq-len",
        "8",
    ]
    result = subprocess.run([str(command), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"llm-train: error: --input {missing}: no such file or folder; check the path"
    ]


# --- --append-to ---------------------------------------------------------------------------------

NEW_TEXTS = [_text(seed, sentences=12) for seed in range(300, 312)]


@pytest.fixture(scope="module")
def appended(
    prepared: tuple[Path, dict], corpus: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """`prepared` plus 14 new files, via the CLI: 12 new documents, one of them twice, and one that the
    parent holds already (kept: dedupe covers the new documents only)."""
    parent = prepared[0]
    root = tmp_path_factory.mktemp("new-documents")
    for index, text in enumerate(NEW_TEXTS):
        _write(root / f"n_{index:02d}.txt", text)
    _write(root / "n_dup.txt", NEW_TEXTS[0])
    _write(root / "n_old.txt", corpus[1][0])
    before = tree(parent)
    out = tmp_path_factory.mktemp("appended") / "v2"
    args = ["--input", str(root / "*"), "--append-to", str(parent), "--out", str(out), "--min-chars", "20"]
    assert run_cli(*args, "--workers", "1") == 0
    stats = json.loads((out / "prepare.json").read_text())
    return {"out": out, "stats": stats, "texts": [*NEW_TEXTS, corpus[1][0]], "parent_before": before}


def test_append_keeps_the_parent_shards_byte_identical_and_the_parent_untouched(
    prepared: tuple[Path, dict], appended: dict
) -> None:
    parent, out = prepared[0], appended["out"]
    assert tree(parent) == appended["parent_before"]
    for split in ("train", "val"):
        old = json.loads((parent / split / "index.json").read_text())["shards"]
        new = json.loads((out / split / "index.json").read_text())["shards"]
        assert new[: len(old)] == old  # same names, sizes and hashes
        for shard in old:
            name = shard["raw_data"]["basename"]
            assert (out / split / name).read_bytes() == (parent / split / name).read_bytes()
            assert (out / split / name).stat().st_ino == (parent / split / name).stat().st_ino  # a hard link
        names = [shard["raw_data"]["basename"] for shard in new]
        assert len(set(names)) == len(names) and sorted(
            p.name for p in (out / split).glob("*.mds")
        ) == sorted(names)
    assert len(json.loads((out / "train" / "index.json").read_text())["shards"]) > len(
        json.loads((parent / "train" / "index.json").read_text())["shards"]
    )


def test_append_adds_the_new_documents_split_and_packed_by_the_parents_rules(
    prepared: tuple[Path, dict], appended: dict
) -> None:
    from transformers import AutoTokenizer

    parent, parent_stats = prepared
    out, stats, texts = appended["out"], appended["stats"], appended["texts"]
    new = stats["appended"]
    assert (new["documents"], new["duplicates"], new["kept_documents"]) == (14, 1, 13)
    assert (stats["parent"], stats["version"], stats["val_threshold"]) == (
        str(parent),
        2,
        parent_stats["val_threshold"],
    )
    for key in ("documents", "duplicates", "kept_documents", "tokens", "train_samples", "val_samples"):
        assert stats[key] == parent_stats[key] + new[key], key
    train, val = expected_streams(out, texts)  # the new documents alone, split by the parent's threshold
    seq_len = stats["seq_len"]
    for name, stream in (("train", train), ("val", val)):
        samples = read_split(out / name)
        old = read_split(parent / name)
        assert len(samples) == stats[f"{name}_samples"] == len(old) + len(stream) // seq_len
        assert [s.tolist() for s in samples[: len(old)]] == [s.tolist() for s in old]
        written = np.concatenate(samples[len(old) :]).tolist() if len(samples) > len(old) else []
        assert written == stream[: len(written)]
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    first_new = tokenizer.decode(read_split(out / "train")[parent_stats["train_samples"]])
    assert any(text.startswith(first_new) for text in NEW_TEXTS)  # a new document's first 32 tokens
    assert tree(out / "tokenizer") == tree(parent / "tokenizer")


def test_appended_dataset_is_read_whole_by_the_training_loader(appended: dict) -> None:
    from trainer.config import DataConfig
    from trainer.data.loader import build_loader

    out = appended["out"]
    for split in ("train", "val"):
        loader = build_loader(DataConfig(path=str(out)), split, 1, 0, shuffle=False)
        read = [batch["input_ids"][0].tolist() for batch in loader.iter_batches()]
        assert read == [sample.tolist() for sample in read_split(out / split)]
        assert len(read) == appended["stats"][f"{split}_samples"]


def test_appending_again_continues_the_versions_and_the_shard_numbers(appended: dict, tmp_path: Path) -> None:
    v2 = appended["out"]
    before = tree(v2)
    _write(tmp_path / "more.txt", _text(400, sentences=40))
    stats = run_prepare(
        PrepareOptions(inputs=[str(tmp_path / "more.txt")], out=tmp_path / "v3", append_to=v2, workers=1)
    )
    assert (stats["version"], stats["parent"]) == (3, str(v2))
    assert stats["train_samples"] == appended["stats"]["train_samples"] + stats["appended"]["train_samples"]
    shards = json.loads((tmp_path / "v3" / "train" / "index.json").read_text())["shards"]
    names = [shard["raw_data"]["basename"] for shard in shards]
    assert names == [f"shard.{index:05d}.mds" for index in range(len(names))]
    assert tree(v2) == before


def test_append_to_a_compressed_dataset_renames_the_compressed_shards(
    corpus: tuple[Path, list[str]], small_tokenizer: Path, tmp_path: Path
) -> None:
    inputs = [str(corpus[0] / "a_*.txt")]
    tokenizer = str(small_tokenizer)
    run_prepare(
        PrepareOptions(
            inputs=inputs, out=tmp_path / "v1", tokenizer=tokenizer, seq_len=16, compression="zstd", workers=1
        )
    )
    for seed in range(500, 503):
        _write(tmp_path / "new" / f"{seed}.txt", _text(seed))
    stats = run_prepare(
        PrepareOptions(
            inputs=[str(tmp_path / "new")], out=tmp_path / "v2", append_to=tmp_path / "v1", workers=1
        )
    )
    assert stats["appended"]["compression"] == "zstd"
    for split in ("train", "val"):
        shards = json.loads((tmp_path / "v2" / split / "index.json").read_text())["shards"]
        for index, shard in enumerate(shards):
            assert shard["zip_data"]["basename"] == f"shard.{index:05d}.mds.zstd"
            assert (tmp_path / "v2" / split / shard["zip_data"]["basename"]).is_file()
        assert len(read_split(tmp_path / "v2" / split)) == stats[f"{split}_samples"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--tokenizer", "bpe:300"], "--tokenizer bpe:300: --append-to tokenizes with"),
        (["--seq-len", "16"], "--seq-len 16: --append-to"),
        (["--val-fraction", "0.5"], "--val-fraction 0.5: --append-to splits new documents by"),
    ],
)
def test_error_append_to_with_an_option_the_parent_decides(
    prepared: tuple[Path, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    expected: str,
) -> None:
    _write(tmp_path / "a.txt", _text(1))
    args = ["--input", str(tmp_path / "a.txt"), "--append-to", str(prepared[0]), "--out", str(tmp_path / "o")]
    assert run_cli(*args, *extra) == 2
    line = error_line(capsys)
    assert expected in line and "leave" in line
    assert not (tmp_path / "o").exists()


def test_error_append_to_itself_or_to_a_folder_that_is_no_dataset(
    prepared: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = prepared[0]
    before = tree(parent)
    _write(tmp_path / "a.txt", _text(1))
    source = ["--input", str(tmp_path / "a.txt")]
    assert run_cli(*source, "--append-to", str(parent), "--out", str(parent), "--overwrite") == 2
    assert f"--out {parent}: must be a new folder outside --append-to" in error_line(capsys)
    assert tree(parent) == before
    assert run_cli(*source, "--append-to", str(tmp_path), "--out", str(tmp_path / "o")) == 2
    assert f"--append-to {tmp_path}: not a dataset made by `llm-train prepare`" in error_line(capsys)
    assert run_cli(*source, "--out", str(tmp_path / "o"), "--seq-len", "8") == 2
    assert "--tokenizer is required (or --append-to DIR" in error_line(capsys)
