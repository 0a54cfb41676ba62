"""`python -m mos demo` ends by pointing at the measured verdicts, and what it points at exists."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_points_at_the_studies_that_decide():
    proc = subprocess.run([sys.executable, "-m", "mos", "demo", "--methods", "lora-same-params", "--steps", "2",
                           "--layers", "1", "--hidden", "32", "--batch-size", "2", "--seq-len", "16",
                           "--eval-batches", "1", "--corpus-bytes", "20000", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("This 2-step table is a demo, not the method's verdict")
    for script in ("benchmarks/quality.py", "benchmarks/depth_study.py"):
        assert script in last and os.path.exists(os.path.join(ROOT, script))
    results = open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), encoding="utf-8").read()
    for section in ("quality", "depth_study"):
        assert f"'{section}'" in last and f"<!-- begin:{section} -->" in results
