"""torch.compile traces MoS training steps without graph breaks (custom ops + fake kernels)."""
import pytest
import torch
from torch import nn

import mos
from mos.torch import get_mos_model
from torch_helpers import llama_inputs, make_llama, mos_config


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_llama_training_step_compiles_fullgraph_and_matches_eager():
    model = get_mos_model(make_llama(), mos_config(init_lora_weights=False)).train()
    ids = llama_inputs()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    compiled_grads = _grads(model)
    model.zero_grad()
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    assert compiled_grads.keys() == _grads(model).keys() and len(compiled_grads) == 14
    for name, grad in _grads(model).items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        assert grad.abs().sum() > 0, name


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(8, 8)}) for _ in range(2))

    def forward(self, x):
        for block in self.layers:
            x = torch.tanh(block["fc"](x))
        return x


def test_inductor_compiles_the_custom_ops():
    torch.manual_seed(0)
    cfg = mos.MoSConfig(r=2, equivalent_rank=2, shards_per_vector=2, private_rank=1, target_modules=["fc"],
                        init_lora_weights=False)
    model = get_mos_model(_Blocks(), cfg)
    x = torch.randn(4, 8)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    compiled_grads = _grads(model)
    model.zero_grad()
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("n_rows", [3, 5])
def test_compiled_op_handles_new_shapes(n_rows):
    """Dynamic shapes go through the fake kernels' symbolic sizes."""
    cfg = mos.MoSConfig(r=2, equivalent_rank=2, shards_per_vector=2, private_rank=1, target_modules=["fc"],
                        init_lora_weights=False)
    model = get_mos_model(_Blocks(), cfg)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    x = torch.randn(n_rows, 8)
    torch.testing.assert_close(compiled(x), model(x))
