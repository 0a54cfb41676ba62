"""mos.testing: what MoS experiments and test suites need, with a pytest plugin on top.

    reference_forward / reference_backward    an independent pure-torch MoS (float64), to compare against
    assert_adapter_close(model_a, model_b)    same index tables, pools close, same layers and scale
    assert_no_op_at_init(model)               a fresh adapter leaves the outputs exactly unchanged
    assert_exports_match_peft(model, path)    export_lora loads in peft.PeftModel with the same outputs
    assert_only_adapter_trainable(model)      exactly the active adapter's pools train
    tiny_llama / tiny_gpt2 / token_batch      small real transformers models from configs, seeded
    randomize_pools(model)                    seeded nonzero pools, so an adapter shows in the outputs

The plugin (mos.testing.plugin, registered through the `pytest11` entry point) adds fixtures of
the same names, a --mos-device option and a `gpu` marker. Nothing here imports torch until used,
so `import mos` and pytest keep working where torch is absent.
"""
import importlib

_EXPORTS = {
    "reference_forward": "reference", "reference_backward": "reference",
    "assert_adapter_close": "assertions", "assert_no_op_at_init": "assertions",
    "assert_exports_match_peft": "assertions", "assert_only_adapter_trainable": "assertions",
    "tiny_llama": "models", "tiny_gpt2": "models", "token_batch": "models", "randomize_pools": "models",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
