"""`llm-train plot RUN_DIR [RUN_DIR ...] --out FILE.png [--width PX] [--height PX]`: loss curves."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot", help="training and validation loss vs tokens of one or several runs, with restarts marked"
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (one colour each)")
    parser.add_argument("--out", required=True, help="image to write: .png (or .svg, .pdf)")
    parser.add_argument("--width", type=int, default=1200, help="pixels (default 1200)")
    parser.add_argument("--height", type=int, default=800, help="pixels (default 800)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.plot import plot_runs

    runs = plot_runs(args.run_dirs, args.out, args.width, args.height)
    for curves in runs:
        events = ", ".join(f"{event}@{step}" for event, step, _tokens in curves.events) or "no events"
        points = sum(len(points) for points in curves.val.values())
        print(f"{curves.name}: {len(curves.train)} train points, {points} val points, {events}")
    print(f"wrote {args.out} ({args.width}x{args.height} px)")
    return 0
