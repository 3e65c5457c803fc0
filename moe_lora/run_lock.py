"""One run per output directory: a lock file that a second run finds held, with who holds it.

    with RunLock(output_dir):           # raises RunLockedError naming the holder's pid, host and start time
        ...                             # write checkpoints, metrics.jsonl, the adapter

The lock is ``<dir>/.moe-lora.lock``, opened without following a symbolic link and locked with ``flock``
(exclusive, non-blocking); its content (pid, host, start time, command) only tells a second run who holds it.
The kernel releases a flock when its process ends, however it ends (kill -9 included), so a lock left by a
dead run is simply free: the next run takes it over and rewrites the content, and two runs that both find it
stale cannot both get it. The file itself stays (unlinking it would let a third run lock a new file while a
second still holds the old one). ``flock`` is advisory and local to one machine: on network file systems that
do not support it, two machines are not kept apart.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import RunError

LOCK_NAME = ".moe-lora.lock"


class RunLockedError(RunError):
    """The output directory is held by another run (or its lock file cannot be used). Exit code 2."""

    exit_code = 2


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (its details are not written yet)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')!r}, started {started} ({str(info.get('command'))[:200]})"


class RunLock:
    """An exclusive lock on directory ``path`` (created if needed) for as long as the object is held."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.file = self.dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.file, flags, 0o644)
        except OSError as e:
            why = "is a symbolic link; a run never writes through one" if e.errno == errno.ELOOP else e.strerror
            raise RunLockedError(f"output_dir: cannot open the lock file {self.file}: {why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"output_dir: {self.dir} is in use by another run: {holder}. Wait for it to "
                    "finish, stop it, or use another output_dir"
                ) from None
            raise RunLockedError(f"output_dir: cannot lock {self.file}: {e.strerror}") from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
