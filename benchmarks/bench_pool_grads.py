"""What a training step's backward writes for the pool gradients, per layer and with one buffer per pool.

Per layer: every layer's backward returns a dense pool-sized gradient (zero-filled, then the layer's
r*l shard rows scatter-added into it) and autograd sums the L layers' gradients; a layer called
outside a MoSModel call still does this. One buffer: inside a MoSModel call every layer's scatter
goes into one buffer per pool per step (mos/torch/pool_grads.py). Two measurements:

1. LLaMA2-7B shapes (32 layers, hidden 4096, intermediate 11008; q, k, v, o, gate, up, down) with
   the paper's configs. Real pool-sized float32 tensors and real index tables, one type at a time.
   Both schemes use the same primitives on this machine's CPU (torch.zeros_like, the core's
   scatter_add, Tensor.add_). Reported: bytes written per step, peak transient bytes, and time.
2. A small Llama trained for real (transformers, mos.get_mos_model), both ways: through the
   MoSModel (one buffer) and through its base model called directly (per layer). torch.profiler
   attributes the zero-fills and additions on pool-shaped tensors during backward; reported as a
   share of backward.

    python benchmarks/bench_pool_grads.py              # prints, updates RESULTS.md
    python benchmarks/bench_pool_grads.py --no-write   # prints only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mos  # noqa: E402
import mos.torch  # noqa: E402,F401  (sets the core's BLAS to one thread, as in training)
from mos.budget import llama_module_types  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
CONFIGS = [dict(r=8, equivalent_rank=2, shards_per_vector=2, private_rank=1),
           dict(r=16, equivalent_rank=8, shards_per_vector=4, private_rank=2)]
FLOAT = 4


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def config_label(c: dict) -> str:
    return f"R_e={c['equivalent_rank']}, r={c['r']}, l={c['shards_per_vector']}, p={c['private_rank']}"


# ---------------------------------------------------------------------------- 1. LLaMA2-7B shapes


def side_problems(config: dict):
    """[(pool shape, [index row per layer])] for both sides of every adapted type."""
    problems = []
    for t in llama_module_types(**LLAMA2_7B):
        pool = mos.ShardPool(t.name, t.d_in, t.d_out, t.n_layers, mos.MoSConfig(**config))
        index_a, index_b = pool.index_tables()
        for shape, table in ((pool.pool_a_shape, index_a), (pool.pool_b_shape, index_b)):
            problems.append((shape, [torch.from_numpy(row.copy()) for row in table]))
    return problems


def dense_per_layer(shape, rows, tables):
    """Per layer: each layer a zero-filled pool-sized gradient plus its scatter; autograd sums them."""
    total = None
    for grad_rows, index in zip(rows, tables):
        g = torch.zeros(shape)
        mos.functional.scatter_add(g, grad_rows, index)
        total = g if total is None else total.add_(g)
    return total


def one_buffer(shape, rows, tables):
    """The alternative: one zero-filled buffer per pool per step, every layer scatters into it."""
    total = torch.zeros(shape)
    for grad_rows, index in zip(rows, tables):
        mos.functional.scatter_add(total, grad_rows, index)
    return total


def bytes_written(shape, n_layers, n_rows):
    pool = shape[0] * shape[1] * FLOAT
    scatter = n_rows * shape[1] * FLOAT
    dense = n_layers * pool + n_layers * scatter + (n_layers - 1) * pool  # zero-fills, scatters, sums
    single = pool + n_layers * scatter
    return dense, single, 2 * pool, pool  # written (dense, one buffer), peak transient (dense, one buffer)


def measure_7b(config: dict, runs: int):
    problems = side_problems(config)
    g = torch.Generator().manual_seed(0)
    totals = dict(dense_bytes=0, single_bytes=0, dense_peak=0, single_peak=0, pools=0)
    times = {"dense": [], "single": []}
    inputs = []
    for shape, tables in problems:
        rows = [torch.randn(len(index), shape[1], generator=g) for index in tables]
        inputs.append((shape, rows, tables))
        dense, single, dense_peak, single_peak = bytes_written(shape, len(tables), len(tables[0]))
        totals["dense_bytes"] += dense
        totals["single_bytes"] += single
        totals["dense_peak"] = max(totals["dense_peak"], dense_peak)
        totals["single_peak"] = max(totals["single_peak"], single_peak)
        totals["pools"] += shape[0] * shape[1] * FLOAT
    for shape, rows, tables in inputs:  # same sums both ways
        torch.testing.assert_close(dense_per_layer(shape, rows, tables), one_buffer(shape, rows, tables))
    for i in range(runs + 1):
        for name, fn in (("dense", dense_per_layer), ("single", one_buffer))[::1 if i % 2 else -1]:
            t0 = time.perf_counter()
            for shape, rows, tables in inputs:
                fn(shape, rows, tables)
            if i:
                times[name].append(time.perf_counter() - t0)
    totals.update({k: statistics.median(v) for k, v in times.items()})
    return totals


# ---------------------------------------------------------------------------- 2. a small Llama, for real


def small_llama_share(config_kw: dict, steps: int, per_layer: bool):
    """per_layer: call the base model directly, outside the MoSModel call that opens one buffer per pool."""
    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4))
    config = mos.MoSConfig(**config_kw, target_modules="all-linear")
    model = mos.get_mos_model(base, config).train()
    call = model.get_base_model() if per_layer else model
    pool_shapes = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    backward_times = []
    events = []
    for i in range(steps + 2):
        loss = call(ids, labels=ids).loss
        if i < 2:
            loss.backward()
        else:
            with torch.profiler.profile(record_shapes=True) as prof:
                t0 = time.perf_counter()
                loss.backward()
                backward_times.append(time.perf_counter() - t0)
            events.append(prof.key_averages(group_by_input_shape=True))
        opt.step()
        opt.zero_grad(set_to_none=True)
    pool_ops = {"aten::zeros_like", "aten::zero_", "aten::fill_", "aten::add_", "aten::add"}
    shares = []
    for averages, total in zip(events, backward_times):
        spent = 0.0
        for e in averages:
            shapes = [tuple(s) for s in (e.input_shapes or []) if s]
            if e.key in pool_ops and shapes and shapes[0] in pool_shapes:
                spent += e.self_cpu_time_total / 1e6
        shares.append(spent / total)
    n_pool_floats = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(backward=statistics.median(backward_times), share=statistics.median(shares),
                pools=n_pool_floats * FLOAT, config=config_label(config_kw))


# ---------------------------------------------------------------------------- report


def render(rows_7b, small, runs, steps) -> str:
    from results_md import cpu_name

    lines = [
        "## Pool gradients in the backward (`bench_pool_grads`)",
        "",
        f"Command: `python benchmarks/bench_pool_grads.py` on {cpu_name()}, {torch.get_num_threads()} torch "
        f"threads, core BLAS single-threaded. Median of {runs} runs.",
        "",
        "**LLaMA2-7B shapes** (32 layers; q, k, v, o, gate, up, down; fp32 pools, real index tables, "
        "random shard gradients). *Dense per layer*: every layer a zero-filled pool-sized gradient holding "
        "its scatter, summed by autograd (what a layer called outside a MoSModel call does). *One buffer*: "
        "each pool's gradient zero-filled once and every layer scattered into it (what a MoSModel call does, "
        "mos/torch/pool_grads.py); here with the same primitives outside autograd.",
        "",
        "| config | pools (all types) | written per step: dense per layer | one buffer | peak transient per pool side: dense | one buffer | time per step: dense | one buffer | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, t in rows_7b:
        lines.append(f"| {label} | {fmt_bytes(t['pools'])} | {fmt_bytes(t['dense_bytes'])} | "
                     f"{fmt_bytes(t['single_bytes'])} | {fmt_bytes(t['dense_peak'])} | {fmt_bytes(t['single_peak'])} | "
                     f"{t['dense'] * 1e3:.1f} ms | {t['single'] * 1e3:.1f} ms | {t['dense'] / t['single']:.1f}x |")
    lines += [
        "",
        "**A small Llama, trained for real** (8 layers, hidden 256, intermediate 688, batch 8 x 64 tokens, "
        "MoS on all linear layers): the backward and its share spent in zero-fills and additions on "
        f"pool-shaped tensors, median of {steps} profiled steps, per layer (the base model called directly) "
        "and with one buffer (the MoSModel called).",
        "",
        "| config | pools | backward: per layer | zero-fills + sums: per layer | backward: one buffer | "
        "zero-fills + sums: one buffer |",
        "|---|---|---|---|---|---|",
    ]
    for per_layer, one in small:
        lines.append(f"| {one['config']} | {fmt_bytes(one['pools'])} | {per_layer['backward'] * 1e3:.1f} ms "
                     f"| {100 * per_layer['share']:.2f}% | {one['backward'] * 1e3:.1f} ms | {100 * one['share']:.2f}% |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps of the small Llama")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    rows_7b = [(config_label(c), measure_7b(c, args.runs)) for c in CONFIGS]
    small = [(small_llama_share(c, args.steps, per_layer=True), small_llama_share(c, args.steps, per_layer=False))
             for c in CONFIGS]
    text = render(rows_7b, small, args.runs, args.steps)
    print(text)
    if not args.no_write:
        from results_md import write_section

        print("wrote", write_section("bench_pool_grads", text))


if __name__ == "__main__":
    main()
