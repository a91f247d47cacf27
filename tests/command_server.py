"""The tests' command server: one process that has imported what ``train.py`` imports (torch, Lightning,
Hydra, the trainer) and forks a process for each command a test starts (``start_command``), instead of
an interpreter per command that imports them again (seconds each, and a test session starts dozens).

A command's process is a process of its own as a user's shell starts one: its own session (so a test
ends it with its workers by ``os.killpg``), its own pid to signal, its directory, its environment, its
``sys.argv`` and ``sys.path[0]``, the program run as ``__main__``, stdout and stderr to files; it ends
through the interpreter's own teardown, and its exit status reaches the test as ``subprocess`` reports
one (negative: the signal that ended it). What it does not redo is importing the modules this server
preloaded, so a test that depends on what a command imports (``test_cli``) starts a real interpreter,
and ``CURRY_TEST_FRESH_INTERPRETERS=1`` makes every command one.

The protocol, over a Unix socket, one connection per command: the test sends the command (pickled) and
the files for stdin, stdout and stderr; the server answers the forked process's pid, then, when it has
ended, its exit status.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import runpy
import select
import shutil
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
from typing import Optional, Sequence

# What train.py's process imports on its way to training one process: importing them here once is the
# point of the server.
PRELOAD = ("hydra", "curry_train.cli.train", "curry_train.launch", "curry_train.workers", "curry_train.run")

_HEADER = struct.Struct("!Q")
_STATUS = struct.Struct("!q")


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the connection closed early")
        data += chunk
    return data


# -- the server -----------------------------------------------------------------------------------


def serve(address: str) -> Optional[int]:
    """Preload, then fork a process per command until stdin closes (the test session ended). Returns
    None in the server; in a forked command, the command's exit status, for ``sys.exit``."""
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    running: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, wake_r, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            listener.close()  # the socket's directory is the session's own (``_Server.connect``)
            shutil.rmtree(os.path.dirname(address), ignore_errors=True)
            return None
        if wake_r in ready:
            os.read(wake_r, 4096)
            while running:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = running.pop(pid, None)
                if conn is not None:
                    with contextlib.suppress(OSError):  # a test that stopped waiting
                        conn.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                    conn.close()
        if listener in ready:
            conn, _ = listener.accept()
            header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
            request = pickle.loads(_read_exactly(conn, _HEADER.unpack(header)[0]))
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                os.close(wake_r)
                os.close(wake_w)
                for other in running.values():
                    other.close()
                running.clear()
                return _run_command(request, fds)
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(_STATUS.pack(pid))
            running[pid] = conn


def _run_command(request: dict, fds: Sequence[int]) -> int:
    """In the forked process: become the command, run it, and return its exit status."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    program = str(Path(request["program"]).resolve())
    sys.argv = [program, *request["args"]]
    sys.path[0] = str(Path(program).parent)
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit as stopped:
        if stopped.code is None or isinstance(stopped.code, int):
            return stopped.code or 0
        print(stopped.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # as the interpreter ends on an uncaught one: by SIGINT
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001  (the interpreter's own behaviour: the traceback, status 1)
        traceback.print_exc()
        return 1
    return 0


# -- the tests' side --------------------------------------------------------------------------------


class _Server:
    """The session's server, started at the first command."""

    process: Optional[subprocess.Popen] = None
    address: str = ""
    lock = threading.Lock()

    @classmethod
    def connect(cls) -> socket.socket:
        with cls.lock:
            if cls.process is None or cls.process.poll() is not None:
                cls.address = os.path.join(tempfile.mkdtemp(prefix="curry-commands-"), "socket")
                cls.process = subprocess.Popen(
                    [sys.executable, __file__, cls.address], stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
                line = cls.process.stdout.readline()
                if line.strip() != b"ready":
                    raise RuntimeError(f"the command server did not start: {line!r}")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(cls.address)
        return conn


class ForkedCommand:
    """A command running as a fork of the command server, with the parts of ``subprocess.Popen`` the
    tests use: ``pid``, ``returncode``, ``poll``, ``wait``, ``communicate`` (its output, when it was
    asked for, is read from files once it has ended), ``kill``, ``send_signal``."""

    def __init__(self, program: str, args: Sequence[str], cwd: Path, env: dict, capture: bool) -> None:
        self.args = [sys.executable, program, *args]
        self.returncode: Optional[int] = None
        self._outputs = None
        if capture:
            self._outputs = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
            files = [self._outputs[0].fileno(), self._outputs[1].fileno()]
        else:
            null = os.open(os.devnull, os.O_WRONLY)
            files = [null, null]
        stdin = os.open(os.devnull, os.O_RDONLY)
        self._conn = _Server.connect()
        payload = pickle.dumps({"program": program, "args": list(args), "cwd": str(cwd), "env": dict(env)})
        socket.send_fds(self._conn, [_HEADER.pack(len(payload))], [stdin, *files])
        self._conn.sendall(payload)
        os.close(stdin)
        if not capture:
            os.close(files[0])
        self.pid = _STATUS.unpack(_read_exactly(self._conn, _STATUS.size))[0]

    def poll(self) -> Optional[int]:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self.returncode = _STATUS.unpack(_read_exactly(self._conn, _STATUS.size))[0]
            self._conn.close()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            select.select([self._conn], [], [], left)
        return self.returncode

    def communicate(self, timeout: Optional[float] = None) -> tuple[Optional[str], Optional[str]]:
        self.wait(timeout)
        if self._outputs is None:
            return None, None
        texts = []
        for output in self._outputs:
            output.seek(0)
            texts.append(output.read().decode(errors="replace"))
            output.close()
        self._outputs = None
        return texts[0], texts[1]

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_command(program: str, args: Sequence[str], cwd: Path, env: dict, capture: bool = True, fresh: bool = False):
    """``python PROGRAM ARGS`` in ``cwd`` with ``env``: a fork of the command server, or a new interpreter
    (``fresh``, or every command under ``CURRY_TEST_FRESH_INTERPRETERS=1``), in a session of its own
    either way."""
    if fresh or os.environ.get("CURRY_TEST_FRESH_INTERPRETERS") == "1":
        output = subprocess.PIPE if capture else subprocess.DEVNULL
        return subprocess.Popen(
            [sys.executable, program, *args],
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=output,
            text=True,
            start_new_session=True,
        )
    return ForkedCommand(program, args, cwd, env, capture)


if __name__ == "__main__":
    # The checkout's curry_train, as ``python <checkout>/train.py`` imports it (its directory comes first)
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
    sys.exit(serve(sys.argv[1]))
