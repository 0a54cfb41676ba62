"""How far merging into a bitsandbytes base moves a model's outputs: MoS next to PEFT's LoRA.

A small Llama (hidden 64, 2 layers) is saved, loaded back 4-bit (fp4, as BitsAndBytesConfig
defaults) and 8-bit on CPU, and given a MoS adapter on every linear layer with random pools at
the scales given. Printed: max |logits| differences over one batch between
  adapter  - base      (how much the adapter does)
  merged   - adapter   (what merging's requantization costs; MoS merge_adapter)
  unmerged - adapter   (after unmerge_adapter: the base rounded twice)
  peft     - adapter   (the same update exported with export_lora, merged by PEFT's merge_and_unload,
                       after a forward, and before any forward: bitsandbytes repacks 4-bit weights for
                       its AVX512-BF16 CPU kernel on the first eval forward)

    .venv/bin/python benchmarks/quantized_merge.py
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
import transformers

import mos
from mos.testing import randomize_pools, tiny_llama as make_llama, token_batch as llama_inputs


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def quantized(directory, kind):
    options = {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float32} if kind == "4bit" \
        else {"load_in_8bit": True}
    return transformers.LlamaForCausalLM.from_pretrained(
        directory, quantization_config=transformers.BitsAndBytesConfig(**options), device_map="cpu",
        dtype=torch.float32).eval()


def measure(directory, kind, scale, work):
    import peft
    ids = llama_inputs()
    config = mos.MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, lora_alpha=8.0,
                           target_modules="all-linear")
    base_out = logits(quantized(directory, kind), ids)
    model = mos.get_mos_model(quantized(directory, kind), config)
    randomize_pools(model, scale=scale)
    adapter_out = logits(model, ids)
    model.export_lora(os.path.join(work, f"lora-{kind}-{scale}"))
    model.merge_adapter()
    merged_out = logits(model, ids)
    model.unmerge_adapter()
    unmerged_out = logits(model, ids)
    lora = peft.PeftModel.from_pretrained(quantized(directory, kind), os.path.join(work, f"lora-{kind}-{scale}"))
    peft_adapter_out = logits(lora, ids)
    peft_merged_out = logits(lora.merge_and_unload(), ids)
    fresh = peft.PeftModel.from_pretrained(quantized(directory, kind), os.path.join(work, f"lora-{kind}-{scale}"))
    peft_merged_first_out = logits(fresh.merge_and_unload(), ids)
    return {"adapter - base": (adapter_out - base_out).abs().max().item(),
            "merged - adapter": (merged_out - adapter_out).abs().max().item(),
            "unmerged - adapter": (unmerged_out - adapter_out).abs().max().item(),
            "peft unmerged - adapter": (peft_adapter_out - adapter_out).abs().max().item(),
            "peft merged - adapter": (peft_merged_out - adapter_out).abs().max().item(),
            "peft merged before any forward - adapter": (peft_merged_first_out - adapter_out).abs().max().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.02, 0.05, 0.2],
                        help="standard deviation of the random pool values")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as work:
        directory = os.path.join(work, "base")
        make_llama(hidden_size=64, intermediate_size=128).save_pretrained(directory)
        columns = None
        for kind in ("4bit", "8bit"):
            for scale in args.scales:
                row = measure(directory, kind, scale, work)
                if columns is None:
                    columns = list(row)
                    print("| base | pool scale | " + " | ".join(columns) + " |")
                    print("|---|---|" + "---|" * len(columns))
                print(f"| {kind} | {scale} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
