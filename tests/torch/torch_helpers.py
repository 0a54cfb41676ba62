"""Helpers shared by the torch tests: tiny real transformers models, configs, the serving model and
threads (the float64 NumPy reference is mos.testing.numpy_reference)."""
import json
import os
import threading

import torch

import mos
from mos.testing import randomize_pools, tiny_llama, token_batch  # noqa: F401 (randomize_pools: shared)
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


def make_serving_model(configs, names=None, device="cpu", dtype=torch.float32, **extra):
    """The serving tests' model: the tiny Llama with one adapter per name (default: every entry of
    `configs`, a dict of name -> mos_config overrides, plus `extra` for all), random pools, eval mode."""
    first, *rest = tuple(configs) if names is None else names
    base = make_llama(dtype=dtype).to(device)
    model = mos.get_mos_model(base, mos_config(**{**configs[first], **extra}), adapter_name=first)
    for name in rest:
        model.add_adapter(name, mos_config(**{**configs[name], **extra}))
    randomize_pools(model)
    return model.eval()


def logits_with(model, ids, name):
    """Logits of `ids` with adapter `name` alone active ("__base__": with the adapters disabled),
    through the training op, whose per-row kernels a mixed batch shares. Under no_grad a single
    adapter takes the inference path, which rounds differently; tests/torch/test_decode_path.py
    holds that path to the training op and the float64 reference."""
    with torch.enable_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(ids).logits.detach()
        model.set_adapter(name)
        return model(ids).logits.detach()


def logits_alone(model, ids, names):
    """Row i of `ids` run with adapter names[i] alone: what a mixed batch must reproduce."""
    return torch.stack([logits_with(model, ids[i:i + 1], name)[0] for i, name in enumerate(names)])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def plain_state(model):
    """The base model's state with MoSLinear's `.base_layer` hop removed (loads into a fresh model)."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()}


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
