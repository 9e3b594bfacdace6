"""Start-up time of `llm-train train tiny --nproc 2`, against the least any 2-process PyTorch job needs.

Start-up: the wall time from starting `llm-train train tiny run.dir=... data.path=... log.every_steps=1
--nproc 2` (a subprocess, as a user types it; the preset's other defaults kept, W&B offline included) to
the end of its first optimizer step, seen as the first record with a "loss" in RUN_DIR/metrics.jsonl
(polled every 10 ms). The run is then stopped (SIGTERM, as a preemption) and its shut-down is not timed.

Floor: the same 2 processes started directly, with the launcher's environment (RANK, WORLD_SIZE,
MASTER_ADDR/PORT, OMP_NUM_THREADS), each of which imports torch and transformers, joins a gloo process
group, builds the same tiny GPT-2 (`transformers.GPT2LMHeadModel`, the preset's shape, the dataset's
vocabulary and sequence length, SDPA), and runs one forward/backward of one micro batch of the same shape,
an all-reduce of the gradients and one AdamW step; rank 0 then writes a file, polled the same way.

Both read a tiny dataset prepared here first (the test suite's demo data: 7 standard-library files,
`bpe:512`, seq_len 64). They run alternately, floor then start-up, `--repeats` times after `--warmup`
uncounted pairs, so that a busy machine slows both alike. Prints each pair, the medians and the median of
the pairs' ratios start-up / floor (target <= 1.5); `--json` prints the figures as JSON at the end.
`--baseline DIR` also times another checkout's `llm-train train` (`python -m launcher.cli` run in DIR with
this interpreter, e.g. `git archive` of an older commit unpacked there) in each repeat, after this one's.

Usage: .venv/bin/python bench/startup.py [--repeats 3] [--warmup 1] [--json] [--baseline OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The environment this bench was started with: the runs get it, not what the imports here (prepare) add to it.
ENV = dict(os.environ)
DEMO_FILES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "glob.py", "fnmatch.py",
              "shlex.py")  # fmt: skip
NPROC = 2
POLL_S = 0.01
# configs/tiny.yaml and the tiny GPT-2 preset (trainer/models/families/gpt2.py)
MICRO_BATCH = 8
SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 64}
LR, WEIGHT_DECAY, SEED = 3.0e-3, 0.1, 1234


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_data(folder: Path) -> tuple[int, int]:
    """The demo dataset in `folder`; returns (vocab_size, seq_len)."""
    sys.path.insert(0, str(ROOT))
    from trainer.data.prepare import PrepareOptions, run_prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(stdlib / name) for name in DEMO_FILES]
    run_prepare(PrepareOptions(inputs=inputs, out=folder, tokenizer="bpe:512", seq_len=64, workers=1))
    stats = json.loads((folder / "prepare.json").read_text())
    return stats["vocab_size"], stats["seq_len"]


def wait_for(
    predicate, process: subprocess.Popen | list[subprocess.Popen], timeout_s: float, log: Path
) -> float:
    """Poll `predicate` every POLL_S; the time it first held. Fails if a process exits first."""
    processes = process if isinstance(process, list) else [process]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if any(p.poll() not in (None, 0) for p in processes) or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise SystemExit(
                f"the run failed or timed out (exit codes {[p.poll() for p in processes]}):\n{tail}"
            )
        time.sleep(POLL_S)
    return time.monotonic()


def first_loss(metrics: Path) -> bool:
    if not metrics.exists():
        return False
    return any('"loss"' in line for line in metrics.read_text().splitlines() if line.endswith("}"))


def launcher_command() -> list[str]:
    """`llm-train` from the interpreter's folder (the venv's console script), else `python -m launcher.cli`."""
    script = Path(sys.executable).parent / "llm-train"
    return [str(script)] if script.exists() else [sys.executable, "-m", "launcher.cli"]


def startup_run(
    data: Path, run_dir: Path, timeout_s: float, checkout: Path | None = None
) -> tuple[float, float]:
    """Seconds from starting `llm-train train tiny --nproc 2` to its first step's metrics record, and to its
    "start" record (written once the ranks have built the model, the backend and the loaders). With
    `checkout`, that checkout's code runs (`python -m launcher.cli` in it, with this interpreter)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    metrics = run_dir / "metrics.jsonl"
    launcher = [sys.executable, "-m", "launcher.cli"] if checkout else launcher_command()
    command = [*launcher, "train", "tiny", f"run.dir={run_dir}", f"data.path={data}", "log.every_steps=1",
               "--nproc", str(NPROC)]  # fmt: skip
    with open(log, "w") as out:
        wall_start, start = time.time(), time.monotonic()
        process = subprocess.Popen(command, cwd=checkout or ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            end = wait_for(lambda: first_loss(metrics), process, timeout_s, log)
        finally:
            stop(process)
    started = next(
        json.loads(line) for line in metrics.read_text().splitlines() if '"event": "start"' in line
    )
    return end - start, started["time"] - wall_start


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the ranks stop after their step with a checkpoint), then the whole group if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def floor_run(vocab: int, seq_len: int, folder: Path, timeout_s: float) -> float:
    """Seconds from starting the 2 floor processes to the end of rank 0's first step."""
    done = folder / "done.json"
    log = folder / "floor.log"
    port = free_port()
    envs = []
    for rank in range(NPROC):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(NPROC),
               "LOCAL_WORLD_SIZE": str(NPROC), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // NPROC)))
        envs.append(env)
    command = [sys.executable, __file__, "--floor-rank", str(done), "--vocab", str(vocab),
               "--seq-len", str(seq_len)]  # fmt: skip
    with open(log, "w") as out:
        start = time.monotonic()
        processes = [subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT) for env in envs]
        try:
            end = wait_for(done.exists, processes, timeout_s, log)
        finally:
            for process in processes:
                process.wait(60)
    return end - start


def floor_rank(done: Path, vocab: int, seq_len: int) -> None:
    """One floor process: imports, process group, model, one step, then rank 0 writes `done`."""
    import torch
    import torch.distributed as dist
    import transformers

    dist.init_process_group("gloo")
    torch.manual_seed(SEED)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, use_cache=False, **SHAPE)  # fmt: skip
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    input_ids = torch.randint(vocab, (MICRO_BATCH, seq_len))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    for param in model.parameters():
        dist.all_reduce(param.grad)
        param.grad /= dist.get_world_size()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss.item()
    if dist.get_rank() == 0:
        done.with_suffix(".tmp").write_text(json.dumps({"loss": loss}))
        done.with_suffix(".tmp").rename(done)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="uncounted pairs first (the file cache)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of the project (e.g. an older commit unpacked with `git archive`): its `llm-train train` "
        "is timed too, in the same repeats, right after this one's",
    )
    parser.add_argument("--floor-rank", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_rank:
        floor_rank(args.floor_rank, args.vocab, args.seq_len)
        return
    floors, startups, setups, baselines = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        data = Path(tmp) / "data"
        vocab, seq_len = prepare_data(data)
        print(f"{NPROC} ranks, tiny GPT-2 (vocab {vocab}, seq_len {seq_len}, micro batch {MICRO_BATCH}), "
              f"CPU, {os.cpu_count()} cores, {' '.join(launcher_command()[-1:])} train tiny", flush=True)  # fmt: skip
        for repeat in range(-args.warmup, args.repeats):
            folder = Path(tmp) / f"repeat{repeat + args.warmup}"
            folder.mkdir()
            floor = floor_run(vocab, seq_len, folder, args.timeout)
            startup, setup = startup_run(data, folder / "run", args.timeout)
            label = "warm-up" if repeat < 0 else f"repeat {repeat + 1}"
            line = (f"{label}: floor {floor:.2f} s, llm-train start-up {startup:.2f} s (its \"start\" record at "
                    f"{setup:.2f} s), ratio {startup / floor:.2f}")  # fmt: skip
            if args.baseline:
                baseline = startup_run(data, folder / "baseline-run", args.timeout, args.baseline)[0]
                line += f"; baseline start-up {baseline:.2f} s, ratio {baseline / floor:.2f}"
            print(line, flush=True)
            if repeat >= 0:
                floors.append(floor)
                startups.append(startup)
                setups.append(setup)
                if args.baseline:
                    baselines.append(baseline)
    ratios = [s / f for s, f in zip(startups, floors, strict=True)]
    result = {
        "floor_s": floors,
        "startup_s": startups,
        "start_record_s": setups,
        "ratios": ratios,
        "floor_median_s": statistics.median(floors),
        "startup_median_s": statistics.median(startups),
        "ratio_median": statistics.median(ratios),
    }
    if baselines:
        result["baseline_s"] = baselines
        result["baseline_median_s"] = statistics.median(baselines)
        result["baseline_ratio_median"] = statistics.median(
            b / f for b, f in zip(baselines, floors, strict=True)
        )
        result["startup_vs_baseline_median"] = statistics.median(
            s / b for s, b in zip(startups, baselines, strict=True)
        )
    print(f"median of {args.repeats}: floor {result['floor_median_s']:.2f} s, llm-train start-up "
          f"{result['startup_median_s']:.2f} s; ratio, median of the pairs: {result['ratio_median']:.2f} "
          "(target <= 1.5)")  # fmt: skip
    if baselines:
        print(f"baseline: start-up {result['baseline_median_s']:.2f} s, ratio to the floor "
              f"{result['baseline_ratio_median']:.2f}; this checkout / baseline, median of the pairs: "
              f"{result['startup_vs_baseline_median']:.2f}")  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
