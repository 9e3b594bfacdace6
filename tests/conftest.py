"""Shared test settings: everything offline, deterministic, on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# lm_eval sets this when imported (tests/test_task_eval.py imports it here): set from the start, so that the
# launches after that import still match the session's rank server.
os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")


def _streaming_cleanup_without_holding_memory() -> None:
    """streaming registers an atexit handler per shared-memory block, which keeps every block (and its
    open file) alive until the process exits. A training rank builds a few loaders and exits; this test
    session builds hundreds in one process and would pass its open-file limit. Here the handler holds the
    block weakly: a block whose dataset is gone is closed at once (its /dev/shm file is removed by the
    stale-group cleanup, trainer/data/shm_cleanup.py), a live one is still cleaned up at exit."""
    import atexit
    import weakref

    from streaming.base.shared import memory

    original_init = memory.SharedMemory.__init__

    created: set[str] = set()

    def init(self, *args, auto_cleanup: bool = True, **kwargs) -> None:
        original_init(self, *args, auto_cleanup=False, **kwargs)
        if self.created_shms:
            created.add(self.shm.name)
        if auto_cleanup:
            block = weakref.ref(self)
            atexit.register(lambda: (live := block()) is not None and live.cleanup())

    def unlink_what_this_session_created() -> None:
        """The blocks this process created and closed early stay in /dev/shm (nothing of streaming's
        unlinks them any more): on a shared host every session would leave a hundred behind."""
        from _posixshmem import shm_unlink

        for name in created:
            try:
                shm_unlink(name if name.startswith("/") else f"/{name}")
            except OSError:
                pass  # unlinked by its own cleanup, or by the stale-group cleanup

    memory.SharedMemory.__init__ = init
    atexit.register(unlink_what_this_session_created)


_streaming_cleanup_without_holding_memory()


import json  # noqa: E402
import sysconfig  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from trainer_runs import BACKENDS, overrides, train  # noqa: E402

DEMO_FILES = (
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "string.py",
    "glob.py",
    "fnmatch.py",
    "shlex.py",
)


@dataclass(frozen=True)
class PreparedData:
    path: Path
    vocab_size: int
    seq_len: int


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> PreparedData:
    """Demo-style data: a few standard-library files, prepared with an offline BPE, seq-len 64."""
    from trainer.data.prepare import PrepareOptions, run_prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("demo-data") / "data"
    run_prepare(
        PrepareOptions(
            inputs=[str(stdlib / name) for name in DEMO_FILES],
            out=out,
            tokenizer="bpe:512",
            seq_len=64,
            workers=1,
        )
    )
    stats = json.loads((out / "prepare.json").read_text())
    return PreparedData(out, stats["vocab_size"], stats["seq_len"])


@pytest.fixture(scope="session", autouse=True)
def rank_server():
    """One rank server for the session (launcher/rank_server.py): the ranks of every local training run whose
    launcher shares this process's session and environment are forks of it, which saves each rank the
    seconds of importing torch, transformers, DeepSpeed and the trainer. It starts in the background: runs
    that start before it listens, or that it cannot serve, start a server of their own."""
    from launcher.rank_server import SERVER_ENV, RankServer

    # The ranks' test hooks (tests/rank_hooks): on the path of every process started from here, the server first,
    # so that a test that sets a hook's variable still gets this server (the variables are read lazily).
    path_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).parent / "rank_hooks"), path_before])
    )
    server = RankServer.spawn(("trainer.main", "deepspeed", "wandb"))
    os.environ[SERVER_ENV] = server.socket_path
    start_rank = RankServer.start_rank

    def noting_refusals(self, module, args, env):
        rank = start_rank(self, module, args, env)
        if rank is None and self.socket_path == server.socket_path:
            REFUSED_LAUNCHES.append((os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], self.refusal))
        return rank

    RankServer.start_rank = noting_refusals
    yield server
    RankServer.start_rank = start_rank
    os.environ.pop(SERVER_ENV, None)
    if path_before is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = path_before
    server.close()


@pytest.fixture(scope="session")
def straight(demo_dataset, tmp_path_factory) -> dict[str, Path]:
    """12 uninterrupted steps per backend, world size 2, a checkpoint every 3 steps."""
    runs = {}
    for backend in BACKENDS:
        runs[backend] = tmp_path_factory.mktemp(f"straight-{backend}")
        train(runs[backend], demo_dataset.path, nproc=2, overrides=overrides(backend))
    return runs


def pytest_runtest_logreport(report) -> None:
    """Each test phase's duration, for the slowest-tests table that closes `make test` (tests/slowest.py)."""
    durations = os.environ.get("LLM_TEST_DURATIONS_FILE")
    if durations:
        with open(durations, "a") as file:
            file.write(f"{report.duration:.3f}\t{report.when}\t{report.nodeid}\n")


REFUSED_LAUNCHES: list[tuple[str, str | None]] = []
"""(test, reason) of each launch the session's rank server could not serve: each started a server of its own,
seconds of imports. A few are by design (a PYTHONPATH hook); many mean a test changed the environment."""


def pytest_terminal_summary(terminalreporter) -> None:
    """The launches the shared rank server could not serve, by reason; and one prominent line when SLURM tests
    were skipped, with the command that enables them.

    `make test` (tests/run_suite.sh) repeats the SLURM line as the last line of its output, through
    $LLM_TEST_SUMMARY_FILE.
    """
    if REFUSED_LAUNCHES:
        reasons: dict[str | None, list[str]] = {}
        for test, reason in REFUSED_LAUNCHES:
            reasons.setdefault(reason, []).append(test)
        terminalreporter.write_sep(
            "-", f"{len(REFUSED_LAUNCHES)} launches started a rank server of their own"
        )
        for reason, tests in reasons.items():
            terminalreporter.write_line(f"{len(tests)} x {reason} (first: {tests[0]})")
    skipped = [report for report in terminalreporter.stats.get("skipped", []) if "slurm" in report.keywords]
    if not skipped:
        return
    line = (
        f"{len(skipped)} SLURM tests were SKIPPED: the local SLURM cluster is not running; "
        "enable them with `sudo bash slurm/cluster.sh start` (or run `make test` as root on Debian/Ubuntu)"
    )
    terminalreporter.write_sep("!", line, red=True, bold=True)
    summary_file = os.environ.get("LLM_TEST_SUMMARY_FILE")
    if summary_file:
        Path(summary_file).write_text(line + "\n")
