"""The FSDP2 test's model, data and worker: a small Llama with fully_shard per decoder layer and on
the root, AdamW on each rank's half of every global batch, then a gathered save_pretrained and
export_lora and a torch.distributed.checkpoint save (kept free of pytest so spawned processes
start fast). Besides its pools the adapter trains biases and modules_to_save copies, some inside
the decoder layers' groups and one in the root's, so the saves must gather those too."""
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from mos.torch import get_mos_model
from spawned_group import spawned_group
from torch_helpers import LLAMA_KW, make_llama, mos_config

STEPS, GLOBAL_BATCH, SEQ, WORLD = 3, 4, 8, 2


SAVED_MODULES = ["lm_head", "post_attention_layernorm"]


def make_base():
    """The tiny Llama with a bias on every attention and MLP linear."""
    return make_llama(attention_bias=True, mlp_bias=True)


def make_model():
    """Two decoder layers, adapters on every linear, pools starting nonzero so each step moves them;
    bias="all" trains the linears' biases, and the adapter trains its own copy of the LM head and of
    each decoder layer's post_attention_layernorm."""
    config = mos_config(init_lora_weights=False, bias="all", modules_to_save=SAVED_MODULES)
    return get_mos_model(make_base(), config).train()


def global_batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, LLAMA_KW["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def train(model, batches, shard=None):
    """AdamW on the causal-LM loss; with `shard`, this rank's half of each global batch (equal
    token counts, so the mean of the ranks' losses is the global batch's loss)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for ids in batches:
        if shard is not None:
            ids = ids.chunk(WORLD)[shard]
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def placement(model):
    """{name: (local rows, Shard(0) over the whole world)} of every trainable parameter."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            sharded = isinstance(param, DTensor) and param.placements == (Shard(0),) \
                and param.device_mesh.size() == WORLD
            out[name] = (param.to_local().shape[0] if isinstance(param, DTensor) else None, sharded)
    return out


def worker(rank, rendezvous, out_dir):
    with spawned_group(rank, rendezvous, WORLD):
        model = make_model()
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        layout = placement(model)
        train(model, global_batches(), shard=rank)
        pools = {k: v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()
                 for k, v in model.mos_pools.state_dict().items()}
        model.save_pretrained(os.path.join(out_dir, "adapter"))  # every rank: gathers, rank 0 writes
        model.export_lora(os.path.join(out_dir, "lora"))  # the same, as a plain PEFT LoRA adapter
        dcp.save(model.state_dict(), checkpoint_id=os.path.join(out_dir, "dcp"))  # biases, copies too
        if rank == 0:
            torch.save({"pools": pools, "layout": layout}, os.path.join(out_dir, "result.pt"))
