"""Replace a directory atomically, so that a process killed at any point (kill -9, power loss after the fsyncs)
leaves at ``path`` either the complete old directory, the complete new one, or (first save) nothing.

    tmp = new_temp_dir(path)        fill it; write_new_file() writes and fsyncs each file
    commit_dir(tmp, path)           fsync tmp, then swap it in; the old directory is removed afterwards
    recover(path)                   before a save: restore an old directory an interrupted swap left aside and
                                    remove the leftovers of saves whose process is gone
    backup_of(path)                 the complete old directory an interrupted swap left aside, when ``path`` is
                                    missing (loaders use it; see below)

Swap: on Linux ``renameat2(RENAME_EXCHANGE)`` exchanges ``tmp`` and ``path`` in one step (``tmp`` then holds the
old directory, which is removed). Where that is missing (other systems, some file systems) the old directory is
renamed aside to ``.<name>.old-<pid>-<random>`` and ``tmp`` renamed onto ``path``: between the two renames
``path`` does not exist, and ``backup_of`` finds the complete old directory.

Leftovers are named ``.<name>.tmp-<pid>-<random>`` / ``.<name>.old-<pid>-<random>`` beside ``path``; ``recover``
removes those whose process is no longer running (on this host). Concurrent saves to one path are not
supported.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

RENAME_EXCHANGE = 2
AT_FDCWD = -100


def fsync_path(path: Path) -> None:
    """fsync a file or a directory; best effort where the platform or file system refuses (no directory fds on
    Windows, EINVAL for a directory fsync on some file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a temp file beside it, fsynced, renamed over it, then the
    directory fsynced. A crash leaves the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_new_file(file: Path, data: bytes) -> None:
    """Create ``file`` (it must not exist), write ``data`` and fsync it."""
    with open(file, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, some musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries ``a`` and ``b`` in one atomic step; False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None, str(b))


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would set it, briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def publish_modes(tmp: Path) -> None:
    """Give a finished temporary directory (mkdtemp makes it 0o700) and the files in it the modes that a plain
    mkdir / open would have given them under the current umask."""
    mask = current_umask()
    for f in tmp.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)


def new_temp_dir(path: Path) -> Path:
    """A fresh hidden directory beside ``path`` for the next version of it."""
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))


def leftover_kind(name: str, target: str) -> tuple[str, int] | None:
    """('tmp' | 'old', pid) when ``name`` is a leftover of a save to directory ``target``, else None."""
    m = re.fullmatch(rf"\.{re.escape(target)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+", name)
    return (m.group(1), int(m.group(2))) if m else None


def is_leftover(path: Path) -> bool:
    """True for the hidden temporary or set-aside directory of a save (of any target; also the names without a
    pid that earlier versions used)."""
    return re.fullmatch(r"\..+\.(tmp|old)-[A-Za-z0-9_-]+", path.name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _leftovers(path: Path) -> list[tuple[Path, str, int]]:
    try:
        children = list(path.parent.iterdir())
    except OSError:
        return []
    found = [(c, leftover_kind(c.name, path.name)) for c in children]
    return [(c, kind[0], kind[1]) for c, kind in found if kind is not None]


def backup_of(path: Path, required: tuple[str, ...]) -> Path | None:
    """The newest complete (holding every ``required`` file) set-aside old directory of ``path``, when ``path``
    itself does not exist: what a save killed between its two renames leaves."""
    if path.exists():
        return None
    olds = [c for c, kind, _ in _leftovers(path) if kind == "old" and all((c / r).is_file() for r in required)]
    return max(olds, key=lambda c: c.stat().st_mtime, default=None)


def recover(path: Path, required: tuple[str, ...]) -> None:
    """Put back the old directory an interrupted swap left aside (when ``path`` is missing), then remove the
    leftovers of saves to ``path`` whose process is gone."""
    backup = backup_of(path, required)
    if backup is not None and not _alive(leftover_kind(backup.name, path.name)[1]):
        os.replace(backup, path)
        fsync_path(path.parent)
    for c, _, pid in _leftovers(path):
        if not _alive(pid):
            shutil.rmtree(c, ignore_errors=True)


def commit_dir(tmp: Path, path: Path) -> None:
    """Make the finished directory ``tmp`` the directory ``path`` (see the module docstring)."""
    fsync_path(tmp)
    parent = path.parent
    aside = None
    if not path.exists():
        os.replace(tmp, path)
    elif exchange(tmp, path):
        aside = tmp  # now the old directory
    else:
        aside = parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(path, aside)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(aside, path)  # put the old directory back
            raise
    fsync_path(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
