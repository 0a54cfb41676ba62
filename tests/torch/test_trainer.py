"""transformers.Trainer with its default TrainingArguments on a MoSModel (tiny Llama, CPU, few steps)."""
import os
import pickle

import pytest
import torch
import transformers
from safetensors.torch import load_file

import mos
from mos.torch import MoSModel, get_mos_model
from mos.torch.trainer import MoSTrainer
from torch_helpers import LLAMA_KW, make_llama, mos_config


class TokenRows(torch.utils.data.Dataset):
    """Fixed random token rows with an extra text column the model does not take."""

    def __init__(self, n=8, seq=8):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, LLAMA_KW["vocab_size"], (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "text": f"row {i}"}


def _args(tmp_path, **overrides):
    # Defaults except what keeps the run short and offline; remove_unused_columns stays True.
    kw = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
              report_to=[], disable_tqdm=True, save_steps=2, learning_rate=1e-2)
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def _model():
    return get_mos_model(make_llama(), mos_config(target_modules=["q_proj", "v_proj"]))


def _pools(model):
    return {k: v.detach().clone() for k, v in model.mos_pools.state_dict().items()}


def test_forward_signature_is_the_base_models_plus_adapter_names():
    import inspect
    model = _model()
    names = list(inspect.signature(model.forward).parameters)
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "labels" in names
    assert "adapter_names" in names and "adapter_names" in MoSModel.forward.__doc__
    clone = pickle.loads(pickle.dumps(model))  # torch.save of a whole model pickles it
    assert list(inspect.signature(clone.forward).parameters) == names


def test_plain_trainer_with_default_arguments_trains(tmp_path):
    model = _model()
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    pools_before = _pools(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, save_strategy="no"),
                                   train_dataset=TokenRows())
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    after = _pools(model)
    assert any(not torch.equal(after[k], pools_before[k]) for k in after if "pool_b" in k)
    assert all(torch.equal(v, model.get_base_model().state_dict()[k]) for k, v in base_before.items())
    assert torch.isfinite(torch.tensor(trainer.evaluate(TokenRows(n=4))["eval_loss"]))  # labels found


def test_mos_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    torch.manual_seed(0)
    model = _model()
    trainer = MoSTrainer(model=model, args=_args(tmp_path), train_dataset=TokenRows())
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert sorted(f for f in os.listdir(checkpoint) if f.startswith(("adapter", "model"))) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    final = _pools(model)

    # save_model() writes what MoSModel.from_pretrained reads.
    trainer.save_model(str(tmp_path / "final"))
    ids = TokenRows()[0]["input_ids"][None]
    loaded = MoSModel.from_pretrained(make_llama(), str(tmp_path / "final"))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    # Resuming from step 2 restores the pools bit for bit, then training reaches the same end.
    torch.manual_seed(0)
    resumed = _model()
    again = MoSTrainer(model=resumed, args=_args(tmp_path, output_dir=str(tmp_path / "again")),
                       train_dataset=TokenRows())
    again._load_from_checkpoint(str(checkpoint))
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    for key, value in saved.items():
        module_type, name = key.split(".")
        assert torch.equal(getattr(resumed.mos_pools["default"][module_type], name).cpu().to(value.dtype), value)
    again.train(resume_from_checkpoint=str(checkpoint))
    for key, value in _pools(resumed).items():
        assert torch.equal(value, final[key]), key


def test_plain_trainer_checkpoints_resume_exactly(tmp_path):
    # A plain Trainer saves the whole model's state_dict (model.safetensors) and reloads it on
    # resume; the pools and index tables are ordinary entries in it.
    torch.manual_seed(0)
    model = _model()
    transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=TokenRows()).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert "model.safetensors" in os.listdir(checkpoint)
    final = _pools(model)

    torch.manual_seed(0)
    resumed = _model()
    start = _pools(resumed)
    again = transformers.Trainer(model=resumed, args=_args(tmp_path, output_dir=str(tmp_path / "again")),
                                 train_dataset=TokenRows())
    again.train(resume_from_checkpoint=str(checkpoint))
    assert again.state.global_step == 4
    for key, value in _pools(resumed).items():
        assert torch.equal(value, final[key]), key
    assert any(not torch.equal(final[k], start[k]) for k in final if "pool_b" in k)


def test_restore_refuses_another_adapter(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "a")
    other = get_mos_model(make_llama(), mos_config(target_modules=["q_proj", "v_proj"], seed=7))
    before = _pools(other)
    from mos.torch.trainer import restore_pools
    with pytest.raises(ValueError, match="saved config differs .* another adapter"):
        restore_pools(other, str(tmp_path / "a"), "default")
    assert all(torch.equal(v, before[k]) for k, v in _pools(other).items())


def test_from_pretrained_is_in_eval_mode_unless_trainable(tmp_path):
    model = get_mos_model(make_llama().train(), mos_config(lora_dropout=0.1))
    model.save_pretrained(tmp_path)
    loaded = MoSModel.from_pretrained(make_llama().train(), tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert not any(p.requires_grad for p in loaded.parameters())
    trained = get_mos_model(make_llama().train(), mos_config(lora_dropout=0.1), adapter_name="other")
    trained.load_adapter(str(tmp_path), "default")  # PEFT's load_adapter also switches to eval
    assert not trained.training
    trainable = MoSModel.from_pretrained(make_llama().train(), tmp_path, is_trainable=True)
    assert trainable.training and all(m.training for m in trainable.modules())
    assert all(p.requires_grad for p in trainable.mos_pools.parameters())


def test_plain_trainer_output_is_refused_by_from_pretrained_with_a_pointer(tmp_path):
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path, max_steps=1, save_strategy="no"),
                                   train_dataset=TokenRows())
    trainer.train()
    trainer.save_model(str(tmp_path / "plain"))
    with pytest.raises(FileNotFoundError, match="MoSTrainer"):
        MoSModel.from_pretrained(make_llama(), str(tmp_path / "plain"))
    assert mos.MoSTrainer is MoSTrainer


def test_mos_trainer_loads_the_best_adapter_at_end(tmp_path):
    model = _model()
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss", save_total_limit=None)
    trainer = MoSTrainer(model=model, args=args, train_dataset=TokenRows(), eval_dataset=TokenRows(n=4))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    for key, value in saved.items():
        module_type, name = key.split(".")
        assert torch.equal(getattr(model.mos_pools["default"][module_type], name).detach().cpu(), value)
