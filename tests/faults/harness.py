"""Fault injection for adapter saves: kill -9 a process at its Nth file-system operation, or after a delay.

``FaultSwitch(kill_at=N, log_fd=fd).install()`` wraps every operation that changes the file system (os.replace,
os.rename, os.mkdir, os.rmdir, os.unlink, os.remove, os.chmod, os.fsync, the renameat2 exchange, opening a file
for writing and each write to it). Operation number ``kill_at`` (0-based) is not performed: the process sends
itself SIGKILL instead, after a torn half of the data for a write. Every operation is first logged, one line,
to ``log_fd`` (an inherited file descriptor: the log survives the kill).

``fork_and_wait(child)`` runs ``child()`` in a forked copy of the calling process (torch already imported: no
interpreter start-up per kill) and returns how it ended.
"""

from __future__ import annotations

import builtins
import io
import os
import signal
import sys
import time
import traceback

WRAPPED_OS = ("replace", "rename", "mkdir", "rmdir", "unlink", "remove", "chmod", "fsync")
DEAD_PID = 2**22 + 7  # above the largest pid_max: no process has it
WRITE_MODES = set("wxa+")


def _name(arg) -> str:
    return os.path.basename(os.fspath(arg)) if isinstance(arg, str | bytes | os.PathLike) else str(arg)


class _Writer:
    """A file opened for writing whose writes are counted operations (a kill tears the write in half)."""

    def __init__(self, f, switch: FaultSwitch, name: str):
        self._f, self._switch, self._name = f, switch, name

    def write(self, data):
        self._switch.hit(f"write {self._name} ({len(data)} bytes)", torn=lambda: self._tear(data))
        return self._f.write(data)

    def _tear(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, attr):
        return getattr(self._f, attr)


class FaultSwitch:
    """Counts file-system operations; SIGKILLs the process at operation ``kill_at`` (None: never)."""

    def __init__(self, kill_at: int | None = None, log_fd: int | None = None):
        self.kill_at, self.log_fd = kill_at, log_fd
        self.count = 0
        self.trace: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def hit(self, what: str, torn=None) -> None:
        n = self.count
        self.count += 1
        self.trace.append(what)
        if self.log_fd is not None:
            os.write(self.log_fd, f"{n}\t{what}\n".encode())
        if n == self.kill_at:
            if torn is not None:
                torn()
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)  # never reached: SIGKILL is delivered at once

    def _patch(self, owner, attr: str, new) -> None:
        self._saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, new)

    def install(self) -> FaultSwitch:
        for fn in WRAPPED_OS:
            real = getattr(os, fn)

            def wrapped(*args, _real=real, _fn=fn, **kwargs):
                shown = args[:2] if _fn in ("replace", "rename") else args[:1]
                self.hit(f"{_fn} {' -> '.join(_name(a) for a in shown)}")
                return _real(*args, **kwargs)

            self._patch(os, fn, wrapped)
        real_open = builtins.open

        def counted_open(file, mode="r", *args, **kwargs):
            if not WRITE_MODES & set(mode):
                return real_open(file, mode, *args, **kwargs)
            self.hit(f"open({mode}) {_name(file)}")
            f = real_open(file, mode, *args, **kwargs)
            return _Writer(f, self, _name(file))

        self._patch(builtins, "open", counted_open)
        self._patch(io, "open", counted_open)
        from moe_lora import atomic_dir

        real_exchange = atomic_dir.exchange

        def exchange(a, b):
            self.hit(f"exchange {_name(a)} <-> {_name(b)}")
            return real_exchange(a, b)

        self._patch(atomic_dir, "exchange", exchange)
        return self

    def uninstall(self) -> None:
        for owner, attr, real in reversed(self._saved):
            setattr(owner, attr, real)
        self._saved.clear()


def fork_and_wait(child, timeout: float = 60.0) -> str:
    """Run ``child()`` in a forked process; 'killed' (SIGKILL), 'completed' (returned), 'error: ...' (raised or
    another signal) or 'hung' (still running after ``timeout`` s, then killed)."""
    return wait(spawn(child), timeout)


def spawn(child) -> int:
    """The pid of a forked process that runs ``child()`` and exits (0 when it returned, 1 when it raised)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        code = 0
        try:
            child()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 60.0) -> str:
    """How the forked process ``pid`` ended (see fork_and_wait)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.0005)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return "killed" if sig == signal.SIGKILL else f"error: signal {sig}"
    code = os.WEXITSTATUS(status)
    return "completed" if code == 0 else f"error: exit code {code}"
