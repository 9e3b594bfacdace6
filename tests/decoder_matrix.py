"""Every decoder type of tests/test_decoder_matrix.py trained in turn by one set of ranks (one launch, not one per
cell): for each backend of BACKENDS (comma-separated) and each model folder under FOLDERS, a 2-step run of the real
trainer from it (`model.init_from`), in OUT/<backend>/<name>. Started by torchrun; a failing model stops the set
and its rank logs say why.

usage: torchrun --nproc-per-node 2 tests/decoder_matrix.py FOLDERS DATA OUT BACKENDS
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import load_config  # noqa: E402
from trainer.distributed import distributed  # noqa: E402
from trainer.logs import setup_logging  # noqa: E402
from trainer.main import _train  # noqa: E402
from trainer.resilience.goodput import GoodputClock  # noqa: E402


def main(folders: Path, data: Path, out: Path, backends: list[str]) -> None:
    overrides = ["model.arch=hf", "model.size=null", "train.max_steps=2",
                 "train.global_batch_size=8", "train.micro_batch_size=2", "checkpoint.every_steps=2",
                 "eval.every_steps=0", "log.wandb=false", "log.every_steps=1", "parallel.timeout_s=120"]  # fmt: skip
    with distributed(120) as env:
        for backend, folder in ((b, f) for b in backends for f in sorted(folders.iterdir())):
            run_dir = out / backend / folder.name
            run = [
                f"run.dir={run_dir}",
                f"data.path={data}",
                f"model.init_from={folder}",
                f"parallel.backend={backend}",
            ]
            config = load_config("tiny", [*run, *overrides])
            setup_logging(env.rank, run_dir / "logs" / f"rank{env.rank}.log")
            _train(config, env, GoodputClock(None))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(","))
