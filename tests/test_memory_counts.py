"""Parameter and byte counts of mos.budget and benchmarks/bench_memory.py, pinned to the paper's numbers."""
import importlib.util
import os
import sys
import threading

import pytest

from mos import MoSConfig
from mos.budget import (Budget, ModuleType, llama_module_types, lora_budget, module_types_from_model,
                        mos_budget)

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
PAPER_UNIT = 2_498_560  # one equivalent rank on LLaMA2-7B's seven module types


def _load(name):
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llama():
    return llama_module_types(**LLAMA2_7B)


@pytest.mark.parametrize("r, l, p", [(8, 2, 1), (16, 4, 1), (4, 1, 0), (2, 1, 2), (33, 1, 1)])
def test_mos_equivalent_rank_2_is_paper_count(llama, r, l, p):
    config = MoSConfig(r=r, equivalent_rank=2, shards_per_vector=l, private_rank=p)
    assert mos_budget(llama, config).trainable_params == 4_997_120


@pytest.mark.parametrize("r, l, p", [(16, 4, 2), (32, 4, 2), (32, 2, 0), (8, 1, 8)])
def test_mos_equivalent_rank_8_is_paper_count(llama, r, l, p):
    config = MoSConfig(r=r, equivalent_rank=8, shards_per_vector=l, private_rank=p)
    assert mos_budget(llama, config).trainable_params == 19_988_480


def test_lora_rank_64_is_paper_count(llama):
    assert lora_budget(llama, 64).trainable_params == 159_907_840


@pytest.mark.parametrize("rank", [1, 2, 8, 64])
def test_one_equivalent_rank_costs_one_lora_rank(llama, rank):
    assert lora_budget(llama, rank).trainable_params == rank * PAPER_UNIT
    config = MoSConfig(r=max(rank, 2), equivalent_rank=rank, shards_per_vector=1, private_rank=0)
    assert mos_budget(llama, config).trainable_params == rank * PAPER_UNIT


def test_bytes(llama):
    config = MoSConfig(r=16, equivalent_rank=8, shards_per_vector=4, private_rank=2)
    b = mos_budget(llama, config)
    assert b.weight_bytes == 4 * 19_988_480
    assert b.grad_bytes == b.weight_bytes
    assert b.optimizer_bytes == 2 * 4 * 19_988_480
    assert b.training_bytes == 16 * 19_988_480
    # two int32 tables (32 layers x r*l entries) per module type, seven types
    assert b.index_bytes == 7 * 2 * 32 * 16 * 4 * 4
    assert b.file_bytes == b.weight_bytes + b.index_bytes
    half = mos_budget(llama, MoSConfig(r=16, equivalent_rank=8, shards_per_vector=4, private_rank=2,
                                       pool_dtype="bfloat16"))
    assert half.weight_bytes == 2 * 19_988_480 and half.optimizer_bytes == b.optimizer_bytes
    lora = lora_budget(llama, 64)
    assert lora.index_bytes == 0 and lora.file_bytes == 4 * 159_907_840


def test_invalid_mos_config_raises_like_mos(llama):
    with pytest.raises(ValueError, match="shards_per_vector=3 must divide both"):  # 11008, 4096: not by 3
        mos_budget(llama, MoSConfig(r=8, equivalent_rank=2, shards_per_vector=3, private_rank=1))
    with pytest.raises(ValueError, match="without subset_selection .* r must be 64"):  # r = N_pub / l + p
        mos_budget(llama, MoSConfig(r=8, equivalent_rank=2, shards_per_vector=1, private_rank=0,
                                    subset_selection=False))
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        lora_budget(llama, 0)


def test_llama_shapes_and_gqa():
    types = {t.name: t for t in llama_module_types(**LLAMA2_7B)}
    assert types["q_proj"] == ModuleType("q_proj", 4096, 4096, 32)
    assert types["down_proj"] == ModuleType("down_proj", 11008, 4096, 32)
    gqa = {t.name: t for t in llama_module_types(2048, 8192, 16, num_attention_heads=32,
                                                   num_key_value_heads=8, target_modules=["k_proj"])}
    assert gqa == {"k_proj": ModuleType("k_proj", 2048, 512, 16)}
    with pytest.raises(ValueError, match=r"unknown Llama module\(s\) \['lm_head'\]"):
        llama_module_types(64, 128, 2, target_modules=["lm_head"])


def test_module_types_from_model_matches_llama_on_meta_device():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=32)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    found = module_types_from_model(model, targets)
    expected = llama_module_types(64, 176, 3, num_attention_heads=4, num_key_value_heads=2)
    assert sorted(found, key=lambda t: t.name) == sorted(expected, key=lambda t: t.name)


def test_bench_memory_rows_pin_paper_counts():
    bench = _load("bench_memory")
    by_method = {b.method: b for b in bench.rows()}
    assert by_method["MoS R_e=2 r=8 l=2 p=1"].trainable_params == 4_997_120
    assert by_method["MoS R_e=8 r=16 l=4 p=2"].trainable_params == 19_988_480
    assert by_method["LoRA r=64"].trainable_params == 159_907_840
    assert by_method["LoRA r=64"].trainable_params / by_method["MoS R_e=8 r=32 l=4 p=2"].trainable_params == 8
    text = bench.table(bench.rows())
    assert "159,907,840" in text and "4,997,120" in text and "19,988,480" in text


def test_results_md_sections(tmp_path):
    results = _load("results_md")
    path = str(tmp_path / "RESULTS.md")
    results.write_section("alpha", "## A\n\none", path=path)
    results.write_section("beta", "## B\n\ntwo", path=path)
    results.write_section("alpha", "## A\n\nthree", path=path)
    text = open(path).read()
    assert text.startswith("# ")
    assert "one" not in text and "three" in text and "two" in text
    assert text.index("begin:alpha") < text.index("begin:beta")  # replaced in place
    assert results.read_section("beta", path=path) == "## B\n\ntwo"
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no temp or lock files left
    with pytest.raises(ValueError, match=r"section name must match .*got 'bad name'"):
        results.write_section("bad name", "x", path=path)
    with pytest.raises(ValueError, match="markdown must not contain section markers"):
        results.write_section("gamma", "<!-- end:alpha -->", path=path)


def test_results_md_concurrent_writers_keep_every_section(tmp_path):
    results = _load("results_md")
    path = str(tmp_path / "RESULTS.md")
    names = [f"s{i}" for i in range(8)]

    def writer(name):
        for k in range(5):
            results.write_section(name, f"{name} v{k}", path=path)

    threads = [threading.Thread(target=writer, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in names:
        assert results.read_section(name, path=path) == f"{name} v4"


def test_budget_is_plain_data():
    b = Budget("x", 10, 2, index_entries=3)
    assert (b.weight_bytes, b.optimizer_bytes, b.index_bytes, b.file_bytes) == (20, 80, 12, 32)
