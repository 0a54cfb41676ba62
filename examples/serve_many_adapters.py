"""Several MoS adapters on one base model, served in one mixed batch (one adapter per sample),
and the memory they hold against the same adapters as LoRA.

    python examples/serve_many_adapters.py            # 8 adapters, 20 training steps each
    python examples/serve_many_adapters.py --small    # 3 adapters, 2 steps each (CI)

Each adapter is trained briefly on its own token pattern (an arithmetic sequence), then one batch
holding a prompt per adapter (plus one for the bare base, "__base__") runs in a single forward and
a single generate: each adapter continues its own sequence. Every sample's result is checked
against the same adapter running alone.
"""
import argparse

import torch
import transformers

import mos


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a few adapters and steps (CI)")
    parser.add_argument("--adapters", type=int, help="adapters to train (default 8; 3 with --small)")
    parser.add_argument("--steps", type=int, help="training steps per adapter (default 20; 2 with --small)")
    args = parser.parse_args(argv)
    n_adapters, steps = (3, 2) if args.small else (8, 20)
    n_adapters, steps = args.adapters or n_adapters, args.steps or steps

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
        # A random base stands in for a pretrained one. At transformers' default std 0.02 its
        # layers pass on almost nothing and its head caps the logits near zero, so no adapter
        # learns a pattern in a few steps; at 0.2 its features and logits have a trained model's scale.
        initializer_range=0.2))
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1, target_modules="all-linear")
    names = [f"task{i}" for i in range(n_adapters)]
    model = None
    for i, name in enumerate(names):
        if model is None:
            model = mos.get_mos_model(base, mos.MoSConfig(**{**config.to_dict(), "seed": i}), adapter_name=name)
        else:
            model.add_adapter(name, mos.MoSConfig(**{**config.to_dict(), "seed": i}))
        model.set_adapter(name)
        pattern = (torch.arange(24) * (i + 3)) % 128  # each task: its own arithmetic sequence
        ids = pattern.repeat(2, 1)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        model.train()
        for _ in range(steps):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()

    batch_names = names + ["__base__"]
    learned_count = 0
    prompts = torch.stack([(torch.arange(6) * (i + 3)) % 128 for i in range(len(batch_names))])
    with torch.no_grad():
        mixed = model(prompts, adapter_names=batch_names).logits
        generated = model.generate(prompts, attention_mask=torch.ones_like(prompts), adapter_names=batch_names,
                                   max_new_tokens=6, do_sample=False)
        for row, name in enumerate(batch_names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(prompts[row:row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(prompts[row:row + 1]).logits
            diff = (mixed[row] - alone[0]).abs().max().item()
            continuation = generated[row, 6:].tolist()
            learned = continuation == ((torch.arange(6, 12) * (row + 3)) % 128).tolist()
            learned_count += learned and name != "__base__"
            print(f"{name:9s} continues {prompts[row].tolist()} with {continuation} "
                  f"({'its pattern' if learned else 'not its pattern'}); mixed batch vs alone: {diff:.1e}")
            assert diff < 1e-4, f"{name}: the mixed batch differs from the adapter run alone"
    print(f"{learned_count}/{n_adapters} adapters continue their own pattern in the mixed batch "
          f"(the bare base continues none)")

    resident = model.adapter_store.resident_bytes()
    lora = model.adapter_store.lora_bytes()
    print(f"{n_adapters} adapters hold {sum(resident.values()) / 1024:.1f} KiB; the same adapters as LoRA "
          f"at r={config.r} would hold {sum(lora.values()) / 1024:.1f} KiB "
          f"({sum(lora.values()) / sum(resident.values()):.1f}x more)")
    return learned_count


if __name__ == "__main__":
    main()
