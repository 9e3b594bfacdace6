"""The real counterpart of `plan --measure` for tests/test_plan_measure.py: every rank of a real gloo process group
runs the same tracked training step on real tensors (launcher/plan_measure.py `track_step`), for each cell in
turn; rank 0 writes the measured peaks, by category, as JSON.

usage: python -m tests.measure_probe CELLS.json OUT.json, on every rank (launcher.local.launch_local starts them)
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.plan_measure import text_batch, track_step  # noqa: E402
from trainer.config import batch_plan, load_config  # noqa: E402
from trainer.distributed import distributed  # noqa: E402
from trainer.models.build import ModelRecipe, model_config  # noqa: E402
from trainer.parallel.fsdp import FSDPBackend  # noqa: E402
from trainer.parallel.model_source import ModelSource  # noqa: E402


def main(cells_path: Path, out: Path) -> None:
    cells = json.loads(cells_path.read_text())
    results = []
    with distributed(300) as env:
        for cell in cells:
            config = load_config("tiny", cell["overrides"])
            vocab, seq_len = cell["vocab"], cell["seq_len"]
            plan = batch_plan(config.train, env.world_size, seq_len)
            recipe = ModelRecipe(config.model, vocab, seq_len, "sdpa", config.run.seed)
            source = ModelSource(recipe, model_config(config.model, vocab, seq_len), None)
            backend = FSDPBackend(config, source, replace(plan), env, weights=False)
            torch.manual_seed(0)
            step = track_step(backend, text_batch(plan.micro_batch_size, seq_len, vocab), plan.grad_accum)
            results.append(step.to_dict())
            backend.close()
    if env.rank == 0:
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
