"""Logging with the rank in every line; rank 0 to the terminal, every rank to its own file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int = 0, log_file: Path | None = None, console: bool | None = None) -> None:
    """Configure the root logger for this process.

    `console` defaults to rank 0 only, so that N ranks do not print N copies of every line.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    rank_filter = _RankFilter(rank)
    formatter = logging.Formatter(_FORMAT, datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = []
    if console if console is not None else rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    # streaming explains its defaults at INFO on every dataset construction.
    logging.getLogger("streaming").setLevel(logging.WARNING)
    for handler in handlers:
        handler.addFilter(rank_filter)
        handler.setFormatter(formatter)
        root.addHandler(handler)
