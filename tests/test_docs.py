"""Every fenced code block in README.md and docs/*.md is checked, so the docs cannot drift from the code.

The rule:
- ```python blocks run standalone, each in a fresh temporary directory, in this process.
- ```bash blocks must pass `bash -n`. Each command in them must exist in the repository: `make`
  targets are dry-run with `make -n`; scripts run by path (`benchmarks/gpu_check.sh`,
  `.venv/bin/python benchmarks/bench_cpu.py --quick`) must exist, and every `--option` they are given
  must appear in the script's source; `python -m mos <command>` must name a command of
  `mos.__main__`, whose `--help` is run (cheap by design); any other program must be on PATH.
- ```text blocks are figures (diagrams, sample output) and are not run.
A block without a language, or with another one, fails the test: every block is classified on purpose.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(`{3,})(.*)$")
PYTHON_WORDS = {"python", "python3", ".venv/bin/python", sys.executable}


def fenced_blocks(path: Path):
    """[(language, first line number, code)] of every fenced block in `path`."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i].strip())
        if not match:
            i += 1
            continue
        fence, language, start = match.group(1), match.group(2).strip(), i + 1
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.name}:{start}: fenced block is never closed")
        blocks.append((language, start, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


ALL_BLOCKS = [pytest.param(lang, code, id=f"{path.relative_to(ROOT)}:{line}:{lang or 'untagged'}")
              for path in DOCS for lang, line, code in fenced_blocks(path)]


def test_docs_have_blocks():
    # The collector itself is checked: README has its quickstart, and every doc file is read.
    languages = [p.values[0] for p in ALL_BLOCKS]
    assert languages.count("python") >= 3 and "bash" in languages


@pytest.mark.parametrize("language, code", ALL_BLOCKS)
def test_doc_block(language, code, tmp_path, monkeypatch):
    if language == "python":
        run_python_block(code, tmp_path, monkeypatch)
    elif language == "bash":
        check_bash_block(code)
    elif language != "text":
        pytest.fail(f"fenced block tagged {language!r}: tag it python, bash or text (a figure)")


def run_python_block(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_block__"}
    exec(compile(code, "<doc block>", "exec"), namespace)


# ---------------------------------------------------------------------------- bash


def check_bash_block(code):
    syntax = subprocess.run(["bash", "-n"], input=code, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    commands = list(_commands(code))
    assert commands, "a bash block without commands"
    for words in commands:
        check_command(words)


def _commands(code):
    """Each simple command of the block as a word list (comments dropped; split at && || ; |)."""
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        current = []
        for word in words + [";"]:
            if word in ("&&", "||", ";", "|"):
                if current:
                    yield current
                current = []
            else:
                current.append(word)


def check_command(words):
    env = [w for w in words if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w)]
    words = words[len(env):] if words[:len(env)] == env else words
    program, args = words[0], words[1:]
    if program == "make":
        targets = [a for a in args if not a.startswith("-") and "=" not in a]
        dry = subprocess.run(["make", "-n", "-C", str(ROOT), *targets], capture_output=True, text=True)
        assert dry.returncode == 0, f"make {' '.join(targets)}: {dry.stderr}"
    elif program in PYTHON_WORDS:
        if program.startswith(".venv/"):
            assert (ROOT / program).exists(), f"{program}: missing (scripts/setup.sh creates it)"
        _check_python_invocation(args)
    elif "/" in program:
        script = ROOT / program
        assert script.is_file() and os.access(script, os.X_OK), f"{program}: no such executable in the repo"
        if script.suffix == ".sh":
            assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        _check_options(script, args)
    else:
        assert shutil.which(program), f"{program}: not a program on PATH"


def _check_python_invocation(args):
    if args[:2] == ["-m", "mos"]:
        command, options = args[2], args[3:]
        main = _mos_command_module(command)
        help_run = subprocess.run([sys.executable, "-m", "mos", command, "--help"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
        assert help_run.returncode == 0, help_run.stderr
        _check_options(main, options)
    elif args and args[0] == "-m":
        pytest.fail(f"python -m {args[1]}: only `python -m mos <command>` is checked; add a rule here")
    else:
        script = ROOT / args[0]
        assert script.is_file(), f"{args[0]}: no such file in the repo"
        _check_options(script, args[1:])


def _mos_command_module(command):
    from mos.__main__ import COMMANDS
    assert command in COMMANDS, f"python -m mos {command}: commands are {sorted(COMMANDS)}"
    return ROOT / (COMMANDS[command][0].replace(".", "/") + ".py")


def _check_options(script: Path, args):
    source = script.read_text(encoding="utf-8")
    for option in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"""["']{re.escape(option)}["']""", source), f"{script.name} has no option {option}"
