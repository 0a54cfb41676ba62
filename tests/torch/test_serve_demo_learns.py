"""`python -m mos serve-demo` shows adapters that learned: served in one mixed batch, each one
writes its own module's function on from its prompt, the base model does not, and every sample
matches its single-adapter run."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_demo_adapters_write_their_own_functions(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mos", "serve-demo", "--adapters", "2", "--layers", "2",
                          "--hidden", "64", "--steps", "80", "--threads", "1", "--new-tokens", "24"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3/3 continuations identical to single-adapter runs; 2/2 adapters wrote their own function on" in out.stdout
    assert "'pkeys=False, ensure_asci'  (24 bytes as in Lib/json)" in out.stdout
    base_line = out.stdout.split("[__base__]")[1].splitlines()[1]
    assert re.search(r"\((\d) bytes as in Lib/json\)", base_line).group(1) in "0123"
