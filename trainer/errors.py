"""The one exception type that means "the user can fix this": the CLI turns it into exit code 2."""


class UserError(Exception):
    """A problem with the user's input (config, path, data) described in one line with its fix."""


PEER_FAILED_EXIT = 3
"""trainer.main's exit code when a collective failed because another rank did (1: this rank's own failure).

The SLURM supervisor (trainer/resilience/supervisor.py) waits for that other rank's task to decide about a
requeue first; users see 1 (the supervisor and `llm-train train` report 3 as 1)."""


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_hint() -> str:
    """For a Hugging Face load that failed: the offline variables that are set (they forbid the download)."""
    import os

    set_ = [
        f"{name}={os.environ[name]}"
        for name in OFFLINE_VARIABLES
        if os.environ.get(name, "0") not in ("", "0")
    ]
    if not set_:
        return "check the name and the network"
    return f"{' and '.join(set_)} is set, so only the local HF cache is read: download it first or unset that"
