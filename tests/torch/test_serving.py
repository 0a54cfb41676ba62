"""Mixed-adapter batches and the adapter store: every sample equals its adapter run alone."""
import pytest
import torch

import mos
from mos.torch import serving

from torch_helpers import llama_inputs, make_llama, mos_config, randomize_pools

# Three adapters that differ in everything the store must reconcile: rank, shards per vector
# (packed at their least common multiple), private rank and target modules.
CONFIGS = {
    "alpha": dict(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, seed=1),
    "beta": dict(r=2, equivalent_rank=2, shards_per_vector=4, private_rank=0, seed=2, lora_alpha=4.0),
    "gamma": dict(r=3, equivalent_rank=2, shards_per_vector=1, private_rank=1, seed=3,
                  target_modules=["q_proj", "v_proj", "down_proj"]),
}


def make_model(names=("alpha", "beta", "gamma"), device="cpu", dtype=torch.float32, **extra):
    base = make_llama(dtype=dtype).to(device)
    first, *rest = names
    model = mos.get_mos_model(base, mos_config(**{**CONFIGS[first], **extra}), adapter_name=first)
    for name in rest:
        model.add_adapter(name, mos_config(**{**CONFIGS[name], **extra}))
    randomize_pools(model)
    return model.eval()


def single(model, ids, name):
    """Logits of `ids` with one adapter active (or none for "__base__"), through the training op,
    whose per-row kernels the mixed batch shares (under no_grad a single adapter takes the
    inference path, which rounds differently; tests/torch/test_decode_path.py holds it to the
    training op and the float64 reference)."""
    with torch.enable_grad():
        if name == serving.BASE_ADAPTER:
            with model.disable_adapter():
                return model(ids).logits
        model.set_adapter(name)
        return model(ids).logits.detach()


def assert_close(got, want, what, tol=1e-5):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("seq", [1, 3, 9])  # per-row (decode) and grouped (prefill) paths
def test_each_sample_equals_its_adapter_alone(device, seq):
    model = make_model(device=device)
    names = ["alpha", "gamma", "__base__", "beta", "alpha", "beta"]
    ids = llama_inputs(batch=len(names), seq=seq).to(device)
    with torch.no_grad():
        out = model(ids, adapter_names=names).logits
    for i, name in enumerate(names):
        assert_close(out[i], single(model, ids[i:i + 1], name)[0], f"sample {i} ({name})")


def test_identical_and_base_only_batches(device):
    model = make_model(device=device)
    ids = llama_inputs(batch=4, seq=5).to(device)
    with torch.no_grad():
        same = model(ids, adapter_names=["beta"] * 4).logits
        base = model(ids, adapter_names=["__base__"] * 4).logits
    assert_close(same, single(model, ids, "beta"), "identical")
    assert_close(base, single(model, ids, "__base__"), "base only", tol=1e-6)


def test_generate_with_one_adapter_per_sample(device):
    model = make_model(device=device)
    names = ["gamma", "__base__", "alpha"]
    ids = llama_inputs(batch=3, seq=4).to(device)
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        if name == serving.BASE_ADAPTER:
            with model.disable_adapter():
                want = model.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], max_new_tokens=6,
                                      do_sample=False, pad_token_id=0)
        else:
            model.set_adapter(name)
            want = model.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], max_new_tokens=6,
                                  do_sample=False, pad_token_id=0)
        assert out[i].tolist() == want[0].tolist(), name


def test_many_adapters_in_one_batch():
    model = make_model(names=("alpha",))
    for k in range(1, 24):
        model.add_adapter(f"a{k}", mos_config(**{**CONFIGS["alpha"], "seed": 100 + k}))
    randomize_pools(model, seed=5)
    names = [f"a{k}" for k in range(1, 24)] + ["alpha"]
    ids = llama_inputs(batch=len(names), seq=2)
    with torch.no_grad():
        out = model(ids, adapter_names=names).logits
    for i in (0, 7, 15, 22, 23):
        assert_close(out[i], single(model, ids[i:i + 1], names[i])[0], names[i])


def test_sixteen_bit_pools_on_cpu_use_the_fallback():
    model = make_model(pool_dtype="bfloat16")
    names = ["beta", "alpha", "__base__"]
    ids = llama_inputs(batch=3, seq=3)
    with torch.no_grad():
        out = model(ids, adapter_names=names).logits
    for i, name in enumerate(names):
        assert_close(out[i], single(model, ids[i:i + 1], name)[0], name, tol=1e-5)


# ---------------------------------------------------------------- errors


def test_mixed_batches_refuse_what_they_cannot_serve():
    model = make_model()
    ids = llama_inputs(batch=2, seq=3)
    with pytest.raises(ValueError, match="unknown adapter 'delta'"):
        model(ids, adapter_names=["alpha", "delta"])
    with pytest.raises(ValueError, match="3 entries for a batch of 2 samples"):
        model(ids, adapter_names=["alpha", "beta", "gamma"])
    with pytest.raises(TypeError, match="one adapter name per sample"):
        model(ids, adapter_names="alpha")
    with pytest.raises(ValueError, match="empty"):
        model(ids, adapter_names=[])
    model.train()
    with pytest.raises(ValueError, match="inference-only; call model.eval"):
        model(ids, adapter_names=["alpha", "beta"])
    with pytest.raises(ValueError, match="inference-only"):
        model.generate(ids, adapter_names=["alpha", "beta"], max_new_tokens=2)
    model.eval()
    model.set_adapter("alpha")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"\['alpha'\] are merged .* unmerge_adapter\(\)"):
        model(ids, adapter_names=["alpha", "beta"])
    model.unmerge_adapter()
    with model.disable_adapter():
        with pytest.raises(ValueError, match="disable_adapter"):
            model(ids, adapter_names=["alpha", "beta"])
    # Nothing stuck: the layers are back to their single-adapter behaviour.
    assert mos.torch.call_context.current_batch() is None
    with torch.no_grad():
        model(ids, adapter_names=["alpha", "beta"])


# ---------------------------------------------------------------- the store


def save_each(model, root):
    for name in model.peft_config:
        model.save_pretrained(str(root), selected_adapters=[name])
    return {name: str(root) if name == "default" else str(root / name) for name in model.peft_config}


def test_store_loads_and_unloads_without_disturbing_others(tmp_path):
    source = make_model()
    dirs = save_each(source, tmp_path / "saved")
    model = mos.MoSModel.from_pretrained(make_llama(), dirs["alpha"], adapter_name="alpha").eval()
    store = model.adapter_store
    ids = llama_inputs(batch=3, seq=4)
    # The same batch before and after other adapters come and go gives bit-identical outputs.
    steady = ["alpha", "__base__", "alpha"]
    with torch.no_grad():
        before = model(ids, adapter_names=steady).logits.clone()
        store.load(dirs["beta"], "beta")
        store.load(dirs["gamma"], "gamma")
        assert store.adapter_names == ["alpha", "beta", "gamma"]
        assert torch.equal(model(ids, adapter_names=steady).logits, before)
        mixed = model(ids, adapter_names=["alpha", "beta", "gamma"]).logits
        for i, name in enumerate(["alpha", "beta", "gamma"]):
            assert_close(mixed[i], single(source, ids[i:i + 1], name)[0], name)
        with_gamma = model(ids, adapter_names=["alpha", "__base__", "gamma"]).logits.clone()
        store.unload("beta", save_directory=str(tmp_path / "beta-again"))
        assert store.adapter_names == ["alpha", "gamma"]
        assert torch.equal(model(ids, adapter_names=steady).logits, before)
        assert torch.equal(model(ids, adapter_names=["alpha", "__base__", "gamma"]).logits, with_gamma)
        with pytest.raises(ValueError, match="unknown adapter 'beta'"):
            model(ids, adapter_names=["alpha", "beta", "gamma"])
        store.load(str(tmp_path / "beta-again"), "beta")
        assert torch.equal(model(ids, adapter_names=["alpha", "beta", "gamma"]).logits, mixed)


def test_store_refuses_adapters_that_do_not_fit(tmp_path):
    other = mos.get_mos_model(make_llama(hidden_size=48, num_attention_heads=4), mos_config())
    other.save_pretrained(str(tmp_path / "wide"))
    half = mos.get_mos_model(make_llama(), mos_config(pool_dtype="float64"))
    half.save_pretrained(str(tmp_path / "f64"))
    model = make_model()
    store = model.adapter_store
    names = store.adapter_names
    with pytest.raises(ValueError, match="48"):
        store.load(str(tmp_path / "wide"), "wide")
    with pytest.raises(ValueError, match="pool_dtype 'float64' differs from the store's 'float32'"):
        store.load(str(tmp_path / "f64"), "f64")
    with pytest.raises(ValueError, match="reserved"):
        store.load(str(tmp_path / "f64"), serving.BASE_ADAPTER)
    with pytest.raises(FileNotFoundError):
        store.load(str(tmp_path / "missing"), "missing")
    assert store.adapter_names == names and list(model.peft_config) == names


def test_store_holds_one_copy_of_every_pool():
    model = make_model()
    store = model.adapter_store
    store.refresh()
    for pack in store._types.values():
        lo = pack.pool_a.data_ptr()
        hi = lo + pack.pool_a.numel() * pack.pool_a.element_size()
        for name in pack.offsets:
            ptr = model.mos_pools[name][pack.module_type].pool_a.data_ptr()
            assert lo <= ptr < hi, f"{name}'s {pack.module_type} pool is not a view of the store"
    resident, lora = store.resident_bytes(), store.lora_bytes()
    assert sum(resident.values()) == store.total_bytes()
    for name in resident:
        config = model.peft_config[name]
        pools = sum(p.numel() * p.element_size() for p in model.mos_pools[name].parameters())
        assert pools == lora[name] * config.equivalent_rank // config.r  # exactly R_e / r of LoRA
        # The rest is index tables: the adapter's own, and its row of each table of the store.
        tables = sum(b.numel() * b.element_size() for b in model.mos_pools[name].buffers())
        rows = sum((p.index_a.shape[1] * 2 + 1) * 4 for packs in store._layers.values() for p in packs)
        scales = 4 * len(store._types)
        assert resident[name] == pools + tables + rows + scales


def test_store_follows_training_and_new_adapters():
    model = make_model(names=("alpha", "beta"))
    ids = llama_inputs(batch=2, seq=3)
    with torch.no_grad():
        model(ids, adapter_names=["alpha", "beta"])  # packs the store
    model.set_adapter("alpha")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.eval()
    model.add_adapter("gamma", mos_config(**CONFIGS["gamma"]))
    randomize_pools(model, seed=11)
    with torch.no_grad():
        out = model(ids, adapter_names=["alpha", "gamma"]).logits
    assert_close(out[0], single(model, ids[:1], "alpha")[0], "alpha after training")
    assert_close(out[1], single(model, ids[1:], "gamma")[0], "gamma added later")


def test_store_of_a_cast_model_loads_adapters_saved_from_it(tmp_path):
    # model.to(dtype) casts the pools but leaves each config's pool_dtype as it was; the store
    # must compare against what its pools hold.
    model = make_model(names=("alpha", "beta")).to(torch.bfloat16)
    model.adapter_store.save("alpha", str(tmp_path / "alpha"))
    store = model.adapter_store
    store.load(str(tmp_path / "alpha"), "alpha2")
    ids = llama_inputs()
    with torch.no_grad():  # alpha2 is alpha saved and loaded back: the same pools, the same rows
        got = model(ids, adapter_names=["alpha2", "beta"]).logits
        want = model(ids, adapter_names=["alpha", "beta"]).logits
    assert torch.equal(got, want)
    assert not torch.equal(got[0], model(ids[:1], adapter_names=["beta"]).logits[0])
    fresh = mos.get_mos_model(make_llama(), mos_config(**CONFIGS["alpha"]))
    fresh.save_pretrained(str(tmp_path / "f32"))
    with pytest.raises(ValueError, match="pool_dtype 'float32' differs from the store's 'bfloat16'"):
        store.load(str(tmp_path / "f32"), "f32")
