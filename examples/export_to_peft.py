"""Train a MoS adapter, export it as the plain LoRA adapter it is equivalent to, load that with
peft.PeftModel, and check both give the same outputs.

    python examples/export_to_peft.py            # 40 steps
    python examples/export_to_peft.py --small    # 5 steps (CI)

The export writes each layer's assembled A_k and B_k under PEFT's keys, so any LoRA tooling
(serving stacks, merging scripts) can take a MoS-trained adapter.
"""
import argparse
import tempfile

import peft
import torch
import transformers

import mos


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a few steps (CI)")
    args = parser.parse_args(argv)
    steps = 5 if args.small else 40

    model = mos.get_mos_model(llama(), mos.MoSConfig(r=4, equivalent_rank=2, target_modules="all-linear"))
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()

    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        model.export_lora(directory)
        lora = peft.PeftModel.from_pretrained(llama(), directory).eval()  # the same base weights
        print(f"PEFT loaded LoRA r={lora.peft_config['default'].r} on "
              f"{sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in lora.modules())} layers")
        mos_logits, lora_logits, base_logits = model(ids).logits, lora(ids).logits, llama()(ids).logits
    base_shift = (mos_logits - base_logits).abs().max().item()
    diff = (mos_logits - lora_logits).abs().max().item()
    print(f"max |MoS - PEFT LoRA| = {diff:.2e} (the adapter moved the logits by up to {base_shift:.2e})")
    assert diff < 1e-4 < base_shift, "the exported LoRA does not reproduce the MoS model"


if __name__ == "__main__":
    main()
