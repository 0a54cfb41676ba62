"""MoSTrainer's checkpoints and save_model for any adapter name, under FSDP2, and a plain Trainer's
checkpoints of a base whose embeddings are tied."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from mos.torch import MoSModel, get_mos_model
from mos.torch.trainer import MoSTrainer
from torch_helpers import LLAMA_KW, make_llama, mos_config


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_fsdp2_save_model_gathers_on_every_rank_and_rank0_writes(tmp_path):
    import trainer_fsdp_worker

    mp.spawn(trainer_fsdp_worker.worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)),
             nprocs=trainer_fsdp_worker.WORLD, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt")["should_save"] for r in range(2)] == [True, False]
    reference = trainer_fsdp_worker.make_model()
    loaded = MoSModel.from_pretrained(make_llama(), str(tmp_path / "saved"), adapter_name="tuned")
    for key, value in reference.mos_pools.state_dict().items():
        assert torch.equal(loaded.mos_pools.state_dict()[key], value), key
    assert torch.equal(loaded.get_base_model().lm_head.modules_to_save["tuned"].weight,
                       reference.get_base_model().lm_head.modules_to_save["tuned"].weight)


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=8, vocab=LLAMA_KW["vocab_size"]):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **overrides):
    kw = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, report_to=[], disable_tqdm=True,
              save_steps=2, learning_rate=1e-2)
    return transformers.TrainingArguments(**{**kw, **overrides})


def _named_model(name):
    torch.manual_seed(0)
    return get_mos_model(make_llama(), mos_config(target_modules=["q_proj", "v_proj"]), adapter_name=name)


def _pools(model):
    return {k.split(".", 1)[1]: v.detach().clone() for k, v in model.mos_pools.state_dict().items()}


def test_mos_trainer_with_a_named_adapter_checkpoints_and_resumes(tmp_path):
    straight = _named_model("tuned")
    trainer = MoSTrainer(model=straight, args=_args(tmp_path / "straight"), train_dataset=TokenRows())
    trainer.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert "adapter_model.safetensors" in os.listdir(checkpoint) and not (checkpoint / "tuned").exists()
    trainer.save_model(str(tmp_path / "final"))
    loaded = MoSModel.from_pretrained(make_llama(), str(tmp_path / "final"), adapter_name="tuned")
    for key, value in _pools(loaded).items():
        assert torch.equal(_pools(straight)[key], value), key

    # Resuming from step 2 reaches the same pools as the straight run.
    resumed = _named_model("tuned")
    again = MoSTrainer(model=resumed, args=_args(tmp_path / "again"), train_dataset=TokenRows())
    again.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert again.state.global_step == 4
    for key, value in _pools(straight).items():
        assert torch.equal(_pools(resumed)[key], value), key


def test_mos_trainer_best_model_differs_from_the_last_and_is_loaded(tmp_path):
    model = _named_model("tuned")
    args = _args(tmp_path / "out", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True, save_total_limit=None)
    trainer = MoSTrainer(model=model, args=args, train_dataset=TokenRows(), eval_dataset=TokenRows(n=4))
    trainer.train()  # "best" is the highest loss: the first checkpoint, not the last pools
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    from_best = MoSModel.from_pretrained(make_llama(), best, adapter_name="tuned")
    for key, value in _pools(from_best).items():
        assert torch.equal(_pools(model)[key].cpu(), value), key


def _tied_model():
    torch.manual_seed(0)
    return get_mos_model(make_llama(tie_word_embeddings=True), mos_config(target_modules=["q_proj", "v_proj"]))


def test_plain_trainer_checkpoints_a_tied_base_and_resumes_exactly(tmp_path):
    straight = _tied_model()
    base = straight.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    transformers.Trainer(model=straight, args=_args(tmp_path / "straight"), train_dataset=TokenRows()).train()
    assert "model.safetensors" in os.listdir(tmp_path / "straight" / "checkpoint-2")
    resumed = _tied_model()
    again = transformers.Trainer(model=resumed, args=_args(tmp_path / "again"), train_dataset=TokenRows())
    again.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    for key, value in _pools(straight).items():
        assert torch.equal(_pools(resumed)[key], value), key
    # The tied name comes back on a strict load, and stays tied.
    state = straight.state_dict()
    assert "base_model.model.lm_head.weight" not in state
    fresh = _tied_model()
    fresh.load_state_dict(state)
    assert fresh.get_base_model().lm_head.weight is fresh.get_base_model().model.embed_tokens.weight
    assert torch.equal(fresh.get_base_model().lm_head.weight, base.lm_head.weight)
