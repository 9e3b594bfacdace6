"""The demo corpus: the Python standard library source of the running interpreter (no network)."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_corpus_glob() -> list[str]:
    """Globs for the demo corpus: the top-level `*.py` modules of the standard library.

    The top level alone (about 170 files, 4.7 MB on CPython 3.11) is real, varied text, leaves out
    the `test/` packages and `site-packages`, and prepares in seconds with 2 workers.
    """
    return [str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")]
