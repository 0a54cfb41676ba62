"""Every script in examples/ runs in its small mode (--small, or MOS_EXAMPLES_SMALL=1 for the
pytest experiment), in this process so the imports are paid once. docs/testing.md shows the
pytest experiment verbatim."""
import importlib.util
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SCRIPTS = ["numpy_only.py", "train_with_trainer.py", "export_to_peft.py", "serve_many_adapters.py",
           pytest.param("qlora_4bit.py", marks=pytest.mark.skipif(
               importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed"))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_runs_small(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), "--small"])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")  # each script asserts its own result
    assert capsys.readouterr().out.strip()


def test_every_example_is_tested():
    found = {p.name for p in EXAMPLES.iterdir() if p.suffix == ".py" or p.is_dir()} - {"__pycache__"}
    tested = {s if isinstance(s, str) else s.values[0] for s in SCRIPTS} | {"pytest_experiment"}
    assert found == tested


def test_pytest_experiment_runs_small(pytester, monkeypatch):
    monkeypatch.setenv("MOS_EXAMPLES_SMALL", "1")
    result = pytester.runpytest(str(EXAMPLES / "pytest_experiment"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*mos results*", "*test_equal_budget_ablation?lora?*",
                                 "*test_equal_budget_ablation?mos?*"])


def test_docs_show_the_pytest_experiment_verbatim():
    doc = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", doc, flags=re.S | re.M)
    source = (EXAMPLES / "pytest_experiment" / "test_ablation.py").read_text(encoding="utf-8")
    assert source in blocks
