"""Serving many adapters at once: mos's batched forward vs PEFT LoRA mixed batches vs a loop.

Three ways to run a batch whose rows (samples) each use their own adapter, at the same forward
rank r (LoRA rank r for PEFT, MoS forward rank r at parameter budget R_e):

  mos batched   one call per layer: names -> ids, then mos._C.batched_forward over the whole batch
                (every row reads its adapter's shards, or rows of one adapter share one assembly);
                in the model, `MoSModel(..., adapter_names=[...])`.
  PEFT mixed    PEFT's own mixed-adapter batches: `PeftModel(..., adapter_names=[...])`, which loops
                over the adapters present in Python (index, two matmuls, index-add per adapter).
  MoS loop      the same MoS adapters without the batched op: a Python loop over the adapters
                present, one single-adapter mos call (mos.torch.adapter_linear) each.

Two measurements, each over K adapters, batch rows and Punica's four popularity mixes
(distinct: row i uses adapter i mod K; uniform: uniform random; skewed: Zipf-like, p(k) ~ k^-1.5;
identical: every row the same adapter):

  adapter path   one d x d linear layer, the adapter update alone (the base layer's matmul is
                 replaced by zeros on both sides, so only the adapter work is timed);
  whole layers   a LlamaModel (embeddings + decoder layers, no LM head) with adapters on all seven
                 linear types, one decode step (one token per sample): base model included.

plus the resident bytes per adapter, MoS (pools + index tables + its rows of the serving tables)
vs LoRA at the same forward rank. Medians of interleaved runs; ratios are from the same run.

    python benchmarks/bench_serving.py            # full grid (~8 minutes on 2 cores), writes RESULTS.md
    python benchmarks/bench_serving.py --quick    # smoke run, nothing written
    python benchmarks/bench_serving.py --device cuda   # the GPU section (see gpu_check.sh)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and OpenBLAS threads (default 1: idle pools spin on a small machine)")
    ap.add_argument("--dim", type=int, default=1024, help="d_in = d_out of the adapter-path layer")
    ap.add_argument("--rank", type=int, default=16, help="forward rank r (MoS and LoRA)")
    ap.add_argument("--equivalent-rank", type=int, default=4, help="MoS parameter budget R_e")
    ap.add_argument("--shards", type=int, default=2, help="MoS shards per vector l")
    ap.add_argument("--private-rank", type=int, default=1, help="MoS private rank p")
    ap.add_argument("--layers", type=int, default=8, help="layers sharing each pool (and decoder layers)")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64, 512], help="K values")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256], help="batch rows (samples)")
    ap.add_argument("--max-rows-at-512", type=int, default=256,
                    help="cap on rows for K = 512 cells (to bound the run time)")
    ap.add_argument("--mixes", nargs="+", default=["distinct", "uniform", "skewed", "identical"])
    ap.add_argument("--layer-adapters", type=int, nargs="+", default=[1, 8, 64],
                    help="K values of the whole-layer measurement (PEFT builds K LoRA copies of "
                         "every linear layer, so it stops at 64)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the whole-layer model")
    ap.add_argument("--runs", type=int, default=15, help="timed runs per cell (median)")
    ap.add_argument("--layer-runs", type=int, default=5, help="timed runs per whole-layer cell")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small grid, few runs, nothing written")
    ap.add_argument("--no-write", action="store_true", help="print the tables only")
    return ap.parse_args(argv)


ARGS = parse_args()
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(ARGS.threads))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mos  # noqa: E402
import mos.torch  # noqa: E402
from mos.torch import serving  # noqa: E402
from mos.torch import core_bridge  # noqa: E402

from results_md import cpu_name, write_section  # noqa: E402

MIX_NOTE = {"distinct": "row i -> adapter i mod K", "uniform": "uniform random",
            "skewed": "Zipf-like, p(k) ~ k^-1.5", "identical": "all rows one adapter"}


def adapter_names_for(mix, k, rows, rng):
    if mix == "distinct":
        ids = np.arange(rows) % k
    elif mix == "uniform":
        ids = rng.integers(0, k, rows)
    elif mix == "skewed":
        p = 1.0 / np.arange(1, k + 1) ** 1.5
        ids = rng.choice(k, size=rows, p=p / p.sum())
    elif mix == "identical":
        ids = np.full(rows, rng.integers(0, k))
    else:
        raise ValueError(f"unknown mix {mix!r}")
    return [f"a{i}" for i in ids]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, runs, warmup, device):
    """{name: median seconds}: the callables run in turn, the starting one rotating each round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times = {name: [] for name in names}
    for i in range(runs):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def mos_config(args, seed, **extra):
    return mos.MoSConfig(r=args.rank, equivalent_rank=args.equivalent_rank, shards_per_vector=args.shards,
                         private_rank=args.private_rank, lora_alpha=2.0 * args.rank, seed=seed,
                         init_lora_weights=False, **extra)


# ---------------------------------------------------------------------------- adapter path


class AdapterPath:
    """One d x d layer with K adapters, three ways; the base matmul replaced by zeros."""

    def __init__(self, args, k, device):
        from peft import LoraConfig, get_peft_model

        self.args, self.k, self.device, d = args, k, device, args.dim
        g = torch.Generator().manual_seed(k)
        # MoS: each adapter's own pools and layer-0 tables, then the packed layout of the store.
        self.own = []
        for a in range(k):
            config = mos_config(args, seed=a)
            pool = mos.ShardPool("q", d, d, args.layers, config)
            pa = (torch.randn(pool.pool_a_shape, generator=g) / d ** 0.5).to(device)
            pb = (torch.randn(pool.pool_b_shape, generator=g) / args.rank ** 0.5).to(device)
            ia, ib = (torch.from_numpy(t.copy()).to(device) for t in pool.indices(0))
            self.own.append((pa, ia, pb, ib, config.scaling))
        self.slots = {f"a{a}": a for a in range(k)}
        self.pool_a = torch.cat([o[0] for o in self.own])
        self.pool_b = torch.cat([o[2] for o in self.own])
        offsets = np.cumsum([0] + [o[0].shape[0] for o in self.own])
        self.index_a = torch.stack([o[1] + int(offsets[a]) for a, o in enumerate(self.own)]).int()
        self.index_b = torch.stack([o[3] + int(offsets[a]) for a, o in enumerate(self.own)]).int()
        self.scales = torch.tensor([o[4] for o in self.own], dtype=torch.float32, device=device)
        self.max_rank = args.rank
        # What the C core receives for the resident tensors, made once (as the serving layer does).
        self.handles = tuple(core_bridge.handle(t) for t in (self.pool_a, self.index_a, self.pool_b, self.index_b,
                                                  self.scales))
        # PEFT: K LoRA adapters of rank r on one nn.Linear, its base replaced by zeros.
        holder = nn.Sequential()
        holder.add_module("q", nn.Linear(d, d, bias=False))
        lora = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=["q"],
                          init_lora_weights=False)
        self.peft = get_peft_model(holder, lora, adapter_name="a0")
        for a in range(1, k):
            self.peft.add_adapter(f"a{a}", lora)
        self.peft.to(device).eval()
        self.lora_layer = self.peft.base_model.model.q
        self.lora_layer.base_layer.forward = lambda x: x.new_zeros(x.shape[:-1] + (d,))

    def mos_batched(self, x, names):
        slots = [self.slots[n] for n in names]
        ids, segments, grouped = serving.plan_rows(slots, 1, x.device)
        y = x.new_zeros((x.shape[0], self.args.dim))
        pool_a, index_a, pool_b, index_b, scales = self.handles
        core_bridge.batched_forward(y, x, pool_a, index_a, pool_b, index_b, scales, core_bridge.handle(ids),
                                    grouped=grouped, segments=core_bridge.handle(segments),
                                    max_rank=self.max_rank)
        return y

    def mos_loop(self, x, names):
        y = x.new_zeros((x.shape[0], self.args.dim))
        for name in set(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            pa, ia, pb, ib, scale = self.own[self.slots[name]]
            y.index_add_(0, rows, mos.torch.adapter_linear(x.index_select(0, rows), pa, ia, pb, ib, scale))
        return y

    def peft_mixed(self, x, names):
        return self.lora_layer(x, adapter_names=names)


def run_adapter_path(args, device):
    rng = np.random.default_rng(0)
    cells = []
    for k in args.adapters:
        bench = AdapterPath(args, k, device)
        for rows in args.rows:
            if k >= 512 and rows > args.max_rows_at_512:
                continue
            x = torch.randn(rows, args.dim, device=device)
            for mix in args.mixes:
                if mix == "distinct" and k == 1 and len(args.mixes) > 1:
                    continue  # identical to "identical" at K = 1
                names = adapter_names_for(mix, k, rows, rng)
                with torch.no_grad():
                    check = (bench.mos_batched(x, names) - bench.mos_loop(x, names)).abs().max().item()
                    scale = bench.mos_loop(x, names).abs().max().item()
                    assert check <= 1e-4 * max(scale, 1e-6), f"batched and loop disagree: {check} vs {scale}"
                    t = time_interleaved({"mos": lambda: bench.mos_batched(x, names),
                                          "peft": lambda: bench.peft_mixed(x, names),
                                          "loop": lambda: bench.mos_loop(x, names)},
                                         args.runs, args.warmup, device)
                cell = dict(k=k, rows=rows, mix=mix, unique=len(set(names)), **t)
                cells.append(cell)
                print(f"adapter path K={k:4d} rows={rows:4d} {mix:9s} unique={cell['unique']:4d}  "
                      f"mos {fmt_time(t['mos']):>10}  PEFT {fmt_time(t['peft']):>10} "
                      f"({t['peft'] / t['mos']:6.1f}x)  loop {fmt_time(t['loop']):>10} "
                      f"({t['loop'] / t['mos']:6.1f}x)", flush=True)
        del bench
    return cells


# ---------------------------------------------------------------------------- whole layers


def llama_config(args):
    from transformers import LlamaConfig

    h = args.hidden
    return LlamaConfig(vocab_size=1024, hidden_size=h, intermediate_size=int(h * 2.75) // 64 * 64,
                       num_hidden_layers=args.layers, num_attention_heads=max(h // 64, 1),
                       num_key_value_heads=max(h // 128, 1), max_position_embeddings=256)


def build_models(args, k, device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaModel

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = LlamaModel(llama_config(args)).eval()
    state = {key: v.clone() for key, v in base.state_dict().items()}
    model = mos.torch.get_mos_model(base, mos_config(args, 0, target_modules=targets), adapter_name="a0")
    for a in range(1, k):
        model.add_adapter(f"a{a}", mos_config(args, a, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.mos_pools.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.to(device).eval()
    plain = LlamaModel(llama_config(args))
    plain.load_state_dict(state)
    lora = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=targets,
                      init_lora_weights=False)
    peft_model = get_peft_model(plain, lora, adapter_name="a0")
    for a in range(1, k):
        peft_model.add_adapter(f"a{a}", lora)
    peft_model.to(device).eval()
    return model, peft_model


def run_layers(args, device):
    rng = np.random.default_rng(1)
    cells, memory = [], None
    for k in args.layer_adapters:
        model, peft_model = build_models(args, k, device)
        store = model.adapter_store
        store.refresh()
        if memory is None or k == max(args.layer_adapters):
            resident = store.resident_bytes()
            lora_bytes = {}
            for name, p in peft_model.named_parameters():
                for a in range(k):
                    if f".a{a}." in name:
                        lora_bytes[f"a{a}"] = lora_bytes.get(f"a{a}", 0) + p.numel() * p.element_size()
            pools = sum(p.numel() * p.element_size() for p in model.mos_pools["a0"].parameters())
            memory = dict(k=k, mos=statistics.median(resident.values()), pools=pools,
                          lora=statistics.median(lora_bytes.values()), total=store.total_bytes(),
                          lora_total=sum(lora_bytes.values()))
        for rows in args.rows:
            ids = torch.randint(0, 1024, (rows, 1), device=device)
            for mix in args.mixes:
                if mix == "distinct" and k == 1 and len(args.mixes) > 1:
                    continue
                names = adapter_names_for(mix, k, rows, rng)
                with torch.no_grad():
                    t = time_interleaved({"mos": lambda: model(ids, adapter_names=names),
                                          "peft": lambda: peft_model(input_ids=ids, adapter_names=names),
                                          "base": lambda: peft_model.get_base_model()(input_ids=ids)},
                                         args.layer_runs, 1, device)
                cell = dict(k=k, rows=rows, mix=mix, **t)
                cells.append(cell)
                print(f"whole layers K={k:3d} rows={rows:4d} {mix:9s}  mos {fmt_time(t['mos']):>10}  "
                      f"PEFT {fmt_time(t['peft']):>10} ({t['peft'] / t['mos']:5.2f}x)  "
                      f"base {fmt_time(t['base']):>10}", flush=True)
        del model, peft_model
    return cells, memory


# ---------------------------------------------------------------------------- GPU extras


def run_gpu_extras(args):
    """Distinct-adapter decode against measured copy bandwidth; skewed vs a single adapter."""
    out = {}
    n = 256 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, 20, 3, "cuda")["copy"]
    out["copy_gbs"] = 2 * n / t / 1e9
    d, r, rows = 4096, args.rank, 64
    sub = argparse.Namespace(**{**vars(args), "dim": d})
    bench = AdapterPath(sub, rows, "cuda")
    x = torch.randn(rows, d, device="cuda")
    rng = np.random.default_rng(2)
    names = {m: adapter_names_for(m, rows, rows, rng) for m in ("distinct", "skewed", "identical")}
    with torch.no_grad():
        t = time_interleaved({m: (lambda m=m: bench.mos_batched(x, names[m])) for m in names}, 50, 5, "cuda")
    moved = rows * r * 2 * d * 4 + 2 * rows * d * 4  # each row's A and B once, x read, y written
    out.update(dict(d=d, rank=r, rows=rows, distinct=t["distinct"], skewed=t["skewed"],
                    identical=t["identical"], distinct_gbs=moved / t["distinct"] / 1e9))
    return out


# ---------------------------------------------------------------------------- report


def machine(args, device):
    cpu = cpu_name()
    import peft
    import transformers

    text = (f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, PEFT {peft.__version__}, "
            f"transformers {transformers.__version__}; `mos.build_info()` = `{mos.build_info()}`; "
            f"{args.threads} thread(s) for torch and for mos's OpenBLAS")
    if device == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name()}"
    return text


def render(args, device, path_cells, layer_cells, memory, gpu):
    cmd = "python " + " ".join(["benchmarks/bench_serving.py"] + sys.argv[1:])
    d, r, re_, l, p = args.dim, args.rank, args.equivalent_rank, args.shards, args.private_rank
    lines = [f"## Serving many adapters at once ({device.upper()}, float32)", "",
             f"Command: `{cmd}`", "", f"Machine: {machine(args, device)}.", "",
             f"Adapters: MoS r={r}, R_e={re_}, l={l}, p={p} (pools shared by {args.layers} layers) "
             f"vs PEFT LoRA r={r}: the same forward rank. Mixes: "
             + "; ".join(f"{m}: {MIX_NOTE[m]}" for m in args.mixes) + ". "
             f"Median of {args.runs} (adapter path) / {args.layer_runs} (whole layers) runs, the "
             "methods interleaved run by run; ratios come from the same run. 'PEFT / mos' and "
             "'loop / mos' are throughput ratios of mos's batched path (higher is better for mos).",
             "", f"### Adapter path alone (one {d} x {d} layer, base matmul replaced by zeros)", "",
             "| K | rows | mix | adapters in batch | mos batched | PEFT mixed | MoS loop | PEFT / mos | loop / mos |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in path_cells:
        lines.append(f"| {c['k']} | {c['rows']} | {c['mix']} | {c['unique']} | {fmt_time(c['mos'])} | "
                     f"{fmt_time(c['peft'])} | {fmt_time(c['loop'])} | {c['peft'] / c['mos']:.1f}x | "
                     f"{c['loop'] / c['mos']:.1f}x |")
    capped = [k for k in args.adapters if k >= 512 and any(rw > args.max_rows_at_512 for rw in args.rows)]
    if capped:
        lines += ["", f"K = 512 cells stop at {args.max_rows_at_512} rows to bound the run time."]
    if layer_cells:
        cfg = llama_config(args)
        lines += ["", f"### Whole transformer layers (LlamaModel, {cfg.num_hidden_layers} decoder layers, "
                  f"hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, adapters on all "
                  "seven linear types; one decode step, one token per sample)", "",
                  "Base model included in every time; 'base' is the model without adapters. K stops at "
                  f"{max(args.layer_adapters)} because PEFT keeps K LoRA copies of all "
                  f"{7 * cfg.num_hidden_layers} linear layers.", "",
                  "| K | rows | mix | base alone | mos mixed | PEFT mixed | PEFT / mos |",
                  "|---:|---:|---|---:|---:|---:|---:|"]
        for c in layer_cells:
            lines.append(f"| {c['k']} | {c['rows']} | {c['mix']} | {fmt_time(c['base'])} | "
                         f"{fmt_time(c['mos'])} | {fmt_time(c['peft'])} | {c['peft'] / c['mos']:.2f}x |")
    if memory:
        ratio = memory["mos"] / memory["lora"]
        lines += ["", f"### Resident bytes per adapter (the whole-layer model, K = {memory['k']})", "",
                  "| | per adapter | of which pools | all K adapters |", "|---|---:|---:|---:|",
                  f"| MoS (pools, index tables, rows of the serving tables) | {fmt_bytes(memory['mos'])} | "
                  f"{fmt_bytes(memory['pools'])} | {fmt_bytes(memory['total'])} |",
                  f"| LoRA r={r} (PEFT) | {fmt_bytes(memory['lora'])} | {fmt_bytes(memory['lora'])} | "
                  f"{fmt_bytes(memory['lora_total'])} |",
                  "", f"MoS / LoRA: {ratio:.4f} per adapter (pools alone: "
                  f"{memory['pools'] / memory['lora']:.4f} = R_e / r = {re_ / r:.4f}); the index tables "
                  "add the rest."]
    if gpu:
        lines += ["", f"### GPU decode (d = {gpu['d']}, r = {gpu['rank']}, {gpu['rows']} rows)", "",
                  f"Measured device copy bandwidth: {gpu['copy_gbs']:.0f} GB/s. Distinct adapters: "
                  f"{fmt_time(gpu['distinct'])}, {gpu['distinct_gbs']:.0f} GB/s of adapter and activation "
                  f"traffic ({100 * gpu['distinct_gbs'] / gpu['copy_gbs']:.0f}% of copy bandwidth; target "
                  f">= 60%). Skewed: {fmt_time(gpu['skewed'])}, {gpu['skewed'] / gpu['identical']:.2f}x a "
                  "single-adapter batch (target <= 1.2x)."]
    lines += ["", targets(args, path_cells, memory, gpu)]
    return "\n".join(lines)


def targets(args, path_cells, memory, gpu):
    out = []
    at64 = [c for c in path_cells if c["k"] == 64 and c["mix"] == "distinct"]
    full = [c for c in at64 if c["unique"] == 64]  # batches that hold all 64 adapters
    if full:
        worst = min(c["peft"] / c["mos"] for c in full)
        others = ", ".join(f"{c['peft'] / c['mos']:.1f}x with {c['unique']} adapter(s) in a batch of "
                           f"{c['rows']}" for c in at64 if c["unique"] < 64)
        out.append(f"Target: >= 3x PEFT's mixed-batch throughput on the adapter path at K = 64 distinct "
                   f"(a batch holding all 64 adapters): {worst:.1f}x, {'met' if worst >= 3 else 'missed'}"
                   + (f" (smaller batches of the same mix: {others})." if others else "."))
    if memory:
        ratio, bound = memory["mos"] / memory["lora"], args.equivalent_rank / args.rank
        verdict = "met" if ratio <= bound else \
            f"missed by the index tables ({100 * (ratio - bound) / bound:.1f}% over; the pools alone are exactly R_e / r)"
        out.append(f"Target: resident bytes per adapter <= R_e / r = {bound:.4f} of LoRA's: {ratio:.4f}, {verdict}.")
    if gpu:
        frac = gpu["distinct_gbs"] / gpu["copy_gbs"]
        out.append(f"GPU targets: distinct decode at {100 * frac:.0f}% of copy bandwidth "
                   f"({'met' if frac >= 0.6 else 'missed'}); skewed {gpu['skewed'] / gpu['identical']:.2f}x a "
                   f"single adapter ({'met' if gpu['skewed'] <= 1.2 * gpu['identical'] else 'missed'}).")
    return " ".join(out)


def main():
    args, device = ARGS, ARGS.device
    if args.quick:
        args.adapters, args.rows, args.layer_adapters = [1, 8], [1, 16], [1, 8]
        args.runs, args.layer_runs, args.warmup, args.layers, args.hidden = 3, 2, 1, 6, 256
    torch.set_num_threads(args.threads)
    mos.set_num_threads(args.threads)
    if device == "cuda" and not (torch.cuda.is_available() and mos.build_info()["cuda"]):
        sys.exit("--device cuda needs a CUDA build of mos and a visible GPU")
    start = time.perf_counter()
    path_cells = run_adapter_path(args, device)
    layer_cells, memory = run_layers(args, device) if device == "cpu" else ([], None)
    gpu = run_gpu_extras(args) if device == "cuda" else None
    table = render(args, device, path_cells, layer_cells, memory, gpu)
    print()
    print(table)
    print(f"\n(run took {time.perf_counter() - start:.0f} s)")
    if not (args.quick or args.no_write):
        name = "bench_serving" if device == "cpu" else "bench_serving_gpu"
        print(f"wrote section '{name}' of {write_section(name, table)}")


if __name__ == "__main__":
    main()
