"""Short, distinct display names for folders (datasets, runs, models) in tables, JSON keys and legends.

Pure Python without torch: the login-node `llm-train plot` imports this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """Each folder's name; where two share a name, the shortest path suffix that tells them apart.

    `/a/data` and `/b/data` become `a/data` and `b/data`; the same folder given twice gets `#2`.
    """
    parts = [Path(path).resolve().parts[1:] or (str(path),) for path in paths]
    names = []
    for own in parts:
        depth = 1
        while depth < len(own) and any(other != own and other[-depth:] == own[-depth:] for other in parts):
            depth += 1
        names.append("/".join(own[-depth:]))
    seen: Counter[str] = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique
