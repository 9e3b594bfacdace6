"""`llm-train`: one entry point, one sub-command module per verb under launcher/commands/.

Exit codes: 0 success, 2 user error (one line on stderr naming the key, path or value and the fix),
1 internal error (traceback). `--debug` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from trainer.errors import UserError

COMMANDS = (
    "prepare", "train", "plan", "submit", "status", "doctor", "cancel", "eval", "export", "generate", "demo",
    "compare", "plot",
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-train", description="Train GPT-2 models on SLURM clusters or a laptop.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"launcher.commands.{name}")
        module.register(subparsers)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argparse, except that `key=value` overrides may also follow options (`train C --nproc 2 a=1`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = parse_args(argv)
        return int(args.handler(args) or 0)
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"llm-train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
