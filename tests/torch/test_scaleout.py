"""Scale-out: non-reentrant gradient checkpointing, DistributedDataParallel and FSDP2 (gloo, 2 CPU processes)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddp_worker
from mos.torch import get_mos_model
from torch_helpers import llama_inputs, make_llama, mos_config


def _model():
    return get_mos_model(make_llama(), mos_config(init_lora_weights=False))


def _pool_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_calls(layer):
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_non_reentrant_gradient_checkpointing_gives_the_same_gradients():
    ids = llama_inputs()
    plain = _model().train()
    plain_calls = _count_calls(plain.get_base_model().model.layers[0].self_attn.q_proj)
    plain(ids, labels=ids).loss.backward()

    checkpointed = _model().train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = _count_calls(checkpointed.get_base_model().model.layers[0].self_attn.q_proj)
    checkpointed(ids, labels=ids).loss.backward()

    assert len(plain_calls) == 1 and len(calls) == 2  # the layer really was recomputed in backward
    expected = _pool_grads(plain)
    got = _pool_grads(checkpointed)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_ddp_two_processes_equal_single_process_on_the_global_batch(tmp_path):
    out_path = str(tmp_path / "ddp_pools.pt")
    mp.spawn(ddp_worker.worker, args=(str(tmp_path / "rendezvous"), out_path), nprocs=ddp_worker.WORLD, join=True)
    ddp_pools = torch.load(out_path)

    single = ddp_worker.make_model().train()
    start = {k: v.clone() for k, v in single.mos_pools.state_dict().items()}
    ddp_worker.train(single, ddp_worker.global_batches())
    expected = single.mos_pools.state_dict()
    assert ddp_pools.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(ddp_pools[key], value, rtol=0, atol=1e-6, msg=key)
        if "pool_" in key:
            assert not torch.equal(value, start[key]), key  # training moved every pool
    assert len(expected) == 8  # fc1 and fc2: two pools and two index tables each


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_fsdp2_two_processes_equal_single_process_and_save_loads(tmp_path):
    import torch.distributed.checkpoint as dcp

    import fsdp_worker
    from mos.torch import MoSModel, get_peft_model_state_dict

    mp.spawn(fsdp_worker.worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=fsdp_worker.WORLD, join=True)
    result = torch.load(tmp_path / "result.pt")

    # Every trainable parameter is sharded by rows over both ranks: each pool once (by the root's
    # fully_shard), not one copy per decoder layer; the biases and modules_to_save copies with
    # the decoder layer or root that holds them.
    single = fsdp_worker.make_model()
    shapes = {n: p.shape for n, p in single.named_parameters() if p.requires_grad}
    assert result["layout"].keys() == shapes.keys()
    for name, (local_rows, sharded) in result["layout"].items():
        assert sharded and local_rows == shapes[name][0] // fsdp_worker.WORLD, name

    start = {k: v.clone() for k, v in single.mos_pools.state_dict().items()}
    start_saved = {k: v.clone() for k, v in get_peft_model_state_dict(single).items() if k.startswith("saved:")}
    # 7 biased linears per decoder layer, the LM head's weight, each layer's norm weight.
    assert len(start_saved) == 7 * 2 + 1 + 2
    fsdp_worker.train(single, fsdp_worker.global_batches())
    expected = single.mos_pools.state_dict()
    got = result["pools"]
    assert got.keys() == expected.keys() and len(expected) == 4 * 7  # 7 types: 2 pools, 2 tables
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
        if "pool_" in key:
            assert not torch.equal(value, start[key]), key  # training moved every pool

    # The gathered save_pretrained loads into a single-process model that matches, the biases and
    # modules_to_save copies (gathered from their shards) included.
    loaded = MoSModel.from_pretrained(fsdp_worker.make_base(), str(tmp_path / "adapter"))
    for key, value in loaded.mos_pools.state_dict().items():
        torch.testing.assert_close(value, got[key], rtol=0, atol=0, msg=key)
    trained = get_peft_model_state_dict(single)
    reloaded = get_peft_model_state_dict(loaded)
    for key, value in start_saved.items():
        # atol 1e-4, 200x below what training moved each of them: a key bias barely changes the
        # attention scores, so its gradient is near zero and AdamW's normalized step magnifies the
        # fp32 rounding of the split batch there (2e-5 measured on k_proj.bias, 1e-7 elsewhere).
        torch.testing.assert_close(reloaded[key], trained[key], rtol=0, atol=1e-4, msg=key)
        assert (trained[key] - value).abs().max() > 0.02, key

    # So does the sharded torch.distributed.checkpoint of the whole model, loaded in place without
    # a process group.
    fresh = fsdp_worker.make_model()
    dcp.load(fresh.state_dict(), checkpoint_id=str(tmp_path / "dcp"))
    for key, value in fresh.mos_pools.state_dict().items():
        torch.testing.assert_close(value, got[key], rtol=0, atol=0, msg=key)
    ids = fsdp_worker.global_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, single(ids).logits, rtol=1e-4, atol=1e-5)

    # The gathered export_lora loads in PEFT and gives the single-process model's outputs.
    peft = pytest.importorskip("peft")
    lora = peft.PeftModel.from_pretrained(fsdp_worker.make_base(), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, single.eval()(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_a_pool_still_sharded_is_refused_not_read(tmp_path):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from mos.torch import adapter_linear

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        pool = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
        index = torch.tensor([0, 1], dtype=torch.int32)
        with pytest.raises(TypeError, match="DTensor .*fully_shard"):
            adapter_linear(torch.randn(3, 8), pool, index, torch.randn(8, 4), index, 1.0)
    finally:
        dist.destroy_process_group()
