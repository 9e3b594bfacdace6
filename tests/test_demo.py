"""`llm-train demo` end to end: prepare the stdlib corpus, train 2 processes, evaluate, summarise."""

from __future__ import annotations

import json

from launcher.cli import main as cli_main


def test_demo_trains_and_validation_perplexity_falls(tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path), "--minutes", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "demo summary" in out and "val perplexity" in out
    stats = json.loads((tmp_path / "data" / "prepare.json").read_text())
    assert stats["vocab_size"] == 4096 and stats["seq_len"] == 256 and stats["train_samples"] > 100
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_ppl" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == max(r["step"] for r in records)
    assert evals[-1]["val_ppl"] < 0.5 * evals[0]["val_ppl"], evals
    assert any(r.get("event") == "done" for r in records)
    assert (tmp_path / "model" / "model.safetensors").is_file() and (
        tmp_path / "model" / "tokenizer.json"
    ).is_file()
    assert "sample            def " in out
