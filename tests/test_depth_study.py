"""benchmarks/depth_study.py: its verdict rule, its method settings per depth, and its smoke run end to end."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import depth_study  # noqa: E402
from depth_study import STUDIES, depth_methods, mos_settings, slope, trend_verdict  # noqa: E402

DEPTHS = (4, 8, 16, 32)


def test_slope_matches_least_squares_on_log2_depth():
    gaps = [0.02, 0.013, 0.011, -0.004]
    beta, se = slope(DEPTHS, gaps, [1e-6] * 4)
    fit, cov = np.polyfit(np.log2(DEPTHS), gaps, 1, cov="unscaled")
    residual = np.sum((np.polyval(fit, np.log2(DEPTHS)) - gaps) ** 2) / 2
    assert beta == pytest.approx(fit[0])
    assert se == pytest.approx(math.sqrt(cov[0, 0] * residual))  # the scatter dominates tiny seed errors


def test_slope_error_carries_the_seeds_error_when_the_points_lie_on_a_line():
    beta, se = slope(DEPTHS, [0.03, 0.02, 0.01, 0.0], [0.002] * 4)
    sxx = sum((x - 3.5) ** 2 for x in (2, 3, 4, 5))
    assert beta == pytest.approx(-0.01)
    assert se == pytest.approx(0.002 / math.sqrt(sxx))


@pytest.mark.parametrize("gaps, ses, expected", [
    ([0.03, 0.02, 0.01, 0.0], [0.002] * 4, "holds"),      # falls 0.03 over the range, well outside noise
    ([0.0, 0.01, 0.02, 0.03], [0.002] * 4, "fails"),      # rises
    ([0.0, 0.001, -0.001, 0.001], [0.0005] * 4, "ties"),  # change below the 0.005 floor
    ([0.03, 0.02, 0.01, 0.0], [0.05] * 4, "ties"),        # falls, but within two errors
])
def test_trend_verdict(gaps, ses, expected):
    assert trend_verdict(DEPTHS, gaps, ses)[0] == expected


def test_slope_needs_two_depths():
    with pytest.raises(ValueError, match="two different depths"):
        slope((8, 8), [0.0, 0.1], [0.01, 0.01])


@pytest.mark.parametrize("study", ["cpu", "cuda", "smoke"])
def test_every_study_builds_its_methods_at_every_depth(study):
    s = STUDIES[study]
    for depth in s.depths:
        methods = {m.key: m for m in depth_methods(s.shape(depth))}
        assert set(methods) == {"lora1", "lora2", "lora8", "lora16", "mos1", "mos2", "mos2_l4"}


def test_private_rank_follows_depth_and_budgets_match_lora():
    from mos import MoSConfig
    from mos.budget import llama_module_types, lora_budget, mos_budget

    study = STUDIES["cpu"]
    for depth in DEPTHS:
        shape = study.shape(depth)
        types = llama_module_types(shape.hidden_size, shape.intermediate_size, depth, shape.num_attention_heads)
        for key, (budget, r, l) in depth_study.MOS_VARIANTS.items():
            kw = mos_settings(key, shape)
            assert (kw["r"], kw["equivalent_rank"], kw["shards_per_vector"]) == (r, budget, l)
            # R_e = 1 has no room for a private rank; R_e = 2 gets p = 1 once 8 - 1 public shards fit.
            assert kw["private_rank"] == (1 if budget == 2 and depth >= 8 else 0)
            assert mos_budget(types, MoSConfig(**kw)).trainable_params == lora_budget(types, budget).trainable_params


def test_cuda_configuration_parses_and_refuses_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        depth_study.main(["--device", "cuda"])


def test_smoke_run_writes_plot_and_verdicts_without_touching_results(tmp_path):
    results = os.path.join(BENCH_DIR, "RESULTS.md")
    before = open(results, encoding="utf-8").read() if os.path.exists(results) else None
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "depth_study.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for claim in ("gap to equal-budget LoRA widens", "gap to 8× LoRA closes"):
        line = next(line for line in proc.stdout.splitlines() if claim in line)
        assert any(f"**: {v}: slope" in line for v in ("holds", "ties", "fails")), line
    assert (tmp_path / "depth_study_smoke.png").stat().st_size > 10_000
    section = (tmp_path / "section.md").read_text(encoding="utf-8")
    assert "### L = 4" in section and "### L = 8" in section and "MoS R_e=2 (r=8, l=4" in section
    after = open(results, encoding="utf-8").read() if os.path.exists(results) else None
    assert before == after
