"""kill -9 at random instants of save_pretrained / export_lora: the directory always holds the
previous adapter or the new one, complete, never a mix (an export may also be left without its
config, which PEFT refuses to load); temporaries do not outlive their writer."""
import json
import os
import random
import signal
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from mos.torch import MoSModel, get_mos_model
from torch_helpers import make_llama, mos_config, randomize_pools

# Saves cycle through three adapters: X and Y differ in r (a mix cannot load), X and Z only in
# lora_alpha and values (a mix would load silently wrong).
ADAPTERS = {"X": dict(r=4, lora_alpha=8.0, seed=1), "Y": dict(r=2, lora_alpha=2.0, seed=2),
            "Z": dict(r=4, lora_alpha=32.0, seed=3)}
KILLS = 30


@pytest.fixture(scope="module")
def models():
    out = {}
    for k, (name, overrides) in enumerate(ADAPTERS.items()):
        model = get_mos_model(make_llama(), mos_config(**overrides))
        randomize_pools(model, seed=10 + k)
        out[name] = model
    return out


def _save_in_a_loop(write, models, directory):
    """Forks a child that writes the adapters in turn, forever; returns its pid."""
    pid = os.fork()
    if pid == 0:  # child: never returns into the test runner
        try:
            while True:
                for model in models.values():
                    write(model, directory)
        finally:
            os._exit(1)
    return pid


def _kill_at_random_instants(write, models, directory, check):
    """Saves once, then KILLS times: a child saves in a loop and is killed at a random instant of
    its first few saves; check(directory) names what it found. Returns {outcome: count}."""
    write(models["X"], directory)
    start = time.perf_counter()
    for model in models.values():
        write(model, directory)
    period = time.perf_counter() - start  # one round of three saves
    rng = random.Random(0)
    outcomes = {}
    for _ in range(KILLS):
        pid = _save_in_a_loop(write, models, directory)
        time.sleep(rng.uniform(0.0, 1.5 * period))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcome = check(directory)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def _temporaries(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_kill_during_save_pretrained_leaves_old_or_new_adapter(models, tmp_path):
    directory = str(tmp_path / "adapter")
    base = make_llama()
    expected = {name: {k: v.clone() for k, v in m.mos_pools.state_dict().items()} for name, m in models.items()}

    def check(directory):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = MoSModel.from_pretrained(base, directory)  # a mix raises or differs below
        config = loaded.peft_config["default"]
        name = next(n for n, o in ADAPTERS.items() if (config.r, config.lora_alpha, config.seed) ==
                    (o["r"], o["lora_alpha"], o["seed"]))
        state = {k.replace("default.", "", 1): v for k, v in loaded.mos_pools.state_dict().items()}
        want = {k.replace("default.", "", 1): v for k, v in expected[name].items()}
        assert state.keys() == want.keys()
        for key in want:
            assert torch.equal(state[key], want[key]), f"{key}: config of {name}, values of another adapter"
        loaded.unload()
        return name + (" (config from the weights)" if caught else "")

    outcomes = _kill_at_random_instants(lambda m, d: m.save_pretrained(d), models, directory, check)
    print(f"save_pretrained, {KILLS} kills: {outcomes}")
    assert sum(outcomes.values()) == KILLS
    models["Y"].save_pretrained(directory)  # a later save clears what the killed writers left
    assert _temporaries(directory) == []
    assert check(directory) == "Y"


def _export_state(directory):
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(directory, "adapter_model.safetensors"))


def test_kill_during_export_lora_leaves_old_or_new_export(models, tmp_path):
    directory = str(tmp_path / "lora")
    expected = {}
    for name, model in models.items():
        model.export_lora(str(tmp_path / f"reference-{name}"))
        expected[name] = _export_state(str(tmp_path / f"reference-{name}"))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "README.md").write_text("kept\n")  # not the export's: left alone

    def check(directory):
        if not os.path.exists(os.path.join(directory, "adapter_config.json")):
            return "config removed, which PEFT refuses to load"  # killed while switching configs
        config, tensors = _export_state(directory)
        name = next(n for n, (c, _) in expected.items() if c == config)
        want = expected[name][1]
        assert tensors.keys() == want.keys()
        for key in want:
            assert torch.equal(tensors[key], want[key]), f"{key}: config of {name}, tensors of another export"
        assert (tmp_path / "lora" / "README.md").read_text() == "kept\n"
        return name

    outcomes = _kill_at_random_instants(lambda m, d: m.export_lora(d), models, directory, check)
    print(f"export_lora, {KILLS} kills: {outcomes}")
    assert sum(outcomes.values()) == KILLS
    models["Z"].export_lora(directory)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no stale sibling directories
    assert check(directory) == "Z"
