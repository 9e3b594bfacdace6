"""The documentation: the generated config reference matches the code, links resolve, the project is self-contained."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest

from launcher.config_reference import COMMAND, render
from trainer.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]
OUTSIDE = ("../shared", "SPEC.md", "steering repository")  # this file is the only one that may name them
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def config_keys() -> list[str]:
    """Every config key as docs/config.md spells it, list items as `data.streams[].path`."""

    def keys(cls: type, prefix: str) -> list[str]:
        found = []
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            key = f"{prefix}.{'async' if field.name == 'async_save' else field.name}"
            found.append(key)
            args = typing.get_args(hints[field.name])
            if typing.get_origin(hints[field.name]) is list and args and dataclasses.is_dataclass(args[0]):
                found += keys(args[0], f"{key}[]")
        return found

    return [
        key for section in dataclasses.fields(Config) for key in keys(section.default_factory, section.name)
    ]


def test_config_reference_is_generated_from_the_code():
    current = (DOCS / "config.md").read_text() if (DOCS / "config.md").is_file() else ""
    assert current == render(), (
        f"docs/config.md is out of date with trainer/config_schema.py; run `{COMMAND}`"
    )


def test_every_config_key_is_in_the_reference():
    reference = (DOCS / "config.md").read_text()
    missing = [key for key in config_keys() if f"| `{key}` |" not in reference]
    assert not missing, f"docs/config.md lacks {missing}; run `{COMMAND}`"
    assert "data.streams[].proportion" in config_keys()


def test_a_config_field_without_a_docstring_is_refused(monkeypatch):
    import launcher.config_reference as config_reference

    monkeypatch.setattr(config_reference, "field_docs", lambda source: {})
    with pytest.raises(ValueError, match="run.dir"):
        config_reference.render()


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / name for name in sorted(set(listed.split("\0"))) if name]


def test_no_file_points_outside_the_repository():
    this = Path(__file__).resolve()
    offenders = []
    for path in _tracked_files():
        if path.resolve() == this or not path.is_file():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        offenders += [f"{path.relative_to(ROOT)}: {needle}" for needle in OUTSIDE if needle in text]
    assert not offenders, "the project must stand alone; remove these references: " + "; ".join(offenders)


def test_every_relative_link_resolves():
    broken = []
    for page in MARKDOWN:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # a URL (http:, mailto:) or an anchor in the same page
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_readme_and_index_link_every_docs_page():
    pages = {path.name for path in DOCS.glob("*.md")} - {"README.md"}
    readme, index = (ROOT / "README.md").read_text(), (DOCS / "README.md").read_text()
    assert not [page for page in sorted(pages) if f"(docs/{page}" not in readme], (
        "README.md misses a docs page"
    )
    assert not [page for page in sorted(pages) if f"({page}" not in index], "docs/README.md misses a page"
    assert "(docs/README.md)" in readme and "(../BENCHMARKS.md)" in index


def test_readme_is_a_short_map():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 170, (
        f"README.md has {lines} lines; keep it a map (<= 170) and move reference text to docs/"
    )
