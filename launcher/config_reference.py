"""docs/config.md, generated from the config dataclasses of trainer/config_schema.py and their field docstrings.

`python -m launcher.config_reference` writes docs/config.md; `--check` exits 1 when it is out of date.
A field without a docstring is an error: every config key is documented where it is defined.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import sys
import typing
from pathlib import Path

from trainer import config_schema as config_module

DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"
YAML_NAMES = {"async_save": "async"}  # fields named after a Python keyword's YAML key
COMMAND = "python -m launcher.config_reference"


def field_docs(source: str) -> dict[str, dict[str, str]]:
    """{class name: {field name: its docstring on one line}} from the string literal after each field."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            body, found = node.body, docs.setdefault(node.name, {})
            for item, after in zip(body, body[1:], strict=False):
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                        found[item.target.id] = " ".join(inspect.cleandoc(str(after.value.value)).split())
    return docs


def _default(field: dataclasses.Field) -> str:
    """A field's default as a table cell: `required` for MISSING, YAML spelling for null and booleans."""
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    elif field.default is config_module.MISSING or field.default is dataclasses.MISSING:
        return "required"
    else:
        value = field.default
    if value is None:
        return "`null`"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _item_class(cls: type, field: dataclasses.Field) -> type | None:
    """The dataclass of a `list[SomeConfig]` field's items, else None."""
    hint = typing.get_type_hints(cls)[field.name]
    args = typing.get_args(hint) if typing.get_origin(hint) is list else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def _rows(cls: type, prefix: str, docs: dict[str, dict[str, str]]) -> list[str]:
    """One table row per field of `cls` (and of list items that are dataclasses), keys under `prefix`."""
    rows = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{YAML_NAMES.get(field.name, field.name)}"
        doc = docs.get(cls.__name__, {}).get(field.name)
        if not doc:
            raise ValueError(
                f"{key} ({cls.__name__}.{field.name}) has no docstring in trainer/config_schema.py"
            )
        doc = re.sub(r"^YAML key `[^`]+`: (.)", lambda match: match[1].upper(), doc).replace("|", "\\|")
        rows.append(f"| `{key}` | {_default(field)} | {doc} |")
        item = _item_class(cls, field)
        if item is not None:
            rows += _rows(item, f"{key}[]", docs)
    return rows


def render() -> str:
    """The markdown of docs/config.md: an introduction, then one table per section of `Config`."""
    docs = field_docs(inspect.getsource(config_module))
    shapes = "; ".join(
        f"{family.name}: "
        + ", ".join(
            f"`{name}` {shape['n_layer']}x{shape['n_embd']}" for name, shape in family.presets.items()
        )
        for family in config_module.FAMILIES.values()
        if family.presets
    )
    presets = ", ".join(f"`{path.stem}`" for path in sorted(config_module.CONFIGS_DIR.glob("*.yaml")))
    lines = [
        "# Config reference",
        "",
        f"<!-- Generated from trainer/config_schema.py by `{COMMAND}`; do not edit by hand. -->",
        "",
        "A run is configured by one YAML file with the sections below (`run:`, `data:`, ...). Any key can be",
        "overridden on the command line as `section.key=value`, e.g. `train.lr=3e-4`. Unknown keys and values of",
        "the wrong type are user errors: the command exits 2 with one line naming the key.",
        "",
        f"Presets in `configs/` (pass the name instead of a path): {presets}.",
        f"Model shapes of `model.size` per `model.arch` (layers x width): {shapes}.",
        "The batch arithmetic and the presets are explained in [training.md](training.md).",
    ]
    for section in dataclasses.fields(config_module.Config):
        cls = section.default_factory
        assert callable(cls) and dataclasses.is_dataclass(cls), section.name
        lines += ["", f"## {section.name}", "", "| key | default | meaning |", "|---|---|---|"]
        lines += _rows(cls, section.name, docs)  # type: ignore[arg-type]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Write docs/config.md atomically, or with `--check` report whether it matches the code."""
    text = render()
    if "--check" in argv:
        if (DOCS_PATH.read_text() if DOCS_PATH.is_file() else None) != text:
            print(
                f"docs/config.md is out of date with trainer/config_schema.py; run `{COMMAND}`",
                file=sys.stderr,
            )
            return 1
        return 0
    DOCS_PATH.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOCS_PATH.with_name(f".{DOCS_PATH.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, DOCS_PATH)  # a reader sees the old file or the new one, never half of one
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
