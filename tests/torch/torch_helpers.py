"""Helpers shared by the torch tests: tiny real transformers models, configs and a float64 reference."""
import json
import os
import threading

import numpy as np
import torch

import mos
from mos.testing import tiny_llama, token_batch
from mos.testing.models import LLAMA_CONFIG as LLAMA_KW


def make_llama(seed=0, dtype=torch.float32, **overrides):
    """A LlamaForCausalLM built from a config (no download); same seed, same weights."""
    return tiny_llama(seed=seed, dtype=dtype, **overrides)


def llama_inputs(batch=2, seq=8, seed=1):
    return token_batch(batch=batch, seq=seq, vocab_size=LLAMA_KW["vocab_size"], seed=seed)


def mos_config(**overrides):
    """A valid config for the 2-layer tiny Llama (r=4 from 3 equivalent ranks, l=2, p=1)."""
    kw = dict(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, lora_alpha=8.0,
              target_modules="all-linear")
    kw.update(overrides)
    return mos.MoSConfig(**kw)


def randomize_pools(model, seed=3, scale=0.2):
    """Gives every pool of every adapter nonzero values (a fresh adapter's B-pool is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.mos_pools.named_parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64).to(param.dtype) * scale)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def plain_state(model):
    """The base model's state with MoSLinear's `.base_layer` hop removed (loads into a fresh model)."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()}


def reference_delta(x, pool_a, index_a, pool_b, index_b, scale):
    """float64 NumPy reference of DESIGN section 1: scale * (x A^T) B^T over the last dimension."""
    x = np.asarray(x, np.float64)
    pool_a, pool_b = np.asarray(pool_a, np.float64), np.asarray(pool_b, np.float64)
    index_a, index_b = np.asarray(index_a), np.asarray(index_b)
    d_in = x.shape[-1]
    shards = d_in // pool_a.shape[1]
    rank = len(index_a) // shards
    a = pool_a[index_a].reshape(rank, d_in)
    bt = pool_b[index_b].reshape(rank, -1)
    return scale * (x @ a.T) @ bt


def reference_grads(dy, x, pool_a, index_a, pool_b, index_b, scale):
    """(dx, dpool_a, dpool_b) of reference_delta for upstream gradient dy (float64, NumPy)."""
    dy, x = np.asarray(dy, np.float64).reshape(-1, dy.shape[-1]), np.asarray(x, np.float64)
    x = x.reshape(-1, x.shape[-1])
    pool_a, pool_b = np.asarray(pool_a, np.float64), np.asarray(pool_b, np.float64)
    d_in = x.shape[-1]
    shards = d_in // pool_a.shape[1]
    rank = len(index_a) // shards
    a = pool_a[index_a].reshape(rank, d_in)
    bt = pool_b[index_b].reshape(rank, -1)
    h = x @ a.T
    g = scale * dy @ bt.T
    dpool_a = np.zeros_like(pool_a)
    dpool_b = np.zeros_like(pool_b)
    np.add.at(dpool_a, np.asarray(index_a), (g.T @ x).reshape(rank * shards, -1))
    np.add.at(dpool_b, np.asarray(index_b), (scale * h.T @ dy).reshape(rank * shards, -1))
    return g @ a, dpool_a, dpool_b


def to_numpy(t):
    return t.detach().cpu().double().numpy()


def rewrite_config(directory, **fields):
    """Changes fields of a saved adapter_config.json in place (its save id stays, so the file still
    counts as that save's own config)."""
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(fields)
    with open(path, "w") as f:
        json.dump(data, f)


def run_threads(work, n):
    """Runs work(k) on n threads (k = 0..n-1); fails with the first error any of them raised."""
    errors = []

    def guarded(k):
        try:
            work(k)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} thread(s) failed, first: {errors[0]!r}"
