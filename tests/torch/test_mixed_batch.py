"""Where a layer's mixed batch comes from: mixed_batch() puts one in call_context for the call, and
a layer runs it only when the batch's model is its own."""
import torch
from torch import nn

import mos
from mos.torch.call_context import current_batch
from mos.torch.mixed_batch import MixedBatch, mixed_batch


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x)


def tiny_model(seed):
    torch.manual_seed(seed)
    config = mos.MoSConfig(r=2, equivalent_rank=2, private_rank=1, target_modules=["proj"], seed=seed)
    model = mos.get_mos_model(Tiny(), config, adapter_name="a").eval()
    with torch.no_grad():
        for shared in model.mos_pools["a"].values():
            shared.pool_b.normal_()  # B starts at zero: make the adapter change the output
    return model


def test_a_layer_runs_only_the_mixed_batch_of_its_own_model():
    main, draft = tiny_model(0), tiny_model(1)
    x = torch.randn(2, 16)
    with torch.no_grad():
        draft_alone = draft(x)
        base_alone = draft.get_base_model().proj.base_layer(x)
    main_layer, draft_layer = main.get_base_model().proj, draft.get_base_model().proj
    assert current_batch() is None and current_batch(main_layer) is None
    with mixed_batch(main, ["a", "__base__"], (x,)) as batch:
        assert isinstance(batch, MixedBatch)
        assert current_batch(main_layer) is batch and current_batch() is batch
        assert current_batch(draft_layer) is None
        torch.testing.assert_close(draft(x), draft_alone)  # its active adapter, not the batch
    assert current_batch(main_layer) is None
    assert not torch.allclose(draft_alone, base_alone)
