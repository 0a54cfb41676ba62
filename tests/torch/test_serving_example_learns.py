"""examples/serve_many_adapters.py shows adapters that learned: in the mixed batch, each adapter
continues its own arithmetic sequence after its 20 default training steps."""
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "serve_many_adapters.py"


def test_each_served_adapter_continues_its_own_pattern(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main(["--adapters", "2"]) == 2
    out = capsys.readouterr().out
    assert "task0     continues [0, 3, 6, 9, 12, 15] with [18, 21, 24, 27, 30, 33] (its pattern)" in out
    assert "__base__  continues" in out and "2/2 adapters continue their own pattern" in out
