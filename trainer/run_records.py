"""Reading a run's metrics.jsonl, torch-free: the login-node commands (status, plot) and the export's model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, skipping a line that is being written."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
