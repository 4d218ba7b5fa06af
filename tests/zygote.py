"""Rank processes for the tests without paying the interpreter's start each time.

A training process spends ~6.5 s of its start importing torch (3 s), torch._dynamo (2.8 s,
which torch's optimizers import at construction) and DeepSpeed (0.5 s), on this project's
2-core CPU: most of a tiny test run. ``launch`` in test_engine.py starts each rank here
instead: a zygote per rank index, started once a session with those modules imported and
nothing run, forks a process that sets the rank's environment, working folder and stdout /
stderr pipes and runs ``python -m cmal.cli ARGS`` (or a script) as its ``__main__``, then
exits through the interpreter's own shutdown. The process is a real one, signalled and
killed as a launcher would (its pid is the rank's); what it shares with its siblings is the
imported modules. A zygote per rank index keeps the ranks' string hash seeds apart, as
separately started processes have them.

Not covered this way, and left to the tests that start a fresh interpreter (the CLI tests,
the SLURM jobs, bench/gpu.sh's dry run): anything those three libraries read from the
environment at import (the zygotes have ``OMP_NUM_THREADS=1`` and ``DS_ACCELERATOR=cpu``,
what every ``launch`` sets; a launch that sets them otherwise starts a fresh interpreter).

The forked process is the grandchild of the zygote; the test process is made a child
subreaper (Linux ``prctl``), so it is re-parented there and ``waitpid`` works on it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOAD = ("torch", "torch._dynamo", "deepspeed")
FIXED_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
PR_SET_CHILD_SUBREAPER = 36


def _serve(path: str) -> None:
    """The zygote: import, then fork a rank process per request."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # Packets, not a stream: a request (argv, env: a few KB) arrives whole in one recvmsg,
    # or the zygote says it did not.
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        msg, fds, flags, _ = socket.recv_fds(conn, 1 << 20, 2)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise RuntimeError(f"zygote: a request cut short ({len(msg)} bytes, {fds} fds)")
        request = json.loads(msg)
        middle = os.fork()
        if middle == 0:
            pid = os.fork()
            if pid == 0:
                srv.close()
                conn.close()
                _become(request, fds)  # does not return
            conn.sendall(str(pid).encode())
            os._exit(0)
        for fd in fds:
            os.close(fd)
        os.waitpid(middle, 0)  # the rank is now an orphan: the subreaper adopts it
        conn.sendall(b" ok")
        conn.close()


def _become(request: dict, fds: list[int]) -> None:
    import runpy

    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = request["argv"]
    # sys.path as a fresh `python -m …` / `python script.py` has it (the zygote's had
    # this folder and its own working folder in front).
    first = os.getcwd() if argv[0] == "-m" else str(Path(argv[0]).resolve().parent)
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [first, *(p for p in sys.path if p not in ("", here))]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.exit(code)  # the interpreter's own shutdown: threads joined, atexit handlers run


class Forked:
    """What the tests use of ``subprocess.Popen`` (text mode), for a forked rank."""

    def __init__(self, pid: int, out: int, err: int):
        self.pid = pid
        self.returncode: int | None = None
        self._chunks: dict[int, list[bytes]] = {out: [], err: []}
        self._readers = [threading.Thread(target=self._read, args=(fd,), daemon=True)
                         for fd in (out, err)]  # fmt: skip
        for t in self._readers:
            t.start()
        self._out, self._err = out, err

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read1(1 << 16):
                self._chunks[fd].append(chunk)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(f"forked rank {self.pid}", timeout)
            time.sleep(0.005)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        for t in self._readers:
            t.join()
        out, err = (b"".join(self._chunks[fd]).decode(errors="replace")
                    for fd in (self._out, self._err))  # fmt: skip
        return out, err

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygotes:
    """One zygote per rank index, started on first use, stopped at the session's end."""

    def __init__(self, folder: Path, python: str = sys.executable):
        self.folder, self.python = folder, python
        self.procs: dict[int, subprocess.Popen] = {}
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def _socket(self, rank: int) -> str:
        path = str(self.folder / f"zygote-{rank}.sock")
        if rank not in self.procs:
            env = {**os.environ, **FIXED_ENV}
            here = str(Path(__file__).parent)
            code = (
                f"import sys; sys.path.insert(0, {here!r}); import zygote; zygote._serve({path!r})"
            )
            proc = subprocess.Popen([self.python, "-c", code], env=env, stdout=subprocess.PIPE,
                                    text=True)  # fmt: skip
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"zygote {rank} did not start (exit {proc.wait()})")
            self.procs[rank] = proc
        return path

    def start(self, rank: int, argv: list[str], env: dict[str, str], cwd: str) -> Forked:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.connect(self._socket(rank))
            msg = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
            socket.send_fds(conn, [msg], [out_w, err_w])
            os.close(out_w)
            os.close(err_w)
            reply = b""
            while not reply.endswith(b" ok"):
                part = conn.recv(64)
                if not part:
                    raise RuntimeError(f"zygote {rank} closed the connection ({reply!r})")
                reply += part
        return Forked(int(reply[:-3]), out_r, err_r)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


_shared: Zygotes | None = None


def shared() -> Zygotes:
    """The session's zygotes (stopped when the test process exits)."""
    global _shared
    if _shared is None:
        import atexit
        import tempfile

        _shared = Zygotes(Path(tempfile.mkdtemp(prefix="cmal-zygote-")))
        atexit.register(_shared.close)
    return _shared
