"""The rank server (launcher/rank_server.py): a forked rank is what `python -m MODULE` would have been."""

from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest
from trainer_runs import wait_for

from launcher.rank_server import RankServer

PROBE = textwrap.dedent(
    """
    import json, os, signal, sys, time
    print("out of", os.environ["RANK"], flush=True)
    print("err of", os.environ["RANK"], file=sys.stderr, flush=True)
    facts = {"name": __name__, "argv": sys.argv[1:], "cwd": os.getcwd(), "pgid": os.getpgid(0),
             "path0": sys.path[0], "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
             "parent": os.getppid()}
    with open(f"facts{os.environ['RANK']}.json.tmp", "w") as file:
        json.dump(facts, file)
    os.replace(f"facts{os.environ['RANK']}.json.tmp", f"facts{os.environ['RANK']}.json")
    action = sys.argv[1]
    if action == "sleep":
        time.sleep(60)
    if action == "exit-work":  # what the interpreter finishes at exit: all of it must happen in a fork too
        import atexit, threading
        left_open = open("left-open.txt", "w")  # never closed nor flushed
        left_open.write("buffered")
        atexit.register(lambda: open("atexit.txt", "w").write("ran"))
        threading.Thread(target=lambda: (time.sleep(0.5), open("thread.txt", "w").write("joined"))).start()
        raise RuntimeError("uncaught")
    sys.exit(int(action))
    """
)


@pytest.fixture
def server(tmp_path, monkeypatch):
    (tmp_path / "rank_probe.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)
    server = RankServer.start(preload=("json",))
    yield server
    server.close()


def test_a_forked_rank_runs_as_python_m_would_with_the_launchers_directory_group_streams_and_exit(
    server, tmp_path, capfd
):
    env = dict(os.environ, RANK="0")
    rank = server.start_rank("rank_probe", ["3"], env)
    assert rank is not None, server.refusal
    assert rank.wait(timeout=30) == 3
    facts = json.loads((tmp_path / "facts0.json").read_text())
    assert facts["name"] == "__main__"
    assert facts["argv"] == ["3"]
    assert facts["cwd"] == str(tmp_path) == facts["path0"]
    assert facts["pgid"] == os.getpgid(0)
    assert facts["parent"] == server.process.pid
    assert facts["blocked"] == sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    out, err = capfd.readouterr()
    assert "out of 0" in out and "err of 0" in err


def test_a_signalled_rank_reports_the_signal_as_popen_does(server, tmp_path):
    rank = server.start_rank("rank_probe", ["sleep"], dict(os.environ, RANK="1"))
    assert rank is not None
    wait_for(lambda: (tmp_path / "facts1.json").exists(), timeout=30)
    assert rank.poll() is None
    rank.send_signal(signal.SIGTERM)  # the server ignores SIGTERM; the rank has the default action again
    assert rank.wait(timeout=30) == -signal.SIGTERM


def test_a_launcher_whose_environment_differs_is_refused(server):
    env = dict(os.environ, RANK="0", HF_HUB_OFFLINE="0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1")
    assert server.start_rank("rank_probe", ["0"], env) is None
    # per-rank and lazily read variables may differ
    env = dict(os.environ, RANK="0", MASTER_PORT="1", LLM_TRAIN_TEST_STALL="0:1:1", WANDB_SERVICE="2-1-tcp-1")
    rank = server.start_rank("rank_probe", ["0"], env)
    assert rank is not None and rank.wait(timeout=30) == 0


def test_a_rank_ends_as_the_interpreter_would_files_flushed_threads_joined_atexit_run(
    server, tmp_path, capfd
):
    rank = server.start_rank("rank_probe", ["exit-work"], dict(os.environ, RANK="2"))
    assert rank is not None
    assert rank.wait(timeout=30) == 1  # an uncaught exception
    assert "RuntimeError: uncaught" in capfd.readouterr().err
    assert (tmp_path / "left-open.txt").read_text() == "buffered"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "joined"
