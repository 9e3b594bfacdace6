"""Peak activation memory of one training step on the CPU against `llm-train plan`'s estimate, for tests/test_plan.py.

usage: python -m tests.activation_probe gpt2|llama ac|noac OUT.json   -> {"measured": BYTES, "estimate": BYTES}
(started by launch_local, as a fork of the suite's rank server)

One warm-up step allocates the gradients; then VmHWM is reset (Linux clear_refs) and the growth of the peak
resident memory over a second step is what the step's activations took. glibc's mmap threshold is set low, so
that freed memory goes back to the system and the peak measures what is held.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.plan import activation_bytes, model_shape_facts  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.models.build import build_model  # noqa: E402

MICRO, SEQ_LEN, VOCAB = 8, 256, 4096


def _memory(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


def main(arch: str, checkpointing: bool, out: Path) -> None:
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: frees above 128 KiB go back at once
    shape = (
        ["model.size=tiny"] if arch == "gpt2" else ["model.size=llama-tiny", "model.intermediate_size=704"]
    )
    overrides = ["run.dir=x", "data.path=x", f"model.arch={arch}", *shape, "model.n_layer=4", "model.n_embd=256",
                 "model.n_head=4", "train.precision=fp32", f"model.activation_checkpointing={str(checkpointing).lower()}"]  # fmt: skip
    config = load_config("tiny", overrides)
    torch.set_num_threads(1)
    model = build_model(config.model, VOCAB, SEQ_LEN, "sdpa", seed=0)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ_LEN))
    model(input_ids=tokens, labels=tokens).loss.backward()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _memory("VmRSS:")
    model(input_ids=tokens, labels=tokens).loss.backward()
    measured = _memory("VmHWM:") - before
    estimate = activation_bytes(model_shape_facts(config, VOCAB, SEQ_LEN), SEQ_LEN, MICRO, 4, checkpointing)
    out.write_text(json.dumps({"measured": measured, "estimate": estimate}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "ac", Path(sys.argv[3]))
