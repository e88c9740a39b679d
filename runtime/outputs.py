"""Outputs written without losing data. Each output is built beside its place under an
exclusive, unpredictable name (`.tcc-staging.PID.RANDOM`, PID the writer's) and moved into
place in one step; an artifact directory already there is swapped with the new one in one
step, so that a kill at any instant leaves the old output or the new one, never neither.
Staging left by a killed writer is removed by the next write beside it: only when its writer
is gone and holds no lock on it, so that concurrent writers keep theirs. OS errors become
one-line `TccError`s naming the output."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from tcc.ir.errors import TccError

STAGING = ".tcc-staging"
_STAGING_NAME = re.compile(rf"{re.escape(STAGING)}\.(\d+)\.")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}  # for a libc without renameat2 (glibc before 2.28)


def output_error(path: str | os.PathLike, e: OSError) -> TccError:
    """`e`, raised while writing output `path`, as a one-line error naming `path`."""
    return TccError(f"{path}: cannot write ({e.strerror or e})")


def check_new_file(path: Path) -> None:
    """Raise, before the work that makes it, unless file `path` can be written: not a
    directory, in an existing directory that takes new files."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise output_error(path, e) from None
    probe(path.parent, path)


def probe(directory: Path, output: str | os.PathLike) -> None:
    """Raise, naming `output`, unless `directory` takes new entries (it exists, is a directory,
    is writable, on a file system mounted read-write): make one there and remove it."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f"{STAGING}.{os.getpid()}.", dir=directory))
    except OSError as e:
        raise output_error(output, e) from None


def write_file(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write file `path` in one step: `write(f)` fills a new file beside it, which then
    replaces `path` (a symbolic link there is replaced, not followed). On any failure the new
    file is removed; an OSError becomes a one-line TccError."""
    try:
        remove_stale_staging(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f"{STAGING}.{os.getpid()}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's file is private
                write(f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise output_error(path, e) from None
    return path


@contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A new, private directory in `parent` to build an output in, locked as this process's
    while the context lasts and then removed with whatever it holds (after `publish`, the
    output it replaced). Stale staging in `parent` is removed first."""
    remove_stale_staging(parent)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}.{os.getpid()}.", dir=parent))
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


def publish(staging: Path, path: Path) -> None:
    """Give the directory `staging` the modes of one made with the umask and move it to `path`;
    an existing `path` ends at `staging`. On Linux the two are swapped in one step
    (renameat2 with RENAME_EXCHANGE). Where the system or the file system cannot, two renames:
    a kill between them leaves `path` missing and its old contents at a stale staging name."""
    mode = 0o777 & ~_umask()
    for item in [staging, *staging.rglob("*")]:
        item.chmod(mode if item.is_dir() else mode & 0o666)
    if not os.path.lexists(path):
        os.rename(staging, path)
    elif not _exchange(staging, path):
        old = staging.with_name(staging.name + ".old")
        os.rename(path, old)
        os.rename(staging, path)
        os.rename(old, staging)


def remove_stale_staging(parent: Path) -> None:
    """Remove the staging directories and files in `parent` whose writers are gone: their
    process has ended and nothing holds a lock on them."""
    for entry in os.scandir(parent):
        match = _STAGING_NAME.match(entry.name)
        if not match or _alive(int(match[1])):
            continue
        is_dir = entry.is_dir(follow_symlinks=False)
        if not (is_dir or entry.is_file(follow_symlinks=False)):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer (in another PID namespace) holds it
            if is_dir:
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths `a` and `b` in one step; False where the system or the file system cannot."""
    libc = _libc()
    if libc is None:
        return False
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if hasattr(libc, "renameat2"):
        result = libc.renameat2(*args)
    elif platform.machine() in _SYS_RENAMEAT2:
        result = libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), *args)
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):  # an old kernel; a file system without RENAME_EXCHANGE
        return False
    raise OSError(code, os.strerror(code), str(b))
