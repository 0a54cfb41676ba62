"""MoSConfig: every field is validated when the config is made, and errors speak the config's own
terms. Runs without torch (the config needs none)."""
import pytest

import mos
from mos import _C

# A valid config for the 2-layer models of the tests (r=4 from 3 equivalent ranks, l=2, p=1).
VALID = dict(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, lora_alpha=8.0,
             target_modules="all-linear")


@pytest.mark.parametrize("fields,message", [
    (dict(private_rank=5), "private_rank=5 must be <= equivalent_rank=3"),
    (dict(lora_dropout=1.5), "lora_dropout must be in"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    (dict(pool_dtype="int8"), "pool_dtype must be"),
    (dict(r=0), "r must be >= 1"),
])
def test_invalid_config_values_raise_at_creation(fields, message):
    with pytest.raises(ValueError, match=message):
        mos.MoSConfig(**{**VALID, **fields})


@pytest.mark.parametrize("change", [dict(lora_alpha=1e40), dict(lora_alpha=10**400),
                                    dict(lora_alpha=70000.0, pool_dtype="float16", r=1)])
def test_config_refuses_a_scale_beyond_its_pool_dtype(change):
    with pytest.raises(ValueError, match="lora_alpha"):
        mos.MoSConfig(**change)


def test_config_keeps_a_large_finite_scale_in_float64():
    assert mos.MoSConfig(lora_alpha=1e40, pool_dtype="float64").scaling == 1e40 / 8


def test_seed_beyond_64_bits_is_refused_not_truncated():
    with pytest.raises(ValueError, match="seed must be below 2..64"):
        mos.MoSConfig(seed=2**64 + 7)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        _C.route_key(2**64 + 7, "q", 0, 0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        _C.route_indices(8, 6, 3, 4, 2, 2, 1, True, -1, "q", 0, 0)
    assert _C.route_key(2**64 - 1, "q", 0, 0) != _C.route_key(2**63 - 1, "q", 0, 0)


@pytest.mark.parametrize("value", ["pissa", "pissa_niter_4", "olora", "loftq", "eva", "corda", "orthogonal"])
def test_per_layer_inits_are_refused_by_name(value):
    with pytest.raises(ValueError, match=rf"init_lora_weights='{value}' is not supported by MoS"):
        mos.MoSConfig(init_lora_weights=value)


def test_bad_option_values_are_value_errors():
    for options, message in [(dict(bias="some"), "bias must be 'none', 'all' or 'lora_only'"),
                             (dict(layers_to_transform="0"), "layers_to_transform must be"),
                             (dict(layers_to_transform=[-1]), "layers_to_transform must be"),
                             (dict(modules_to_save=r"class.*"), None),
                             (dict(exclude_modules=[""]), "exclude_modules must be"),
                             (dict(init_lora_weights="uniform"), "init_lora_weights must be True, False or")]:
        if message is None:  # a single name is a list of one, as PEFT reads it
            assert mos.MoSConfig(**options).modules_to_save == [r"class.*"]
            continue
        with pytest.raises(ValueError, match=message):
            mos.MoSConfig(**options)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=4, private_rank=5, equivalent_rank=5), "private_rank=5 must be <= r=4"),
    (dict(private_rank=3, equivalent_rank=2, r=4), "private_rank=3 must be <= equivalent_rank=2"),
    (dict(r=0), "r must be >= 1, got 0"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(equivalent_rank=2.5), "equivalent_rank must be an integer"),
])
def test_invalid_configurations_name_the_field_and_bound(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mos.MoSConfig(**kwargs)
