"""The worker of the FSDP2 MoSTrainer save test: every rank calls save_model, as Trainer does at a
checkpoint; the adapter's pools and head copy are sharded, so saving gathers on every rank and
rank 0 writes (kept free of pytest so spawned processes start fast)."""
import os

import torch
import transformers
from torch.distributed.fsdp import fully_shard

from mos.torch import get_mos_model
from mos.torch.trainer import MoSTrainer
from spawned_group import spawned_group
from torch_helpers import make_llama, mos_config

WORLD = 2


def make_model():
    return get_mos_model(make_llama(), mos_config(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                         adapter_name="tuned")


def worker(rank, rendezvous, out_dir):
    # What a launcher sets: accelerate then joins the group already made (no port is opened).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="0")
    with spawned_group(rank, rendezvous, WORLD):
        model = make_model()
        fully_shard(model)
        args = transformers.TrainingArguments(output_dir=os.path.join(out_dir, "run"), report_to=[],
                                              use_cpu=True, disable_tqdm=True)
        trainer = MoSTrainer(model=model, args=args)
        trainer.save_model(os.path.join(out_dir, "saved"))
        torch.save({"should_save": args.should_save}, os.path.join(out_dir, f"rank{rank}.pt"))
