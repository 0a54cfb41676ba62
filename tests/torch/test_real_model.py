"""SmolLM2-135M-Instruct, a real pretrained LLM, through a user's path with all-linear MoS.

What the toy models never had: tied input/output embeddings (lm_head is the embedding matrix and
is not adapted) and grouped-query attention (k_proj/v_proj map 576 -> 192, q_proj 576 -> 576),
so k/v form module types of their own shape. The first run downloads and converts the model
(mos.pretrained, about a minute); later runs load the cached copy.
"""
import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("gguf")

import mos  # noqa: E402
from mos import date_task  # noqa: E402
from mos.pretrained import load_smollm2  # noqa: E402
from mos.testing import assert_exports_match_peft  # noqa: E402

# Logits reach about 30 in magnitude; float32 sums in another order differ by ~1e-5 relative.
CLOSE = dict(rtol=1e-4, atol=2e-4)


def _config(seed=0):
    return mos.MoSConfig(r=8, equivalent_rank=2, shards_per_vector=2, private_rank=1, lora_alpha=16,
                         target_modules="all-linear", seed=seed)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _held_out_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_smollm2_trains_saves_exports_merges_and_generates(tmp_path):
    base, tokenizer = load_smollm2()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    pristine = copy.deepcopy(base)
    model = mos.get_mos_model(base, _config())

    # Shapes: seven types (GQA's k/v at 576 -> 192), 30 layers each; lm_head stays out and tied.
    paths = model.adapter_paths("default")
    assert sorted(paths) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert all(len(entries) == 30 for entries in paths.values())
    k_proj = model.get_base_model().model.layers[0].self_attn.k_proj
    assert (k_proj.in_features, k_proj.out_features) == (576, 192)
    inner = model.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    assert isinstance(inner.lm_head, torch.nn.Linear)
    assert model.get_nb_trainable_parameters()[0] == 610_560  # LoRA r=2's budget at forward rank 8

    train = date_task.date_examples(4 * 4, seed=0, held_out=False)
    held_out = date_task.training_batch(tokenizer, date_task.date_examples(8, seed=0, held_out=True))
    before = _held_out_loss(model, held_out)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    model.train()
    for step in range(4):
        loss = model(**date_task.training_batch(tokenizer, train[4 * step:4 * step + 4])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = _held_out_loss(model, held_out)
    assert after < 0.5 * before, (before, after)
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # training left the tie alone

    probe = {k: held_out[k][:4] for k in ("input_ids", "attention_mask")}
    expected = _logits(model, probe)
    with model.disable_adapter():
        assert not torch.allclose(_logits(model, probe), expected, **CLOSE)  # the adapter matters

    # save_pretrained / from_pretrained onto a fresh copy of the base.
    model.save_pretrained(tmp_path / "adapter")
    reloaded = mos.MoSModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(reloaded, probe), expected, rtol=0, atol=0)
    del reloaded

    # export_lora, loaded by peft.PeftModel on the plain base.
    assert_exports_match_peft(model, tmp_path, inputs=probe, **CLOSE)

    # merge_and_unload: the plain model gives the adapter's logits, its head still tied.
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, mos.torch.MoSLinear) for m in merged.modules())
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(_logits(merged, probe), expected, **CLOSE)
    del merged

    # generate with the adapter on, then a mixed batch over two adapters and the base.
    question = date_task.date_examples(1, seed=1, held_out=True)[0][0]
    alone = date_task.answers(model, tokenizer, [question])
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="copy")
    model.add_adapter("fresh", _config(seed=1))  # B-pools start at zero: the base's answer
    with model.disable_adapter():
        base_answer = date_task.answers(model, tokenizer, [question])
    assert alone != base_answer
    mixed = date_task.answers(model, tokenizer, [question] * 3,
                              adapter_names=["default", "fresh", "copy"])
    assert mixed == [alone[0], base_answer[0], alone[0]]
