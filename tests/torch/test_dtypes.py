"""16-bit base models with float32 pools (cast in, cast back, as PEFT does), and other pool dtypes."""
import pytest
import torch

from mos.torch import get_mos_model
from torch_helpers import llama_inputs, make_llama, mos_config, plain_state, randomize_pools

peft = pytest.importorskip("peft")

HALF = [torch.float16, torch.bfloat16]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("dtype", HALF)
def test_half_base_with_float32_pools_is_as_accurate_as_peft_lora(tmp_path, dtype):
    ids = llama_inputs()
    model = get_mos_model(make_llama(dtype=dtype), mos_config())
    randomize_pools(model, scale=0.1)
    assert all(p.dtype == torch.float32 for p in model.mos_pools.parameters())
    out = model(ids).logits
    assert out.dtype == dtype
    model.export_lora(str(tmp_path))
    state = plain_state(model.get_base_model())

    # Reference: the same (16-bit-representable) weights and adapter, computed in float64.
    reference_base = make_llama(dtype=torch.float64)
    reference_base.load_state_dict({k: v.double() for k, v in state.items()})
    reference = _logits(peft.PeftModel.from_pretrained(reference_base, str(tmp_path)).double(), ids)
    peft_base = make_llama(dtype=dtype)
    peft_base.load_state_dict(state)
    peft_out = _logits(peft.PeftModel.from_pretrained(peft_base, str(tmp_path)), ids)

    ours = (out.double() - reference).abs().max().item()
    theirs = (peft_out - reference).abs().max().item()
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)


@pytest.mark.parametrize("dtype", HALF)
def test_training_step_on_half_base_updates_float32_pools_only(dtype):
    ids = llama_inputs()
    model = get_mos_model(make_llama(dtype=dtype), mos_config())
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    model.train()
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.dtype == torch.float32, name
            assert torch.isfinite(param.grad).all(), name
    # B starts at zero, so A gets no gradient on the first step but B does.
    assert model.mos_pools["default"]["q_proj"].pool_b.grad.abs().sum() > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(v, base_before[k]) for k, v in model.get_base_model().state_dict().items())


@pytest.mark.parametrize("dtype", HALF)
def test_merge_and_unmerge_in_half_precision(dtype):
    ids = llama_inputs()
    model = get_mos_model(make_llama(dtype=dtype), mos_config())
    randomize_pools(model, scale=0.1)
    unmerged = _logits(model, ids)
    weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    model.merge_adapter()
    assert all(v.dtype == dtype for v in model.get_base_model().state_dict().values())
    merged = _logits(model, ids)
    spread = unmerged.abs().max().item()
    assert (merged - unmerged).abs().max().item() < 0.02 * spread
    model.unmerge_adapter()
    eps = torch.finfo(dtype).eps
    for k, v in model.get_base_model().state_dict().items():
        torch.testing.assert_close(v.float(), weights[k].float(), rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("pool_dtype", ["float64", "bfloat16"])
def test_other_pool_dtypes(pool_dtype):
    """float64 pools run on the C core; bfloat16 pools on CPU take the torch fallback."""
    ids = llama_inputs()
    model = get_mos_model(make_llama(), mos_config(pool_dtype=pool_dtype))
    assert model.mos_pools["default"]["q_proj"].pool_a.dtype == getattr(torch, pool_dtype)
    fp32 = get_mos_model(make_llama(), mos_config())
    randomize_pools(model)
    randomize_pools(fp32)
    out, ref = model(ids).logits, fp32(ids).logits
    assert out.dtype == torch.float32
    tol = 1e-5 if pool_dtype == "float64" else 0.05 * ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    out.sum().backward()
    assert model.mos_pools["default"]["q_proj"].pool_a.grad.dtype == getattr(torch, pool_dtype)


def test_model_to_moves_and_casts_pools_with_the_model():
    model = get_mos_model(make_llama(), mos_config())
    model.to(torch.float64)
    pools = model.mos_pools["default"]["q_proj"]
    assert pools.pool_a.dtype == torch.float64 and pools.index_a.dtype == torch.int32
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.slot("default").pools.pool_a is pools.pool_a  # layers see the converted pools
    out = model(llama_inputs()).logits
    assert out.dtype == torch.float64


def test_scale_beyond_float16_is_refused_after_a_cast():
    # lora_alpha=1e6 gives scale 2.5e5: finite in float32, where the config checked it, but not in
    # float16, where the cast model's pools take the torch fallback on CPU.
    model = get_mos_model(make_llama(), mos_config(lora_alpha=1e6))
    model.add_adapter("other", mos_config(lora_alpha=1e6, seed=5))
    randomize_pools(model)
    ids = llama_inputs()
    assert torch.isfinite(model(ids).logits).all()
    model.to(torch.float16).eval()
    with pytest.raises(ValueError, match=r"scale = 250000 is not finite in float16, the pools' dtype"):
        model(ids)
    with pytest.raises(ValueError, match=r"scale = 250000 is not finite in float16"):
        model(ids, adapter_names=["default", "other"])
