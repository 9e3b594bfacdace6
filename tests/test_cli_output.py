"""What commands print in the small cases: samples without blank runs, errors that name their cause."""

from __future__ import annotations

import pytest

from launcher.cli import main as cli_main
from trainer.errors import offline_hint
from trainer.models.generation import tidy_sample


def test_a_sample_has_no_runs_of_blank_lines():
    text = "def \n  \n\n\n    return 1\n\n\n\nx = 2\n\n\n"
    assert tidy_sample("def ", text) == "def \n\n    return 1\n\nx = 2"


@pytest.mark.parametrize("text", ["", "prompt", "prompt\n\n\n   \n"])
def test_an_empty_continuation_is_said_not_printed_as_blank_lines(text):
    assert tidy_sample("prompt", text) == "prompt\n(no text generated: the model ended the sample at once)"


def test_the_offline_hint_names_the_variable_that_is_set(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert offline_hint() == "check the name and the network"
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert offline_hint().startswith("TRANSFORMERS_OFFLINE=1 is set, so only the local HF cache is read")


def test_status_of_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    assert cli_main(["status", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("value, seconds", [("30", 1800), ("1:30", 90), ("02:00:00", 7200), ("1-12", 129600)])
def test_time_limits_in_slurms_formats(value, seconds):
    from launcher.profiles import parse_time

    assert parse_time(value) == seconds
