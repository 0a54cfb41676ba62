"""Shared writer of benchmarks/RESULTS.md: every benchmark owns one marked section and replaces only it.

A section is the text between `<!-- begin:NAME -->` and `<!-- end:NAME -->`. `write_section` rewrites
that span (or appends it), keeping every other byte of the file, and replaces the file atomically
(temp file in the same directory + os.replace) under an advisory lock, so two benchmarks finishing
at once cannot lose each other's sections.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
TITLE = "# mos benchmark results\n\nEach section is written by the benchmark named in its markers; rerun it to refresh.\n"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _markers(name):
    return f"<!-- begin:{name} -->", f"<!-- end:{name} -->"


@contextlib.contextmanager
def _locked(directory):
    """Advisory lock on the results file's directory (no lock file left behind)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic replace still prevents torn files
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def replace_section(text: str, name: str, markdown: str) -> str:
    """`text` with section `name` set to `markdown` (appended at the end if absent)."""
    begin, end = _markers(name)
    block = f"{begin}\n{markdown.strip()}\n{end}"
    start = text.find(begin)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    stop = text.find(end, start)
    if stop < 0:
        raise ValueError(f"RESULTS.md has {begin} without {end}; fix the file by hand")
    return text[:start] + block + text[stop + len(end):]


def read_section(name: str, path: str = RESULTS_PATH) -> str | None:
    """The current body of section `name`, or None."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    begin, end = _markers(name)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        return None
    return text[start + len(begin):stop].strip("\n")


def write_section(name: str, markdown: str, path: str = RESULTS_PATH) -> str:
    """Sets section `name` of the results file to `markdown`; creates the file if missing.

    Returns the path written."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"section name must match {_NAME.pattern}, got {name!r}")
    if "<!-- begin:" in markdown or "<!-- end:" in markdown:
        raise ValueError("markdown must not contain section markers")
    directory = os.path.dirname(os.path.abspath(path))
    with _locked(directory):
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
        else:
            text = TITLE
        new_text = replace_section(text, name, markdown)
        fd, tmp = tempfile.mkstemp(prefix=".RESULTS.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(new_text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the results are meant to be read
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return path


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one), for machine lines."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
