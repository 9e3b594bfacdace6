"""`llm-train plot`: training and validation loss against tokens for one or several runs, in one PNG.

Reads only RUN_DIR/metrics.jsonl (no torch: this runs on the login node). A run logged across requeues
repeats steps after each `start`; the last value of a step wins, as in the resumed run itself.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.run_status import check_run_dir
from trainer.atomic import atomic_write_bytes
from trainer.errors import UserError
from trainer.names import unique_names
from trainer.run_records import read_records

MARKED_EVENTS = ("preempted", "requeued", "resume", "rollback", "nonfinite", "spike")
EVENT_STYLES = {
    "preempted": ":",
    "requeued": "-.",
    "resume": "--",
    "rollback": (0, (1, 3)),
    "nonfinite": "-",
    "spike": "-",
}
DPI = 100
FORMATS = ("png", "svg", "pdf")
MIN_PIXELS, MAX_PIXELS = 100, 20000


@dataclass
class RunCurves:
    name: str
    train: list[tuple[int, float]]  # (tokens, loss), one point per step
    val: dict[str, list[tuple[int, float]]]  # "val" (the run's own evaluations) or NAME (`llm-train eval`)
    events: list[tuple[str, int, int]]  # (event, step, tokens) for MARKED_EVENTS


def _last_per_step(lines: list[dict[str, Any]], key: str) -> dict[int, dict[str, Any]]:
    """Sorted by step, the last line of each step that has a number under `key`."""
    by_step = {line["step"]: line for line in lines if isinstance(line.get(key), (int, float))}
    return dict(sorted(by_step.items()))


def _tokens_at(step: int, train: dict[int, dict[str, Any]]) -> int:
    """Cumulative tokens after `step`: exact on a logged step, else scaled from the nearest train line
    (every step adds the same tokens; `train` holds steps >= 1 only)."""
    if step in train:
        return int(train[step]["tokens"])
    nearest = min(train, key=lambda logged: (abs(logged - step), logged))
    return round(step * train[nearest]["tokens"] / nearest)


def read_curves(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """The curves and marked events of one run; a UserError when it is not a run or has no train lines."""
    folder = check_run_dir(run_dir)
    records = read_records(folder)
    train = {
        step: line
        for step, line in _last_per_step(records, "loss").items()
        if isinstance(line.get("tokens"), (int, float)) and step > 0
    }
    if not train:
        raise UserError(
            f"'{folder / 'metrics.jsonl'}' has no train lines (step, loss, tokens); plot a run that has trained"
        )
    val: dict[str, list[tuple[int, float]]] = {}
    for label in dict.fromkeys(r.get("dataset") or "val" for r in records if "val_loss" in r):
        lines = [r for r in records if "val_loss" in r and (r.get("dataset") or "val") == label]
        points = _last_per_step(lines, "val_loss")
        val[label] = [(_tokens_at(step, train), line["val_loss"]) for step, line in points.items()]
    events = list(
        dict.fromkeys(
            (r["event"], r["step"], _tokens_at(r["step"], train))
            for r in records
            if r.get("event") in MARKED_EVENTS and isinstance(r.get("step"), int)
        )
    )
    return RunCurves(
        name or folder.resolve().name,
        [(int(line["tokens"]), float(line["loss"])) for line in train.values()],
        val,
        events,
    )


def _check_output(out: Path, width: int, height: int) -> str:
    for flag, value in (("--width", width), ("--height", height)):
        if not MIN_PIXELS <= value <= MAX_PIXELS:
            raise UserError(f"{flag} {value} must be between {MIN_PIXELS} and {MAX_PIXELS} pixels")
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise UserError(f"--out '{out}' must end in {', '.join('.' + f for f in FORMATS)}")
    return fmt


def render(runs: list[RunCurves], width: int, height: int, fmt: str = "png") -> bytes:
    """The figure as bytes of exactly width x height pixels (for PNG); Agg, no display, no pyplot state."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    marked: set[str] = set()
    for run, colour in zip(runs, colours, strict=True):
        tokens, loss = zip(*run.train, strict=True)
        axes.plot(tokens, loss, color=colour, linewidth=1.2, label=run.name)
        for index, (label, points) in enumerate(run.val.items()):
            if points:
                x, y = zip(*points, strict=True)
                style = ("o", "--") if index == 0 else ("s", ":")
                axes.plot(
                    x, y, marker=style[0], linestyle=style[1], color=colour, label=f"{run.name} {label}"
                )
        for event, _step, at in run.events:
            axes.axvline(at, color=colour, linestyle=EVENT_STYLES[event], linewidth=1.0, alpha=0.7)
            marked.add(event)
    handles, _labels = axes.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="grey", linestyle=EVENT_STYLES[event], label=event)
        for event in MARKED_EVENTS
        if event in marked
    ]
    axes.legend(handles=handles, fontsize="small")
    axes.set_xlabel("tokens")
    axes.set_ylabel("loss")
    axes.set_title("training loss (lines) and validation loss (markers)")
    axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=DPI)
    return buffer.getvalue()


def plot_runs(run_dirs: list[str], out: str | Path, width: int = 1200, height: int = 800) -> list[RunCurves]:
    """Read every run, draw them into one figure and write it to `out` atomically (temp file, rename)."""
    out = Path(out)
    fmt = _check_output(out, width, height)
    runs = [read_curves(path, name) for path, name in zip(run_dirs, unique_names(run_dirs), strict=True)]
    data = render(runs, width, height, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return runs
