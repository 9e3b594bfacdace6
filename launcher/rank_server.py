"""Start local ranks as forks of one process that has already imported torch, transformers and the trainer.

A rank started as `python -m trainer.main` spends seconds importing before it does any work, and N ranks on
one machine pay that N times at once. The rank server pays it once: `llm-train train --nproc N` starts one
server (a child of the launcher, in its process group), and each rank is a fork of it that then runs
`python -m MODULE ARGS` semantics (`runpy`, `__main__`, `sys.argv`) in the launcher's working directory,
environment, signal mask and standard streams (passed over the socket), in the launcher's process group.
The launcher sees each rank as a `ForkedRank` with Popen's `pid`, `poll`, `wait`, `send_signal`, `kill`
and `returncode` (negative: killed by that signal); the server, the ranks' parent, reports their exit.

A server can also outlive one launch (the test suite keeps one for its whole session, LLM_TRAIN_RANK_SERVER
names its socket): a request is served only when a fresh process would have been the same, that is when the
launcher is in the server's session (so the rank can join its process group) and its environment equals the
server's but for the per-rank variables and those read only after start-up (LAZY_ENV_PREFIXES); otherwise
the launcher starts a private server. The server never runs a thread of its own and never runs training
code: it only imports, so every rank starts from the same state a fresh interpreter would have reached.

usage: python -m launcher.rank_server SOCKET_PATH MODULE [MODULE ...]   (the modules to import first)
"""

from __future__ import annotations

import _io
import atexit
import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

SERVER_ENV = "LLM_TRAIN_RANK_SERVER"
PRELOAD = ("trainer.main",)
# Set per rank by the launcher; OMP_NUM_THREADS is applied in the rank (torch.set_num_threads).
PER_RANK_ENV = frozenset(
    {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "OMP_NUM_THREADS",
    }
)
# Read only while a rank runs, never at import: test hooks (trainer.resilience.fault_injection, the suite's
# tests/rank_hooks), pytest's per-test marker, the terminal size, the address of a W&B service that the
# launcher's process started (wandb sets it in its own process when it starts one: `llm-train eval` mirroring to
# W&B does), and SLURM's requeue count (read when the run starts: checkpoint.resume, goodput, faults).
LAZY_ENV_PREFIXES = (
    "LLM_TRAIN_TEST_", "PYTEST_", SERVER_ENV, "COLUMNS", "LINES", "WANDB_SERVICE", "SLURM_RESTART_COUNT",
)  # fmt: skip
_HEADER = struct.Struct("!Q")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)


def comparable_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in PER_RANK_ENV and not k.startswith(LAZY_ENV_PREFIXES)}


class ForkedRank:
    """One rank started by a rank server, seen as a subprocess.Popen (the subset the launcher uses)."""

    def __init__(self, connection: socket.socket, pid: int) -> None:
        self._connection = connection
        self._reader = connection.makefile("r")
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self._read_exit()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        ready = select.select([self._connection], [], [], timeout)[0]
        if self.returncode is None:
            if not ready:
                raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout)
            self._read_exit()
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _read_exit(self) -> None:
        line = self._reader.readline()
        # No line: the server itself is gone (killed with the launcher's group); the rank is lost with it.
        self.returncode = json.loads(line)["exit"] if line else -signal.SIGKILL
        self._reader.close()
        self._connection.close()


class RankServer:
    """The launcher's handle on a rank server: `start_rank` forks one rank of it."""

    def __init__(self, socket_path: str, process: subprocess.Popen | None = None) -> None:
        self.socket_path = socket_path
        self.process = process  # set when this launcher started it (a private server)
        self.refusal: str | None = None  # why the last request was refused

    @classmethod
    def spawn(cls, preload: tuple[str, ...] = PRELOAD) -> RankServer:
        """A server, child of this process, that listens once it has imported `preload` (see `ready`)."""
        path = os.path.join(tempfile.mkdtemp(prefix="llm-train-ranks-"), "socket")
        return cls(path, subprocess.Popen([sys.executable, "-m", "launcher.rank_server", path, *preload]))

    @classmethod
    def start(cls, preload: tuple[str, ...] = PRELOAD, timeout_s: float = 300.0) -> RankServer:
        """A private server, child of this process, once it listens."""
        server = cls.spawn(preload)
        deadline = time.monotonic() + timeout_s
        while not server.ready():
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"the rank server exited with code {server.process.returncode} before it listened"
                )
            if time.monotonic() > deadline:
                server.close()
                raise RuntimeError(f"the rank server did not listen after {timeout_s:.0f} s")
            time.sleep(0.02)
        return server

    def ready(self) -> bool:
        return os.path.exists(self.socket_path)

    def start_rank(self, module: str, args: list[str], env: dict[str, str]) -> ForkedRank | None:
        """Fork a rank that runs `python -m module *args` with `env`; None when this server cannot serve it
        (another session, another start-up environment)."""
        request = {
            "module": module,
            "args": args,
            "env": env,
            "cwd": os.getcwd(),
            "sid": os.getsid(0),
            "pgid": os.getpgid(0),
            "sigmask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        }
        payload = json.dumps(request).encode()
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(self.socket_path)
            socket.send_fds(connection, [_HEADER.pack(len(payload)) + payload], [0, 1, 2])
            reply = json.loads(connection.makefile("r").readline() or "{}")
        except OSError:
            connection.close()
            return None
        if "pid" not in reply:
            self.refusal = reply.get("refused", "no reply")
            connection.close()
            return None
        return ForkedRank(connection, reply["pid"])

    def close(self) -> None:
        """Stop a private server (its ranks have ended); a shared one is left to its owner."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()  # it ignores the stop signals, which are meant for the ranks
            self.process.wait()
        Path(self.socket_path).unlink(missing_ok=True)
        Path(self.socket_path).parent.rmdir()


def shared_server() -> RankServer | None:
    """The server named by LLM_TRAIN_RANK_SERVER, if it listens (a server still importing is not waited for)."""
    path = os.environ.get(SERVER_ENV)
    server = RankServer(path) if path else None
    return server if server is not None and server.ready() else None


# ---- the server process ------------------------------------------------------------------------------------


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _flags, _addr = socket.recv_fds(connection, _HEADER.size, 3)
    (size,) = _HEADER.unpack(head)
    payload = bytearray()
    while len(payload) < size:
        chunk = connection.recv(size - len(payload))
        if not chunk:
            raise ConnectionError("the launcher hung up mid-request")
        payload += chunk
    return json.loads(payload), fds


def _start_env(request_env: dict[str, str], imported: dict[str, str]) -> dict[str, str]:
    """The request's environment as a fresh process would have it after the preloaded imports: the variables
    those imports set (`imported`) added where the launcher has not set them itself."""
    return {**imported, **request_env}


def _refusal(request: dict, before: dict[str, str], imported: dict[str, str]) -> str | None:
    if request["sid"] != os.getsid(0):
        return "the launcher is in another session"
    # A launcher that made the same imports has the variables they set: those are not a difference.
    env, expected = comparable_env(request["env"]), dict(before)
    for name, value in imported.items():
        if env.get(name) == value:
            env.pop(name)
            expected.pop(name, None)
    if env != expected:
        differ = sorted(k for k in env.keys() | expected.keys() if env.get(k) != expected.get(k))
        return f"the launcher's environment differs from the server's in {', '.join(differ)}"
    return None


def _become_rank(request: dict, fds: list[int], imported: dict[str, str]) -> None:
    """In the forked child: take on the launcher's process group, streams, directory, environment and mask."""
    os.setpgid(0, request["pgid"])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(_start_env(request["env"], imported))
    sys.path[0] = request["cwd"]  # what `python -m` puts first
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, request["sigmask"])
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def serve(socket_path: str, before: dict[str, str]) -> dict | None:
    """Serve until the process that started this server is gone; `before` is its environment before the
    preloaded imports. Returns only in a forked child, with the request it is to run."""
    owner = os.getppid()
    imported = {k: v for k, v in os.environ.items() if before.get(k) != v}  # set by the imports
    before = comparable_env(before)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".binding")
    listener.listen(64)
    os.rename(socket_path + ".binding", socket_path)  # the path exists only once the server listens
    ranks: dict[int, socket.socket] = {}
    while os.getppid() == owner:
        if select.select([listener], [], [], 0.1)[0]:
            connection, _ = listener.accept()
            try:
                request, fds = _receive(connection)
            except (OSError, ValueError):
                connection.close()
                continue
            refusal = _refusal(request, before, imported)
            if refusal is not None:
                connection.sendall((json.dumps({"refused": refusal}) + "\n").encode())
                connection.close()
                for fd in fds:
                    os.close(fd)
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in ranks.values():
                    other.close()
                connection.close()
                _become_rank(request, fds, imported)
                return request
            for fd in fds:
                os.close(fd)
            connection.sendall((json.dumps({"pid": pid}) + "\n").encode())
            ranks[pid] = connection
        _report_exits(ranks)
    Path(socket_path).unlink(missing_ok=True)
    return None


def _report_exits(ranks: dict[int, socket.socket]) -> None:
    while ranks:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        connection = ranks.pop(pid, None)
        if connection is not None:
            try:
                connection.sendall((json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n").encode())
            except OSError:
                pass  # the launcher is gone
            connection.close()


def main(argv: list[str]) -> None:
    socket_path, *preload = argv
    for signum in _STOP_SIGNALS:  # the launcher forwards stop signals to the ranks; the server outlives them
        signal.signal(signum, signal.SIG_IGN)
    before = dict(os.environ)  # some packages set variables when imported (KMP_*, TORCHINDUCTOR_CACHE_DIR)
    for module in preload:
        importlib.import_module(module)
    gc.freeze()  # the ranks' collections never walk (and so never copy) the pages of what was imported
    request = serve(socket_path, before)
    if request is not None:
        sys.argv = [request["module"], *request["args"]]
        sys.modules.pop(request["module"], None)  # preloaded for its imports; run afresh as __main__
        _exit(_run_main(request["module"]))


def _run_main(module: str) -> int:
    """Run MODULE as `python -m` would; the exit status the interpreter would give (negative: a signal)."""
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return (stop.code or 0) & 0xFF
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -signal.SIGINT
    except BaseException:  # noqa: BLE001 - reported as the interpreter reports an uncaught exception
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def _exit(status: int) -> None:
    """End a rank as the interpreter ends (threads joined, atexit handlers run, every open file flushed)
    but without tearing down the modules it inherited: a forked rank freeing torch's and transformers'
    objects touches, and so copies, every page it shares with the server, seconds per rank."""
    gc.collect()  # the run's own garbage, cycles included: their finalizers run as they would have
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's first step at exit
    atexit._run_exitfuncs()
    for obj in gc.get_objects():
        if isinstance(obj, _io._IOBase) and not obj.closed and obj.writable():
            try:
                obj.flush()
            except (OSError, ValueError):
                pass
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
