"""The inference path (mos/torch/decode.py): outputs equal the training op and the float64
reference, nothing stale after the pools change, memory bounded, threads safe.

Both of its routes run here on CPU: float32 pools under a float32 base take the core's in-place
call (nothing cached); float64 pools under the float32 base take the cached assembly, which is
also what CUDA runs."""
import threading

import pytest
import torch

import mos
from mos.testing.models import tiny_llama, token_batch
from mos.testing.reference import reference_forward
from mos.torch import MoSLinear
from mos.torch.decode import entry_elements

ROUTES = {"core": "float32", "cached": "float64"}  # route -> pool dtype that takes it under a float32 base


@pytest.fixture(params=list(ROUTES))
def route(request):
    return request.param


def _config(seed=0, **extra):
    # init_lora_weights=False: random B-pools, so the adapter changes the outputs.
    return mos.MoSConfig(r=3, equivalent_rank=2, target_modules="all-linear", init_lora_weights=False,
                         seed=seed, **extra)


def _model(**extra):
    return mos.get_mos_model(tiny_llama(), _config(**extra)).eval()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MoSLinear)]


def _decoded(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained_op(model, ids):
    with torch.enable_grad():  # autograd on: the training op runs (the pools require grad)
        return model(input_ids=ids).logits.detach()


def _assert_paths_agree(model, ids):
    torch.testing.assert_close(_decoded(model, ids), _trained_op(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_layer_matches_the_float64_reference(rows, route):
    model = _model(pool_dtype=ROUTES[route])
    layer = _layers(model)[2]
    slot = layer.slot("default")
    x = torch.randn(rows, layer.in_features)
    with torch.no_grad():
        got = layer(x)
        base = layer.base_layer(x)
    index_a, index_b = slot.index_rows()
    want = reference_forward(x.double(), slot.pools.pool_a.detach().double(), index_a,
                             slot.pools.pool_b.detach().double(), index_b, slot.scaling, base.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got.dtype == x.dtype
    # The core's route keeps nothing; the cached one keeps A^T and s B^T of the active adapter.
    cached = 0 if route == "core" else slot.pools.rank * (layer.in_features + layer.out_features)
    assert entry_elements(layer) == cached


def test_leading_dimensions_and_a_strided_input_reach_the_core_as_rows():
    model = _model(lora_alpha=24.0)
    layer = _layers(model)[1]
    x = torch.randn(2, 5, 3, layer.in_features)
    strided = torch.randn(layer.in_features, 2, 5).permute(1, 2, 0)  # not contiguous
    for inp in (x, strided):
        with torch.no_grad():
            got = layer(inp)
        with torch.enable_grad():
            want = layer(inp).detach()
        assert got.shape == inp.shape[:-1] + (layer.out_features,)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert entry_elements(layer) == 0


def test_generate_equals_the_training_op_and_decode_is_used(route):
    model = _model(pool_dtype=ROUTES[route])
    ids = token_batch(batch=3, seq=6)
    _assert_paths_agree(model, ids)
    assert all(bool(entry_elements(layer)) == (route == "cached") for layer in _layers(model))
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (3, 10)
    with torch.enable_grad():  # the same tokens through the training op, step by step
        want = ids
        for _ in range(4):
            want = torch.cat([want, model(input_ids=want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, want)


def test_an_optimizer_step_is_seen(route):
    model = _model(pool_dtype=ROUTES[route])
    ids = token_batch()
    _decoded(model, ids)  # entries built
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    _assert_paths_agree(model, ids)


def test_load_state_dict_and_an_in_place_copy_are_seen(route):
    model, other = _model(pool_dtype=ROUTES[route]), _model(seed=5, pool_dtype=ROUTES[route])
    ids = token_batch()
    before = _decoded(model, ids)
    model.load_state_dict(other.state_dict())
    _assert_paths_agree(model, ids)
    assert not torch.allclose(_decoded(model, ids), before)
    with torch.no_grad():
        for pools in model.mos_pools["default"].values():
            pools.pool_b.mul_(0.5)
    _assert_paths_agree(model, ids)


def test_set_adapter_and_load_adapter_are_seen_and_inactive_entries_dropped(tmp_path):
    model = _model(pool_dtype="float64")  # the cached route: entries to drop
    model.add_adapter("other", _config(seed=3, pool_dtype="float64"))
    ids = token_batch()
    _decoded(model, ids)
    model.set_adapter("other")
    assert not any("default" in layer._decode_cache for layer in _layers(model))
    _assert_paths_agree(model, ids)

    donor = _model(seed=9, pool_dtype="float64")
    donor.save_pretrained(tmp_path / "donor")
    model.load_adapter(str(tmp_path / "donor"), adapter_name="donor")
    model.set_adapter("donor")
    _assert_paths_agree(model, ids)
    torch.testing.assert_close(_decoded(model, ids), _decoded(donor, ids), rtol=1e-5, atol=1e-5)
    for layer in _layers(model):
        assert set(layer._decode_cache) == {"donor"}
        assert entry_elements(layer) == layer.slot("donor").pools.rank * (layer.in_features + layer.out_features)
    model.delete_adapter("donor")
    assert not any("donor" in layer._decode_cache for layer in _layers(model))


def test_merge_then_unmerge_and_disable_are_seen(route):
    model = _model(pool_dtype=ROUTES[route])
    ids = token_batch()
    adapted = _decoded(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(_decoded(model, ids), adapted, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # changed while merged: the unmerged path must not reuse the old A/B
        for pools in model.mos_pools["default"].values():
            pools.pool_a.add_(0.01)
    model.unmerge_adapter()
    _assert_paths_agree(model, ids)
    with model.disable_adapter():
        _assert_paths_agree(model, ids)
        assert not torch.allclose(_decoded(model, ids), adapted, rtol=1e-3, atol=1e-3)
    _assert_paths_agree(model, ids)


def test_threads_decoding_at_once_get_the_single_thread_result(route):
    model = _model(pool_dtype=ROUTES[route])
    ids = token_batch(batch=2, seq=5)
    want = _trained_op(model, ids)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(_decoded(model, ids))
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 20
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_mode_dropout_takes_the_training_op():
    model = mos.get_mos_model(tiny_llama(), _config(lora_dropout=0.5, pool_dtype="float64")).train()
    ids = token_batch()
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(input_ids=ids).logits
        torch.manual_seed(1)
        second = model(input_ids=ids).logits
    assert not torch.allclose(first, second)  # dropout ran
    assert not any(layer._decode_cache for layer in _layers(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_with_float32_pools_gets_the_scaled_update(dtype):
    # The base output's dtype differs from the pools': the update is computed in float32 and cast.
    model = mos.get_mos_model(tiny_llama(dtype=dtype), _config(lora_alpha=24.0)).eval()
    ids = token_batch()
    torch.testing.assert_close(_decoded(model, ids).float(), _trained_op(model, ids).float(),
                               rtol=2e-2, atol=2e-2)


def test_a_non_contiguous_base_output_gets_the_scaled_update():
    model = _model(lora_alpha=24.0)
    layer = _layers(model)[0]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        base = layer.base_layer(x)
        want = layer(x)
        from mos.torch.decode import inference_update
        strided = torch.empty(layer.out_features, 3).t()  # same values, column-major
        strided.copy_(base)
        got = inference_update(layer, "default", strided, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
