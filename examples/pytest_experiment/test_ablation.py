"""MoS vs LoRA at an equal parameter budget, with and without pair dissociation, as pytest tests.

Run: pytest examples/pytest_experiment (MOS_EXAMPLES_SMALL=1 for a few steps). The mos plugin
supplies the seeded tiny_llama and token_batch fixtures and prints the recorded losses as a table.
"""
import os

import peft
import pytest
import torch

import mos
import mos.testing
from mos.testing import assert_no_op_at_init, assert_only_adapter_trainable

STEPS = 5 if os.environ.get("MOS_EXAMPLES_SMALL") else 60
BUDGET = 3  # LoRA rank; MoS gets the same parameters as equivalent_rank and gathers r=4 per layer

METHODS = {
    "lora": None,
    "mos": mos.MoSConfig(r=4, equivalent_rank=BUDGET, shards_per_vector=2, private_rank=1,
                         lora_alpha=8, target_modules="all-linear"),
    "mos_without_pair_dissociation": mos.MoSConfig(r=4, equivalent_rank=BUDGET, shards_per_vector=2,
                                                   private_rank=1, pair_dissociation=False,
                                                   lora_alpha=8, target_modules="all-linear"),
}


def adapt(model, method):
    if METHODS[method] is None:
        return peft.get_peft_model(model, peft.LoraConfig(r=BUDGET, lora_alpha=8, target_modules="all-linear"))
    adapted = mos.get_mos_model(model, METHODS[method])
    assert_no_op_at_init(adapted)
    assert_only_adapter_trainable(adapted)
    return adapted


def train(model, ids, steps=STEPS):
    """Fits one token batch with AdamW; returns (first loss, last loss)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize("method", list(METHODS))
def test_equal_budget_ablation(method, tiny_llama, token_batch, mos_record):
    lora_budget = sum(p.numel() for p in peft.get_peft_model(
        mos.testing.tiny_llama(), peft.LoraConfig(r=BUDGET, target_modules="all-linear")).parameters()
        if p.requires_grad)
    model = adapt(tiny_llama, method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora_budget  # the comparison is at an equal budget

    first, last = train(model, token_batch)
    mos_record(params=trainable, first_loss=first, last_loss=last)
    assert last < first


if __name__ == "__main__":  # python test_ablation.py runs the experiment too
    raise SystemExit(pytest.main([__file__, "-q"]))
