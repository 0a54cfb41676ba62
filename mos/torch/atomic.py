"""Crash-safe writes: files that appear whole or not at all, directories swapped in as a whole.

Temporaries live next to their target as .<target>.<pid>.<random>.tmp, are created with mode 0666
less the umask (as open() would create the file), and are removed by a later write into the same
directory once the process that made them is gone, so a kill -9 leaves no lasting debris.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil

__all__ = ["atomic_write", "write_bytes", "write_json", "replace_directory", "remove_stale_temporaries"]

_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)\.[0-9a-f]{16}\.tmp$")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


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


def replace_directory(path: str, fill) -> None:
    """Makes directory `path` hold what fill(tmp_dir) writes, switched in with one atomic exchange:
    at every instant `path` holds the complete old contents or the complete new ones. Entries of
    the old directory that fill does not write are carried over as hard links (copies where the
    file system has none)."""
    path = os.path.realpath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: is a file, expected a directory")
    tmp = _temporary_path(path)
    os.mkdir(tmp, 0o777)  # umask applies
    try:
        fill(tmp)
        if os.path.isdir(path):
            _carry_over(path, tmp)
        for name in os.listdir(tmp):
            if not os.path.isdir(os.path.join(tmp, name)):
                _fsync(os.path.join(tmp, name))
        _fsync(tmp)
        if not os.path.isdir(path):
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            pass  # tmp now holds the old contents
        else:  # no atomic exchange here: the path is briefly absent, never mixed
            old = _temporary_path(path)
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
        _fsync(parent)
    finally:
        _remove(tmp)


def _carry_over(old: str, new: str) -> None:
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.lexists(dst):
            continue
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC or None


_LIBC = None


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
