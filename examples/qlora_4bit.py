"""MoS on a 4-bit NF4 base (QLoRA's setup, which the MoS paper fine-tunes on): the frozen base is
stored by bitsandbytes in 4 bits, the MoS pools train in float32 on top of it.

    python examples/qlora_4bit.py            # width 128, 60 steps
    python examples/qlora_4bit.py --small    # width 64, a few steps (CI)

The base is built from a config and written to a temporary directory so transformers can load it
quantized, as it would a downloaded checkpoint. bitsandbytes runs 4-bit layers on the CPU too.
"""
import argparse
import tempfile

import torch
import transformers

import mos


def build_base(directory, small):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64 if small else 128,
                                      intermediate_size=128 if small else 256, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=4)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                             dtype=torch.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model and a few steps (CI)")
    args = parser.parse_args(argv)
    steps = 8 if args.small else 60

    with tempfile.TemporaryDirectory() as directory:
        base = build_base(directory, args.small)
    import bitsandbytes as bnb

    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1, lora_alpha=8.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"])
    model = mos.get_mos_model(base, config)
    model.print_trainable_parameters()

    # One fixed batch: a short repeating pattern the adapter can learn.
    ids = (torch.arange(16).repeat(4, 1) * 7 + torch.arange(4)[:, None]) % 128
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"{n_4bit} Linear4bit layers adapted; loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps")
    assert losses[-1] < losses[0], "training did not lower the loss"


if __name__ == "__main__":
    main()
