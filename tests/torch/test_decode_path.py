"""The inference path (mos/torch/decode.py): outputs equal the training op and the float64
reference, nothing stale after the pools change, memory bounded, threads safe."""
import threading

import pytest
import torch

import mos
from mos.testing.models import tiny_llama, token_batch
from mos.testing.reference import reference_forward
from mos.torch import MoSLinear
from mos.torch.decode import DIRECT_ROWS, entry_elements


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
def test_layer_matches_the_float64_reference(rows):
    model = _model()
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
    # Decode rows go straight to the core and cache nothing; more rows cache A^T and s B^T.
    cached = 0 if rows <= DIRECT_ROWS else slot.pools.rank * (layer.in_features + layer.out_features)
    assert entry_elements(layer) == cached


def test_generate_equals_the_training_op_and_decode_is_used():
    model = _model()
    ids = token_batch(batch=3, seq=6)
    _assert_paths_agree(model, ids)
    assert all(entry_elements(layer) for layer in _layers(model))
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (3, 10)
    with torch.enable_grad():  # the same tokens through the training op, step by step
        want = ids
        for _ in range(4):
            want = torch.cat([want, model(input_ids=want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, want)


def test_an_optimizer_step_is_seen():
    model = _model()
    ids = token_batch()
    _decoded(model, ids)  # entries built
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    _assert_paths_agree(model, ids)


def test_load_state_dict_and_an_in_place_copy_are_seen():
    model, other = _model(), _model(seed=5)
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
    model = _model()
    model.add_adapter("other", _config(seed=3))
    ids = token_batch()
    _decoded(model, ids)
    model.set_adapter("other")
    assert not any("default" in layer._decode_cache for layer in _layers(model))
    _assert_paths_agree(model, ids)

    donor = _model(seed=9)
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


def test_merge_then_unmerge_and_disable_are_seen():
    model = _model()
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


def test_threads_decoding_at_once_get_the_single_thread_result():
    model = _model()
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
    model = mos.get_mos_model(tiny_llama(), _config(lora_dropout=0.5)).train()
    ids = token_batch()
    with torch.no_grad():
        model(input_ids=ids)
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
        from mos.torch.decode import add_decode_update
        strided = torch.empty(layer.out_features, 3).t()  # same values, column-major
        strided.copy_(base)
        got = add_decode_update(layer, strided, x, "default")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
