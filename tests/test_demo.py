"""`python -m mos demo` fine-tunes SmolLM2-135M-Instruct and prints what it promises; the toy demo
(`python -m mos toy-demo`) ends by pointing at the measured verdicts, and what it points at exists."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_toy_demo_points_at_the_studies_that_decide():
    proc = subprocess.run([sys.executable, "-m", "mos", "toy-demo", "--methods", "lora-same-params", "--steps", "2",
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


def test_real_model_demo_prints_answers_accuracy_sizes_and_the_export_check():
    pytest.importorskip("gguf")
    proc = subprocess.run([sys.executable, "-m", "mos", "demo", "--steps", "3", "--batch-size", "4",
                           "--held-out", "4", "--examples", "2"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "fine-tuning" in proc.stderr  # the progress bar
    assert out.count("expected '") == 2 and " before '" in out and " after '" in out
    assert "exact match on 4 held-out questions: before " in out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    mos_line = next(v for k, v in lines.items() if k.startswith("MoS r=8 (R_e=2)"))
    lora_line = next(v for k, v in lines.items() if k.startswith("PEFT LoRA r=8"))
    assert "610,560" in mos_line and "2,442,240" in lora_line
    assert "PEFT export check: export_lora loaded by peft.PeftModel gives the same logits" in out
    assert out.rstrip().splitlines()[-2].endswith(": OK")


def test_demo_help_says_which_demo_is_which():
    for command, says in (("demo", "toy demo"), ("toy-demo", "main demo")):
        proc = subprocess.run([sys.executable, "-m", "mos", command, "--help"], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0 and says in proc.stdout, proc.stdout
