"""mos/ranks.py on real models (needs torch and transformers): the default MoSConfig() lowers r for
types with too few layers (single-module types, one-layer regexes, small models), records it in
rank_pattern, keeps budgets and LoRA exports exact, and says in the config's own terms which ranks
would fit."""
import json
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import mos  # noqa: E402
from mos.budget import module_types_from_model, mos_budget  # noqa: E402
from mos.testing import randomize_pools, tiny_llama as make_llama, token_batch as llama_inputs  # noqa: E402
from mos.torch import MoSModel, get_mos_model  # noqa: E402


def _bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def _t5():
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def _opt():
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
    return transformers.OPTForCausalLM(config)


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=32, bos_token_id=0, eos_token_id=0))


def _clip():
    # Text (32 wide) and vision (48 wide) towers: one name, two shapes, so four pools.
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8), projection_dim=16)
    return transformers.CLIPModel(config)


def _inputs(kind):
    ids = llama_inputs(seq=6) % 64
    if kind == "clip":
        pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        return dict(input_ids=ids, pixel_values=pixels, return_loss=True)
    if kind == "t5":
        return dict(input_ids=ids, decoder_input_ids=ids, labels=ids)
    if kind == "bert":
        return dict(input_ids=ids, labels=torch.tensor([0, 2]))
    return dict(input_ids=ids, labels=ids)


# kind -> (model factory, target_modules, {type: r the default config must use})
ZOO = {
    "llama-defaults": (make_llama, None, {"q_proj": 3, "v_proj": 3}),
    "llama-all-linear": (make_llama, "all-linear", {t: 3 for t in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj")}),
    "llama-lm_head": (make_llama, ["lm_head", "q_proj"], {"lm_head": 2, "q_proj": 3}),
    "llama-one-layer-regex": (make_llama, r"model\.layers\.1\.self_attn\.q_proj", {"q_proj": 2}),
    "bert": (_bert, None, {"query": 3, "value": 3}),
    "t5": (_t5, None, {"q": 7, "v": 7}),  # encoder self, decoder self and cross attention: 6 layers
    "opt": (_opt, None, {"q_proj": 3, "v_proj": 3}),
    "gpt2": (_gpt2, None, {"c_attn": 3}),  # Conv1D layers
    "clip": (_clip, ["q_proj", "v_proj"], {f"{t}_{d}x{d}": 3 for t in ("q_proj", "v_proj") for d in (32, 48)}),
}


def _output(out):
    return out.logits if hasattr(out, "logits") else out.logits_per_image


def _build(kind, seed=0):
    torch.manual_seed(seed)
    return ZOO[kind][0]().eval()


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_default_config_works_on_every_model(kind, tmp_path):
    _, targets, ranks = ZOO[kind]
    base = _build(kind)
    inputs = _inputs(kind.split("-")[0])
    with pytest.warns(UserWarning) as record:
        model = get_mos_model(base, mos.MoSConfig(target_modules=targets))
    message = " ".join(str(w.message) for w in record if "MoS:" in str(w.message))
    for module_type, r in ranks.items():  # the warning names each lowered type and the r it uses
        assert re.search(rf"\b{module_type} \(\d+ layers?\): r={r}\b", message), message
    config = model.peft_config["default"]
    assert config.rank_pattern == ranks and config.r == 8
    for module_type, r in ranks.items():
        assert model.mos_pools["default"][module_type].index_a.shape[1] == r * config.shards_per_vector

    # Trains: every pool gets a gradient (after one step the B-pools are nonzero).
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(p.abs().sum() > 0 for p in model.mos_pools["default"].parameters())

    # The saved adapter records the per-type ranks and loads exactly, without lowering again.
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == ranks
    with torch.no_grad():
        expected = _output(model(**inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = MoSModel.from_pretrained(_build(kind), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(_output(loaded(**inputs)), expected)


def test_trainable_count_matches_the_budget_with_lowered_ranks():
    base = make_llama()
    with pytest.warns(UserWarning):
        model = get_mos_model(base, mos.MoSConfig(target_modules="all-linear"))
        budget = mos_budget(module_types_from_model(make_llama(), list(model.mos_pools["default"])),
                            mos.MoSConfig())
    assert model.get_nb_trainable_parameters()[0] == budget.trainable_params


def test_lowered_ranks_export_to_peft_with_equal_outputs(tmp_path):
    # scale = lora_alpha / r of the type, as PEFT's rank_pattern does: the LoRA export agrees.
    with pytest.warns(UserWarning):
        model = get_mos_model(make_llama(), mos.MoSConfig(target_modules=["lm_head", "q_proj", "v_proj"],
                                                          rank_pattern={"v_proj": 2}))
    randomize_pools(model)
    ids = llama_inputs()
    with torch.no_grad():
        expected = model(ids).logits
    model.export_lora(tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "lora")
    ranks = {name.rsplit(".", 1)[-1]: m.r["default"] for name, m in lora.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ranks == {"lm_head": 2, "q_proj": 3, "v_proj": 2}
    with torch.no_grad():
        np.testing.assert_allclose(lora(ids).logits.numpy(), expected.numpy(), atol=2e-5, rtol=1e-5)


def test_explicit_rank_that_does_not_fit_says_what_would():
    with pytest.raises(ValueError, match="^q_proj has 4 layers: ") as err:
        get_mos_model(make_llama(num_hidden_layers=4),
                      mos.MoSConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 8}))
    assert str(err.value).startswith("q_proj has 4 layers: with equivalent_rank=2, private_rank=1, "
                                     "shards_per_vector=2, r can be at most 5 (got r=8)")


def test_scale_raised_by_a_lowered_rank_is_refused_when_the_model_is_built():
    # scale 2.5e38 at r=8 is finite in float32; the 2-layer types get r=3, whose scale is not.
    base = make_llama()
    config = mos.MoSConfig(lora_alpha=2e39, target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=r"q_proj \(r=3\) the scale 6\.66667e\+38, which is not finite "
                                             r"in pool_dtype float32"):
            get_mos_model(base, config)
    assert not any(isinstance(m, mos.torch.MoSLinear) for m in base.modules())
