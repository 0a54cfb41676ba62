"""Mixed-adapter batches from several threads, while adapters come and go, and after state loads:
every sample equals its adapter run alone."""
import functools
import threading

import torch

from torch_helpers import llama_inputs, logits_alone, make_serving_model, randomize_pools, run_threads

# alpha and beta serve throughout; gamma also adapts modules the others leave alone, so loading
# and unloading it wraps and unwraps layers.
CONFIGS = {
    "alpha": dict(seed=1, target_modules=["q_proj", "v_proj"]),
    "beta": dict(seed=2, r=2, equivalent_rank=2, shards_per_vector=4, private_rank=0,
                 target_modules=["q_proj", "k_proj"]),
    "gamma": dict(seed=3, target_modules=["v_proj", "o_proj", "down_proj"]),
}


make_model = functools.partial(make_serving_model, CONFIGS)
alone = logits_alone


def test_threads_serving_mixed_batches_each_get_their_own_adapters():
    model = make_model()
    ids = llama_inputs(batch=4, seq=3)
    batches = [["alpha", "beta", "gamma", "__base__"], ["gamma", "gamma", "alpha", "beta"],
               ["beta", "__base__", "beta", "alpha"], ["__base__", "alpha", "gamma", "gamma"]]
    expected = [alone(model, ids, names) for names in batches]
    wrong = []

    def serve(k):
        for step in range(8):
            j = (k + step) % len(batches)
            with torch.no_grad():
                out = model(ids, adapter_names=batches[j]).logits
            if not torch.allclose(out, expected[j], rtol=1e-5, atol=1e-5):
                wrong.append((k, step))

    run_threads(serve, 4)
    assert not wrong, f"{len(wrong)} of 32 mixed batches got another thread's adapters"


def test_loading_and_unloading_while_serving_keeps_requests_consistent(tmp_path):
    source = make_model()
    source.save_pretrained(str(tmp_path), selected_adapters=["gamma"])
    gamma_dir = str(tmp_path / "gamma")
    ids = llama_inputs(batch=3, seq=3)
    steady = ["alpha", "beta", "__base__"]
    with_gamma = ["gamma", "alpha", "gamma"]
    want_steady, want_gamma = alone(source, ids, steady), alone(source, ids, with_gamma)
    source.delete_adapter("gamma")
    model = source
    done = threading.Event()
    served = []

    def work(k):
        if k == 0:  # the operator: gamma comes and goes
            try:
                for _ in range(6):
                    model.adapter_store.load(gamma_dir, "gamma")
                    with torch.no_grad():
                        out = model(ids, adapter_names=with_gamma).logits
                    torch.testing.assert_close(out, want_gamma, rtol=1e-5, atol=1e-5)
                    model.adapter_store.unload("gamma")
            finally:
                done.set()
        else:  # the servers: alpha, beta and the base model, without pause
            while not done.is_set():
                with torch.no_grad():
                    out = model(ids, adapter_names=steady).logits
                torch.testing.assert_close(out, want_steady, rtol=1e-5, atol=1e-5)
                served.append(k)

    run_threads(work, 3)
    assert served, "the servers never ran"
    assert model.adapter_store.adapter_names == ["alpha", "beta"]


def test_mixed_batches_follow_load_state_dict():
    model = make_model(("alpha", "beta"))
    other = make_model(("alpha", "beta"))
    for name in ("alpha", "beta"):  # same shapes, other index tables and values
        for shared in other.mos_pools[name].values():
            shared.index_a.copy_(shared.index_a.flip(1))
    randomize_pools(other, seed=9)
    ids = llama_inputs(batch=3, seq=3)
    names = ["beta", "alpha", "__base__"]
    with torch.no_grad():
        model(ids, adapter_names=names)  # the store packs the old tables
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        out = model(ids, adapter_names=names).logits
    torch.testing.assert_close(out, alone(other, ids, names), rtol=1e-5, atol=1e-5)
