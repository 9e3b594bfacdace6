"""Process entry point on a compute node: `python -m trainer.main CONFIG [key=value ...]`.

Started once per rank by `llm-train train --nproc N`, torchrun, srun or submitit. Exit codes: 0 done,
2 user error, 1 anything else (with the traceback in the rank's log file).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from trainer.config import load_config
from trainer.distributed import detect_env, distributed
from trainer.errors import UserError
from trainer.logs import setup_logging
from trainer.train import run_training

log = logging.getLogger("trainer")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # DeepSpeed calls collectives that torch deprecated, once per step: keep the logs readable.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    rank = detect_env().rank
    try:
        config = load_config(argv[0] if argv else None, argv[1:])
        setup_logging(rank, Path(config.run.dir) / "logs" / f"rank{rank}.log")
        with distributed(config.parallel.timeout_s) as env:
            run_training(config, env)
        return 0
    except UserError as error:
        log.error("%s", error)
        if rank == 0:
            print(f"llm-train: error: {error}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("training failed on rank %d", rank)
        return 1


if __name__ == "__main__":
    sys.exit(main())
