"""The slowest tests of a suite run: `python tests/slowest.py DURATIONS_FILE [N]`.

DURATIONS_FILE holds one `SECONDS<TAB>PHASE<TAB>TEST` line per test phase (setup, call, teardown), appended by
every pytest process of the run (tests/conftest.py, $LLM_TEST_DURATIONS_FILE); the N slowest (25) are printed
as pytest's --durations prints them, then the 15 test files that took longest, with the sum of all phases.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(path: str, count: int = 25) -> None:
    rows = []
    for line in Path(path).read_text().splitlines():
        seconds, phase, test = line.split("\t", 2)
        rows.append((float(seconds), phase, test))
    rows.sort(reverse=True)
    total = sum(seconds for seconds, _, _ in rows)
    print(f"{'=' * 20} slowest {count} durations (all pytest processes of this run) {'=' * 20}")
    for seconds, phase, test in rows[:count]:
        print(f"{seconds:8.2f}s {phase:<8} {test}")
    files: dict[str, float] = {}
    for seconds, _, test in rows:
        name = test.split("::", 1)[0]
        files[name] = files.get(name, 0.0) + seconds
    print(f"{'=' * 20} the 15 slowest test files {'=' * 20}")
    for name, seconds in sorted(files.items(), key=lambda item: item[1], reverse=True)[:15]:
        print(f"{seconds:8.2f}s {name}")
    print(f"{len(rows)} test phases, {total:.0f} s in all (the processes ran at the same time)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
