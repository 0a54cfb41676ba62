"""FSDP2 collectives per training step: MoS against PEFT LoRA at an equal budget.

Two gloo processes on the CPU each shard a small Llama with `fully_shard` per decoder layer and on
the root, as users run FSDP2, then count the all-gathers and reduce-scatters FSDP2 issues (and
the bytes they move) in one training step after a warm-up step. The MoS pools live on the root, so
they are gathered with the root's group once per step and their gradients reduce-scattered once;
a LoRA adapter lives in its decoder layer and travels with that layer's group.

    python benchmarks/bench_fsdp.py              # prints, updates RESULTS.md
    python benchmarks/bench_fsdp.py --no-write   # prints only
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WORLD, LAYERS, BUDGET = 2, 4, 2


def build(method):
    import peft
    import transformers

    import mos

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2))
    if method == "MoS":
        config = mos.MoSConfig(r=4, equivalent_rank=BUDGET, shards_per_vector=2, private_rank=1,
                               target_modules="all-linear")
        return mos.get_mos_model(base, config), base.model.layers
    model = peft.get_peft_model(base, peft.LoraConfig(r=BUDGET, target_modules="all-linear"))
    return model, base.model.layers


def _counting(fn, counter, kind):
    def wrapped(output, input, *args, **kwargs):
        counter[kind] += 1
        counter[kind + " bytes"] += max(output.numel() * output.element_size(), input.numel() * input.element_size())
        return fn(output, input, *args, **kwargs)
    return wrapped


def worker(rank, rendezvous, out_path):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    results = {}
    try:
        counter = Counter()
        dist.all_gather_single = _counting(dist.all_gather_single, counter, "all-gather")
        dist.reduce_scatter_single = _counting(dist.reduce_scatter_single, counter, "reduce-scatter")
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(rank))
        for method in ("MoS", "LoRA"):
            model, layers = build(method)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            for layer in layers:
                fully_shard(layer)
            fully_shard(model)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            for step in range(2):
                counter.clear()
                model(ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
            results[method] = dict(counter, trainable=trainable)
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # gloo's teardown during interpreter finalization can abort a finished process (SIGABRT,
    # "terminate called without an active exception"); the results are written, so leave now.
    sys.stdout.flush()
    os._exit(0)


def fmt_bytes(n):
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def render(results):
    from results_md import cpu_name

    lines = ["## FSDP2 collectives per step (`bench_fsdp`)", "",
             f"Command: `python benchmarks/bench_fsdp.py` ({WORLD} gloo processes on {cpu_name()}). A Llama with "
             f"{LAYERS} decoder layers (hidden 128), `fully_shard` on every decoder layer and on the root; "
             f"adapters on every linear layer at an equal budget (LoRA r={BUDGET}, MoS equivalent_rank={BUDGET}, r=4). "
             "Counted in the second training step; bytes are the gathered (all-gather) or reduced (reduce-scatter) "
             "buffer per call, summed.", "",
             "| method | trainable params | all-gathers | bytes all-gathered | reduce-scatters | bytes reduce-scattered |",
             "|---|---|---|---|---|---|"]
    for method, r in results.items():
        lines.append(f"| {method} | {r['trainable']:,} | {r.get('all-gather', 0)} | {fmt_bytes(r.get('all-gather bytes', 0))} "
                     f"| {r.get('reduce-scatter', 0)} | {fmt_bytes(r.get('reduce-scatter bytes', 0))} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "counts.pt")
        mp.spawn(worker, args=(os.path.join(tmp, "rendezvous"), out_path), nprocs=WORLD, join=True)
        results = torch.load(out_path)
    text = render(results)
    print(text)
    if not args.no_write:
        from results_md import write_section

        print("wrote", write_section("bench_fsdp", text))


if __name__ == "__main__":
    main()
