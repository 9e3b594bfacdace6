"""GPU throughput: tokens/s, MFU and peak memory in bf16 at seq-len 1024, one GPU, under 8 minutes.

Rows: gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b in the fastest configuration (FSDP2, flash attention
when importable else SDPA, per-block compile), then one-axis ablations on gpt2-350m (DeepSpeed instead of
FSDP, eager attention, activation checkpointing on, compile off). Each row: warm-up steps, then a short
timed window. Synthetic tokens (the data path is measured by bench/prepare.py), the trainer's own model,
backends, optimizer and MFU formula.

Usage on the GPU machine: python bench/gpu.py [--window 10] [--out gpu_bench.md]
(bench/gpu_check.sh runs it there with the gpu-marked tests, in one call.)
A missing package (deepspeed on a bare image) skips that row and says so; a row that fails is recorded
as failed (and, unless it ran out of memory, measured again without compile), and the table is
rewritten after every row. `--smoke` runs every row's code path on the CPU with a 2-layer model,
fp32, no compile, micro batch 2, one warm-up and one timed step: a check of this script itself
(tests/test_bench.py) before GPU time is spent on it; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.atomic import atomic_write_text  # noqa: E402
from trainer.config import batch_plan, load_config  # noqa: E402
from trainer.distributed import DistEnv, init_distributed  # noqa: E402
from trainer.metrics import mfu, peak_tflops  # noqa: E402
from trainer.models.attention import choose_attention, flash_attn_importable  # noqa: E402
from trainer.models.build import ModelRecipe, model_facts  # noqa: E402
from trainer.parallel import build_backend, model_source  # noqa: E402

SEQ_LEN, VOCAB = 1024, 50257
SMOKE_OVERRIDES = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "train.precision=fp32",
    "train.compile=false",
]
# (label, size, micro batch, overrides)
ROWS = [
    ("gpt2-124m fastest", "gpt2-124m", 16, []),
    ("gpt2-350m fastest", "gpt2-350m", 16, []),
    ("gpt2-774m fastest", "gpt2-774m", 8, []),
    ("gpt2-1.5b fastest", "gpt2-1.5b", 8, ["model.activation_checkpointing=true"]),
    ("gpt2-350m deepspeed", "gpt2-350m", 16, ["parallel.backend=deepspeed"]),
    ("gpt2-350m eager attention", "gpt2-350m", 16, ["model.attn=eager"]),
    ("gpt2-350m activation ckpt", "gpt2-350m", 16, ["model.activation_checkpointing=true"]),
    ("gpt2-350m no compile", "gpt2-350m", 16, ["train.compile=false"]),
]


def run_row(env: DistEnv, size: str, micro: int, overrides: list[str], args: argparse.Namespace) -> dict:
    seq_len, micro = (64, 2) if args.smoke else (SEQ_LEN, micro)
    base = [f"model.size={size}", "train.precision=bf16", "train.compile=true", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro}", "run.dir=/tmp/gpu-bench", "data.path=unused"]  # fmt: skip
    if not any(o.startswith("model.activation_checkpointing") for o in overrides):
        base.append("model.activation_checkpointing=false")
    config = load_config("tiny", [*base, *overrides, *(SMOKE_OVERRIDES if args.smoke else [])])
    plan = batch_plan(config.train, 1, seq_len)
    attn = choose_attention(config.model.attn, env.device, config.train.precision)
    source = model_source(ModelRecipe(config.model, VOCAB, seq_len, attn, seed=0), env)
    facts = model_facts(source.meta(), seq_len, config.model.arch)
    backend = build_backend(config, source, plan, env)
    del source
    batch = {"input_ids": torch.randint(0, VOCAB, (micro, seq_len), device=env.device)}
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for index in range(args.warmup + args.window):
        if index == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        backend.forward_backward(batch, last_micro_batch=True)
        backend.step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = args.window * micro * seq_len / elapsed
    result = {
        "estimate_gb": measured_estimate(
            config.train.precision,
            [*base, *overrides, *(SMOKE_OVERRIDES if args.smoke else [])],
            seq_len,
            config.parallel.backend,
            args.smoke and size != ROWS[0][1],
        ),
        "attn": attn,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, facts.flops_per_token(), 1, peak_tflops(None, env.device)),
        "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
    }
    return result


def measured_estimate(
    precision: str, overrides: list[str], seq_len: int, backend: str, skip: bool
) -> float | None:
    """`llm-train plan --measure`'s peak (GiB) of the row's step, one process on fake tensors beside this one's
    real process group; None for DeepSpeed (the formula's) or a skipped smoke row (the smoke run checks one)."""
    if backend == "deepspeed" or skip:
        return None
    command = [sys.executable, "-m", "launcher.cli", "plan", "tiny", *overrides, f"model.vocab_size={VOCAB}",
               f"model.seq_len={seq_len}", "--nodes", "1", "--gpus-per-node", "1", "--measure", "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["measured"]["peak"] / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_bench.md"))
    parser.add_argument("--smoke", action="store_true", help="every row's code path on the CPU, tiny model")
    args = parser.parse_args()
    if args.smoke:
        args.warmup, args.window = 1, 1
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (or --smoke)")
    os.environ.update(
        RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29591")
    )
    env = init_distributed(600)
    card = torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu (smoke run)"
    lines = [f"card: {card}, torch {torch.__version__}, flash-attn importable: {flash_attn_importable()}", "",
             "| configuration | attention | micro batch | tokens/s | MFU | peak memory GB | plan --measure GB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, size, micro, overrides in ROWS:
        if "parallel.backend=deepspeed" in overrides and importlib.util.find_spec("deepspeed") is None:
            lines.append(f"| {label} | - | {micro} | skipped: deepspeed not installed | | | |")
        else:
            line, failure = row_line(env, label, size, micro, overrides, args)
            if failure == "error" and not args.smoke and "train.compile=false" not in overrides:
                lines.append(line)  # compile is the likeliest failure on a new image: measure without it
                print(line, flush=True)
                label = f"{label}, compile off after the failure"
                line, _ = row_line(env, label, size, micro, [*overrides, "train.compile=false"], args)
            lines.append(line)
        print(lines[-1], flush=True)
        atomic_write_text(Path(args.out), "\n".join(lines) + "\n")  # every row: a cut-off run keeps its rows
    lines += ["", busy_timer_line(env.device)]
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


def busy_timer_line(device: torch.device) -> str:
    """The straggler summary's step time on CUDA is the device's (trainer/resilience/stragglers.py): queue
    ~0.2 s of device work per step and compare what BusyTimer reports with what the host saw."""
    from trainer.resilience.stragglers import BusyTimer

    if device.type != "cuda":
        return "busy timer: CPU, host time (the device check needs CUDA)"
    timer, reported, host = BusyTimer(device), [], []
    for _ in range(3):
        timer.start()
        started = time.perf_counter()
        torch.cuda._sleep(int(0.2 * torch.cuda.get_device_properties(device).clock_rate * 1000))
        host.append(time.perf_counter() - started)
        reported.append(timer.stop())
        torch.cuda.synchronize()
    return f"busy timer: device seconds per step {[round(r, 3) for r in reported[1:]]} (~0.2 expected), host saw {[round(h, 4) for h in host[1:]]}"


def row_line(
    env: DistEnv, label: str, size: str, micro: int, overrides: list[str], args: argparse.Namespace
) -> tuple[str, str | None]:
    """The table row of one configuration, and None, "oom" or "error": one row's failure never stops the others."""
    shown_micro = 2 if args.smoke else micro
    try:
        r = run_row(env, size, micro, overrides, args)
    except torch.OutOfMemoryError:
        return f"| {label} | - | {shown_micro} | out of memory | | | |", "oom"
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        return f"| {label} | - | {shown_micro} | failed: {type(error).__name__}: {reason} | | | |", "error"
    finally:
        release_memory(env.device)
    mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    rate = f"{r['tokens_per_s']:,.0f}"
    estimate = f"{r['estimate_gb']:.1f}" if r["estimate_gb"] is not None else "-"
    return (
        f"| {label} | {r['attn']} | {shown_micro} | {rate} | {mfu_text} | {r['mem_gb']:.1f} | {estimate} |",
        None,
    )


def release_memory(device: torch.device) -> None:
    """Free the last row's model and compiled code, so that neither weighs on the next row."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
