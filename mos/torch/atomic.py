"""Crash-safe file writes and reads: files that appear whole or not at all, read in one go.

Temporaries live next to their target as .<target>.<pid>.<random>.tmp, are created with mode 0666
less the umask (as open() would create the file), and are removed by a later write into the same
directory once the process that made them is gone, so a kill -9 leaves no lasting debris.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat

__all__ = ["atomic_write", "write_bytes", "write_json", "read_regular_file", "remove_regular_file",
           "remove_stale_temporaries"]

_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)\.[0-9a-f]{16}\.tmp$")


def _temporary_path(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a directory; the data is still written
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Calls write(tmp_path) on a fresh file next to `path`, then renames it over `path`, so readers
    see the old file or the new one, never a torn one."""
    tmp = _temporary_path(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync(os.path.dirname(os.path.abspath(path)))


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` through open(), so a new file gets 0666 less the umask (safetensors'
    save_file makes 0600 files)."""
    with open(path, "wb") as f:
        f.write(data)


def write_json(path: str, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def read_regular_file(path: str) -> bytes | None:
    """The bytes of `path`, read through one open file, so a writer renaming a new file into place
    meanwhile gives the old contents or the new ones, never parts of both; None when nothing is
    there. Raises ValueError for anything but a regular file (opened without blocking: a named
    pipe never hangs the reader)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file")
        return f.read()


def remove_regular_file(path: str) -> None:
    """Removes `path` if it is a regular file; raises ValueError for anything else there (a
    directory, a link, a named pipe are never the library's to remove)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: not a regular file; refusing to replace it")
    _remove(path)


def remove_stale_temporaries(directory: str) -> None:
    """Removes the temporaries in `directory` whose writing process no longer exists."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        match = _TEMPORARY.match(name)
        if match and not _process_exists(int(match.group("pid"))):
            _remove(os.path.join(directory, name))


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass
