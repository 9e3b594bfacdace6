"""A small, real instruction set made offline: standard-library functions as questions, their docstrings
as answers (chat format). The source files are parsed, never imported, so nothing of them runs.

    python -m trainer.data.prepare.stdlib_instructions OUT.jsonl [--limit N]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

QUESTION = "What does `{call}` from the `{module}` module do?"


def _summary(docstring: str) -> str:
    """The docstring's first paragraph, on one line."""
    paragraph = docstring.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def stdlib_records(limit: int | None = None) -> Iterator[dict]:
    """Chat records of the public, documented top-level functions of the standard library's modules."""
    count = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[!_]*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node)
            if not docstring or len(_summary(docstring)) < 20:
                continue
            call = f"{node.name}({', '.join(arg.arg for arg in node.args.args)})"
            question = QUESTION.format(call=call, module=path.stem)
            yield {"messages": [{"role": "user", "content": question},
                                {"role": "assistant", "content": _summary(docstring)}]}  # fmt: skip
            count += 1
            if limit is not None and count >= limit:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="at most this many records")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    lines = [json.dumps(record) for record in stdlib_records(args.limit)]
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    print(f"wrote {len(lines)} records to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
