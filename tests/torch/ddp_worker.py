"""The DDP test's model, data and worker, kept free of transformers/pytest so spawned processes start fast."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mos
from mos.torch import get_mos_model
from spawned_group import spawned_group

STEPS, GLOBAL_BATCH, WORLD, WIDTH = 3, 8, 2, 16


class Blocks(nn.Module):
    """Residual MLP blocks, each run under non-reentrant checkpointing: the shared pools are used
    inside several checkpointed segments, the case that breaks reentrant checkpointing under DDP."""

    def __init__(self, n_blocks=3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(WIDTH, 2 * WIDTH), "fc2": nn.Linear(2 * WIDTH, WIDTH)})
            for _ in range(n_blocks))

    def forward(self, x):
        for block in self.layers:
            x = x + checkpoint(lambda h, b=block: b["fc2"](torch.tanh(b["fc1"](h))), x, use_reentrant=False)
        return x


def make_model():
    torch.manual_seed(0)
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1, target_modules=["fc1", "fc2"],
                           init_lora_weights=False, lora_dropout=0.0)
    return get_mos_model(Blocks(), config)


def global_batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(GLOBAL_BATCH, WIDTH, generator=g), torch.randn(GLOBAL_BATCH, WIDTH, generator=g))
            for _ in range(STEPS)]


def train(model, batches, shard=None):
    """SGD on the mean-squared error; with `shard`, this rank's half of each global batch."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for x, target in batches:
        if shard is not None:
            x, target = x.chunk(WORLD)[shard], target.chunk(WORLD)[shard]
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
        opt.zero_grad()


def worker(rank, rendezvous, out_path):
    with spawned_group(rank, rendezvous, WORLD):
        model = make_model().train()
        train(torch.nn.parallel.DistributedDataParallel(model), global_batches(), shard=rank)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.mos_pools.state_dict().items()}, out_path)
