"""Runs Python code in a child process, so that a crash (a signal) fails one test, not the suite.

The child inherits the environment, so under scripts/sanitize.sh it loads the sanitized build."""
import os
import subprocess
import sys
import textwrap

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_child(code: str, timeout: float = 120.0) -> str:
    """Runs `code` with this interpreter and returns its stdout; fails with the child's output when it
    exits non-zero or dies by a signal (returncode -N)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        raise AssertionError(f"child process ended with {how}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


# What the crash tests' children start from: small valid pools and index tables, and `expect`,
# which prints "ok <error>" when the call raises that error with that text.
SETUP = """
import numpy as np
import mos
from mos import _C, functional as F
from mos.testing.dlpack_producer import Producer, DL_CPU, DL_CUDA

f32 = np.float32
pa, pb = np.ones((12, 4), f32), np.ones((12, 3), f32)
ia, ib = np.arange(8, dtype=np.int32), np.arange(8, 0, -1, dtype=np.int32)

def expect(error, text, call):
    try:
        call()
    except error as e:
        assert text in str(e), (text, str(e))
        print("ok", type(e).__name__, e)
        return
    raise AssertionError(f"no {error.__name__} ({text})")
"""
