"""benchmarks/real_model_study.py: its task, its exact-match measure against real greedy decoding on
SmolLM2-135M-Instruct, its verdict rules, the toy numbers it reads, and its smoke run end to end."""
import copy
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gguf")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import torch  # noqa: E402

import real_model_study as study  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    from mos.pretrained import load_smollm2

    model, tokenizer = load_smollm2()  # the loader's cache, downloaded once
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


@pytest.mark.parametrize("n, numeral", [(1, "I"), (4, "IV"), (9, "IX"), (14, "XIV"), (40, "XL"), (90, "XC"),
                                        (400, "CD"), (449, "CDXLIX"), (1987, "MCMLXXXVII"), (2024, "MMXXIV"),
                                        (3888, "MMMDCCCLXXXVIII"), (3999, "MMMCMXCIX")])
def test_roman(n, numeral):
    assert study.roman(n) == numeral


@pytest.mark.parametrize("bad", [0, 4000, -3, 2.0])
def test_roman_refuses_numbers_it_cannot_write(bad):
    with pytest.raises(ValueError, match="Roman numerals cover 1..3999"):
        study.roman(bad)


def test_split_is_disjoint_complete_and_fixed():
    a = study.split_numbers(100, 300, 3999)
    assert [len(a[k]) for k in ("test", "val", "train")] == [300, 100, 3599]
    assert sorted(a["test"] + a["val"] + a["train"]) == list(range(1, 4000))
    assert a == study.split_numbers(100, 300, 3999)
    assert sorted(sum(study.split_numbers(80, 160).values(), [])) == list(range(1, 1000))
    with pytest.raises(ValueError, match="at least half of 1..999 for training"):
        study.split_numbers(200, 400)
    with pytest.raises(ValueError, match="top must be in 1..3999"):
        study.split_numbers(1, 1, 4000)


def test_encode_masks_all_but_the_answer_and_pads_on_the_right(smollm2):
    _, tok = smollm2
    ids, labels, first = study.encode(tok, [7, 1987])
    assert first == len(tok(study.prompt(7), add_special_tokens=False).input_ids)
    for row, n in enumerate((7, 1987)):
        answer = labels[row][labels[row] != -100].tolist()
        assert answer[-1] == tok.eos_token_id
        assert tok.decode(answer[:-1]) == " " + study.roman(n)
        real = ids[row][: len(tok(study.prompt(n), add_special_tokens=False).input_ids) + len(answer)]
        assert tok.decode(real.tolist()) == study.prompt(n) + " " + study.roman(n) + tok.eos_token
    assert (ids[0, -2:] == tok.eos_token_id).all()  # "7" is shorter: padded on the right
    with pytest.raises(ValueError, match="non-empty prompt and a non-empty answer"):
        study.encode_rows([([1, 2], [])], pad_id=0)


def test_one_teacher_forced_pass_agrees_with_greedy_decoding(smollm2):
    """The accuracy's definition: a row counts as right exactly when `generate` (greedy) reproduces it."""
    model, tok = smollm2
    prompts = [tok(t, add_special_tokens=False).input_ids
               for t in ("The capital of France is", "1, 2, 3, 4,", "MCM in Roman numerals is")]
    greedy = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
        greedy.append(out[0, len(p):].tolist())
    rows = [(p, g) for p, g in zip(prompts, greedy)]  # what greedy decoding wrote: every row right
    wrong_last = [(p, g[:-1] + [(g[-1] + 1) % len(tok)]) for p, g in zip(prompts, greedy)]
    wrong_first = [(p, [(g[0] + 1) % len(tok)] + g[1:]) for p, g in zip(prompts, greedy)]
    for batch, expected in ((rows, True), (wrong_last, False), (wrong_first, False), (rows[:1] + wrong_last[1:], None)):
        ids, labels, first = study.encode_rows(batch, pad_id=tok.eos_token_id)
        hits, loss, tokens = study.exact_matches(model, ids, labels, first)
        want = [expected] * 3 if expected is not None else [True, False, False]
        assert hits.tolist() == want
        assert tokens == sum(len(a) for _, a in batch) and loss > 0


def test_methods_and_budgets_on_the_real_model(smollm2):
    from mos import MoSConfig
    from mos.budget import lora_budget, module_types_from_model, mos_budget

    model, _ = smollm2
    types = module_types_from_model(model, study.TARGETS)
    assert {t.n_layers for t in types} == {30} and len(types) == 7
    methods = {m.key: m for m in study.study_methods(model, (1e-3,))}
    assert set(methods) == {"lora1", "lora2", "lora8", "lora16", "mos1", "mos2", "mos2_l4"}
    for key, (budget, r, l) in study.MOS_VARIANTS.items():
        kw = methods[key].spec["mos"]
        assert (kw["r"], kw["equivalent_rank"], kw["shards_per_vector"]) == (r, budget, l)
        assert mos_budget(types, MoSConfig(**kw)).trainable_params == lora_budget(types, budget).trainable_params
    # Built and counted for real: MoS R_e=2 trains exactly LoRA r=2's parameters on SmolLM2.
    counts = {}
    for key in ("lora2", "mos2"):
        built = methods[key].build(copy.deepcopy(model), 0)
        counts[key] = sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert counts["lora2"] == counts["mos2"] == 610_560


def _res(acc, acc_sd, loss, loss_sd, n=3):
    return {"acc_mean": acc, "acc_std": acc_sd, "test_mean": loss, "test_std": loss_sd, "n_seeds": n}


def _results(mos_acc, lora_acc, big_gain=0.2):
    """LoRA r=1, 2 at `lora_acc`, r=8, 16 `big_gain` above; MoS at `mos_acc`; sd 0.01 everywhere."""
    r = {"lora1": _res(lora_acc, 0.01, 1.0, 0.01), "lora2": _res(lora_acc, 0.01, 1.0, 0.01),
         "lora8": _res(lora_acc + big_gain, 0.01, 0.8, 0.01), "lora16": _res(lora_acc + big_gain, 0.01, 0.8, 0.01)}
    r.update(mos1=_res(mos_acc, 0.01, 1.0 - (mos_acc - lora_acc), 0.01),
             mos2=_res(mos_acc, 0.01, 1.0 - (mos_acc - lora_acc), 0.01))
    return r


@pytest.mark.parametrize("mos_acc, expected", [(0.60, "holds"), (0.505, "ties"), (0.40, "fails")])
def test_equal_budget_verdict(mos_acc, expected):
    line = study.verdict_equal_budget(_results(mos_acc, 0.5))
    assert line.startswith(f"**MoS beats LoRA at an equal budget**: {expected}:"), line


@pytest.mark.parametrize("mos_acc, big_gain, expected", [
    (0.70, 0.2, "holds"),   # level with 8x LoRA, which is measurably better than LoRA at B
    (0.72, 0.2, "holds"),   # above 8x LoRA
    (0.55, 0.2, "fails"),   # below 8x LoRA
    (0.50, 0.0, "ties"),    # level, but 8x the rank buys LoRA nothing: nothing shown
])
def test_eight_times_verdict(mos_acc, big_gain, expected):
    line = study.verdict_eight_times(_results(mos_acc, 0.5, big_gain))
    assert line.startswith(f"**MoS at budget B matches LoRA at 8B**: {expected}:"), line


@pytest.mark.parametrize("toy_edge, expected", [(-0.5, "holds"), (0.1, "ties"), (0.9, "fails")])
def test_real_vs_toy_verdict(toy_edge, expected):
    r = _results(0.6, 0.5)  # MoS's loss 0.1 below LoRA's, whose fine-tuning removed 1.0: edge 0.1
    assert study.real_relative_edges(r, 2.0)[0] == pytest.approx(0.1)
    line = study.verdict_real_vs_toy(r, 2.0, [{"name": "toy", "edge": toy_edge, "edge_se": 0.01}])
    assert f"toy bases**: {expected}:" in line, line


def test_toy_mean_carries_the_scatter_between_bases():
    toys = [{"name": "a", "edge": 0.1, "edge_se": 0.001}, {"name": "b", "edge": -0.1, "edge_se": 0.001}]
    mean, se = study.toy_mean(toys)
    assert mean == pytest.approx(0.0)
    assert se == pytest.approx(0.2 / 2 ** 0.5 / 2 ** 0.5)  # sd 0.1414 over sqrt(2): the scatter, not the seeds
    assert study.toy_mean(toys[:1]) == pytest.approx((0.1, 0.001))


def test_relative_edge_refuses_a_lora_that_did_not_learn():
    with pytest.raises(ValueError, match="LoRA did not lower the test loss"):
        study.relative_edge(1.0, 2.5, 2.0, 0.01)


def test_toy_edges_are_read_from_the_toy_sections(tmp_path):
    from results_md import write_section

    path = str(tmp_path / "RESULTS.md")
    header = "| method | trainable params | test loss (mean ± std) | Δ vs base |\n|---|---:|---:|---:|\n"
    write_section("quality", header + "| base model, no fine-tuning | 0 | 2.0000 | 0 |\n"
                  "| LoRA r=1 | 10 | 1.5000 ± 0.0100 | -0.5 |\n| LoRA r=2 | 20 | 1.4000 ± 0.0100 | -0.6 |\n"
                  "| MoS R_e=1 (r=4, l=2, p=0) | 10 | 1.4500 ± 0.0100 | x |\n"
                  "| MoS R_e=2 (r=6, l=2, p=1) | 20 | 1.4600 ± 0.0100 | x |\n"
                  "| MoS R_e=2 w/o sharding (l=1) | 20 | 0.1000 ± 0.0100 | x |\n", path)
    write_section("depth_study", "### L = 4\n\n" + header + "| base model, no fine-tuning | 0 | 3.0000 | 0 |\n"
                  "| LoRA r=1 | 1 | 2.0000 ± 0.0000 | x |\n| LoRA r=2 | 2 | 2.0000 ± 0.0000 | x |\n"
                  "| MoS R_e=1 (r=4, l=2, p=0) | 1 | 2.0000 ± 0.0000 | x |\n"
                  "| MoS R_e=2 (r=8, l=2, p=1) | 2 | 2.0000 ± 0.0000 | x |\n"
                  "| MoS R_e=2 (r=8, l=4, p=1) | 2 | 1.0000 ± 0.0000 | x |\n\n### L = 8\n\nno table\n", path)
    toys = study.toy_edges(path)
    assert [t["name"] for t in toys] == ["quality, 6 layers", "depth study, 4 layers"]
    assert toys[0]["edge"] == pytest.approx(((1.5 - 1.45) / 0.5 + (1.4 - 1.46) / 0.6) / 2)
    assert toys[1]["edge"] == 0.0  # the l = 4 row is not the one compared


def test_the_committed_toy_sections_give_five_bases():
    assert len(study.toy_edges()) == 5  # quality, and the depth study's 4, 8, 16 and 32 layers


def test_cuda_configuration_parses_and_refuses_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(SystemExit):
        study.main(["--device", "cuda"])
    assert study.PROFILES["cuda"].device == "cuda" and study.PROFILES["cuda"].steps > study.PROFILES["cpu"].steps


def test_smoke_run_writes_plot_and_verdicts_without_touching_results(tmp_path):
    results = os.path.join(BENCH_DIR, "RESULTS.md")
    before = open(results, encoding="utf-8").read() if os.path.exists(results) else None
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "real_model_study.py"), "--smoke", "--threads", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for claim in ("MoS beats LoRA at an equal budget**", "MoS at budget B matches LoRA at 8B**",
                  "by more than it did on the toy bases**"):
        line = next(line for line in proc.stdout.splitlines() if claim in line)
        assert any(f"{claim}: {v}:" in line for v in ("holds", "ties", "fails")), line
    assert (tmp_path / "real_model_study_smoke.png").stat().st_size > 10_000
    section = (tmp_path / "section.md").read_text(encoding="utf-8")
    assert "| MoS R_e=2 (r=8, l=4, p=" in section and "| LoRA r=16 |" in section
    after = open(results, encoding="utf-8").read() if os.path.exists(results) else None
    assert before == after
