"""modules_to_save and bias (PEFT's meanings): a BERT classifier's head and biases train, save,
load, export to PEFT and unload; several active adapters (set_adapter([...])) as PEFT's LoRA tuner."""
import pytest
import torch
import transformers

import mos
from mos.testing.assertions import assert_exports_match_peft
from mos.torch import MoSModel, get_mos_model
from mos.torch.saved_modules import ModulesToSaveWrapper
from mos.torch.trainer import restore_pools
from torch_helpers import llama_inputs, logits, make_llama, mos_config, plain_state, randomize_pools, run_threads

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 2, 1])


def _bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def _bert_config(**overrides):
    return mos.MoSConfig(**{**dict(r=2, equivalent_rank=2, target_modules=["query", "value"]), **overrides})


def _train(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=LABELS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _scores(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_frozen_classifier_head_is_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"head 'classifier' is not trained nor saved.*modules_to_save=\['classifier'\]"):
        model = get_mos_model(_bert(), _bert_config())
    assert not any(p.requires_grad for p in model.base_model.classifier.parameters())


@pytest.mark.parametrize("options", [dict(task_type="SEQ_CLS"), dict(modules_to_save=["classifier"])])
def test_classifier_head_trains_saves_loads_and_exports(tmp_path, options):
    fresh = _scores(_bert())
    model = get_mos_model(_bert(), _bert_config(**options))
    head = model.base_model.classifier
    assert isinstance(head, ModulesToSaveWrapper) and model.peft_config["default"].modules_to_save == ["classifier"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"base_model.model.classifier.modules_to_save.default.weight",
            "base_model.model.classifier.modules_to_save.default.bias"} <= trainable
    _train(model)
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)
    expected = _scores(model)
    with model.disable_adapter():  # the base model alone: original head, no adapter
        torch.testing.assert_close(_scores(model), fresh, rtol=0, atol=1e-6)

    model.save_pretrained(str(tmp_path / "mos"))
    loaded = MoSModel.from_pretrained(_bert(), str(tmp_path / "mos"))
    assert torch.equal(_scores(loaded), expected)

    model.export_lora(str(tmp_path / "lora"))
    exported = peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "lora"))
    torch.testing.assert_close(_scores(exported), expected, rtol=0, atol=1e-6)

    plain = model.merge_and_unload()  # as PEFT: the trained head replaces the wrapper
    assert isinstance(plain.classifier, torch.nn.Linear)
    torch.testing.assert_close(_scores(plain), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_options_train_the_biases_peft_trains_and_save_them(tmp_path, bias):
    model = get_mos_model(_bert(), _bert_config(bias=bias, task_type="SEQ_CLS"))
    lora = peft.get_peft_model(_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"], bias=bias,
                                                        task_type="SEQ_CLS"))

    def trained_biases(m, prefix):
        return {n.removeprefix(prefix).replace(".base_layer", "") for n, p in m.named_parameters()
                if p.requires_grad and n.endswith("bias") and "modules_to_save" not in n}
    assert trained_biases(model, "base_model.model.") == trained_biases(lora, "base_model.model.")
    _train(model)
    expected = _scores(model)
    model.save_pretrained(str(tmp_path / "mos"))
    loaded = MoSModel.from_pretrained(_bert(), str(tmp_path / "mos"))
    assert torch.equal(_scores(loaded), expected)
    model.export_lora(str(tmp_path / "lora"))
    torch.testing.assert_close(_scores(peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "lora"))), expected,
                               rtol=0, atol=1e-6)


def test_trainer_resume_restores_head_and_biases(tmp_path):
    model = get_mos_model(_bert(), _bert_config(bias="all", task_type="SEQ_CLS"))
    _train(model)
    expected = _scores(model)
    model.save_pretrained(str(tmp_path))
    _train(model)
    assert not torch.equal(_scores(model), expected)
    restore_pools(model, str(tmp_path), "default")
    assert torch.equal(_scores(model), expected)


def test_bad_saved_module_options_raise_and_change_nothing():
    base = _bert()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"modules_to_save=\['head'\]: 'head' matches no module"):
        get_mos_model(base, _bert_config(modules_to_save=["head"]))
    model = get_mos_model(base, _bert_config(bias="all", task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="another adapter of this model already trains biases"):
        model.add_adapter("other", _bert_config(bias="lora_only"))
    model.delete_adapter("default")
    assert base.state_dict().keys() == state.keys() and not isinstance(base.classifier, ModulesToSaveWrapper)


def test_several_active_adapters_add_up_as_in_peft(tmp_path):
    ids = llama_inputs()
    model = get_mos_model(make_llama(), mos_config(seed=1))
    model.add_adapter("other", mos_config(seed=2, target_modules=["q_proj", "v_proj"], r=2, equivalent_rank=2))
    randomize_pools(model)
    model.export_lora(str(tmp_path / "default"), "default")
    model.export_lora(str(tmp_path / "other"), "other")
    model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"default", "other"}
    expected = logits(model, ids)

    base = make_llama(seed=9)
    base.load_state_dict(plain_state(model.get_base_model()))
    lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "default"))
    lora.load_adapter(str(tmp_path / "other"), adapter_name="other")
    lora.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(logits(lora, ids), expected, rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match=r"adapters \['default', 'other'\] are active together"):
        assert_exports_match_peft(model, tmp_path / "check")
    assert_exports_match_peft(model, tmp_path / "check", adapter_name="other")

    model.merge_adapter()  # merges every active adapter
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    with pytest.raises(ValueError, match="set_adapter takes an adapter name or a list of distinct names"):
        model.set_adapter(["default", "default"])
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.set_adapter(["default", "nope"])


def test_adapters_with_modules_to_save_cannot_be_active_together():
    model = get_mos_model(_bert(), _bert_config(task_type="SEQ_CLS"))
    model.add_adapter("other", _bert_config(task_type="SEQ_CLS", seed=1))
    with pytest.raises(ValueError, match="cannot be active together: 'default' has modules_to_save"):
        model.set_adapter(["default", "other"])
    model.set_adapter("other")
    head = model.base_model.classifier
    assert head.active_adapter == "other" and sorted(head.modules_to_save) == ["default", "other"]


def _two_trained_heads():
    """A BERT classifier with adapters "default" and "other" (task_type SEQ_CLS), each trained, so
    their heads differ from each other and from the original."""
    model = get_mos_model(_bert(), _bert_config(task_type="SEQ_CLS"))
    model.add_adapter("other", _bert_config(task_type="SEQ_CLS", seed=1))
    for name in ("default", "other"):
        model.set_adapter(name)
        _train(model)
    head = model.base_model.classifier
    assert not torch.equal(head.modules_to_save["default"].weight, head.modules_to_save["other"].weight)
    return model


def _alone(model, names):
    """Row i of IDS scored with adapter names[i] only ("__base__": adapters disabled)."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(_scores(model)[i])
        else:
            model.set_adapter(name)
            rows.append(_scores(model)[i])
    return torch.stack(rows)


def test_mixed_adapter_batches_run_each_samples_own_saved_modules(tmp_path):
    model = _two_trained_heads()
    names = ["other", "__base__", "default", "other"]
    expected = _alone(model, names)
    model.set_adapter("default")
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=names).logits
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(mixed, _scores(model), rtol=0, atol=1e-3)  # not one head for every row
    assert model.base_model.classifier.active_adapter == "default"  # the call left the wrapper as it was

    for name in ("default", "other"):
        model.export_lora(str(tmp_path / name), name)
    lora = peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "default"))
    lora.load_adapter(str(tmp_path / "other"), adapter_name="other")
    lora.eval()
    with torch.no_grad():
        peft_mixed = lora(input_ids=IDS, adapter_names=names).logits
    torch.testing.assert_close(peft_mixed, mixed, rtol=0, atol=1e-5)


def test_mixed_batches_with_saved_modules_from_several_threads():
    model = _two_trained_heads()
    batches = [["other", "__base__", "default", "other"], ["default", "default", "__base__", "other"],
               ["__base__", "other", "other", "default"]]
    expected = [_alone(model, names) for names in batches]
    wrong = []

    def serve(k):
        for step in range(6):
            j = (k + step) % len(batches)
            with torch.no_grad():
                out = model(input_ids=IDS, adapter_names=batches[j]).logits
            if not torch.allclose(out, expected[j], rtol=0, atol=1e-5):
                wrong.append((k, step))

    run_threads(serve, 3)
    assert not wrong, f"{len(wrong)} of 18 mixed batches got another thread's heads"


def test_beams_run_their_samples_saved_lm_head():
    # Beam search expands each sample into consecutive rows; each row keeps its sample's lm_head.
    ids = llama_inputs(batch=3, seq=4)
    model = get_mos_model(make_llama(), mos_config(seed=1, modules_to_save=["lm_head"]), adapter_name="a")
    model.add_adapter("b", mos_config(seed=2, modules_to_save=["lm_head"]))
    randomize_pools(model)
    with torch.no_grad():
        for name, scale in (("a", 0.5), ("b", -0.5)):
            head = model.base_model.lm_head.modules_to_save[name]
            head.weight.add_(scale * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(7)))
    model.eval()
    names = ["b", "__base__", "a"]
    gen = dict(max_new_tokens=3, num_beams=2, do_sample=False, attention_mask=torch.ones_like(ids))
    expected = []
    for i, name in enumerate(names):
        gen_one = {**gen, "attention_mask": gen["attention_mask"][i:i + 1]}
        if name == "__base__":
            with model.disable_adapter():
                expected.append(model.generate(ids[i:i + 1], **gen_one)[0])
        else:
            model.set_adapter(name)
            expected.append(model.generate(ids[i:i + 1], **gen_one)[0])
    mixed = model.generate(ids, adapter_names=names, **gen)
    assert torch.equal(mixed, torch.stack(expected))
    assert len({tuple(t[-3:].tolist()) for t in expected}) > 1  # the heads lead to different tokens


@pytest.mark.parametrize("padded, refusal", [(True, "not called with its input as the only tensor argument"),
                                             (False, "whose output is not one tensor with a row per input row")])
def test_saved_modules_that_cannot_be_split_by_sample_are_refused_in_mixed_batches(padded, refusal):
    # BertAttention gets the attention mask as a second tensor when some position is masked, and
    # returns a tuple.
    model = get_mos_model(_bert(), _bert_config(target_modules=["intermediate.dense"], modules_to_save=["attention"]))
    model.eval()
    mask = torch.ones_like(IDS)
    mask[1, -2:] = 0 if padded else 1
    with torch.no_grad():
        single = model(input_ids=IDS, attention_mask=mask).logits
        with pytest.raises(ValueError, match=f"BertAttention is a module_to_save {refusal}"):
            model(input_ids=IDS, attention_mask=mask, adapter_names=["default", "__base__"] * 2)
        assert torch.equal(model(input_ids=IDS, attention_mask=mask).logits, single)
        same = model(input_ids=IDS, attention_mask=mask, adapter_names=["default"] * 4).logits
    torch.testing.assert_close(same, single, rtol=0, atol=1e-5)  # one module for every row runs as usual
