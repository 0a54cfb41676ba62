"""MoSLinear (mos.torch over the C core) against PEFT's LoRA Linear and a pure-torch MoS, on CPU.

Three adapters at the same forward rank r on a frozen nn.Linear(d, d), float32:

  MoSLinear   mos.torch: one autograd Function calling mos._C through DLPack
  PEFT LoRA   peft.tuners.lora.Linear with its own per-layer A and B
  torch MoS   MoS written the way the paper's reference code does it: every forward gathers the
              layer's shards from the shared pools with index_select, concatenates them into A and
              B with torch.cat, and runs two matmuls; autograd differentiates through the gather

Each is timed twice: as a whole layer (the frozen d x d matmul included: what a user sees), and
"adapter only", with the base matmul replaced by a stub returning zeros, which isolates what the
adapter adds (at N = 1 this is the per-call overhead). Both MoS variants use pools sized like one
module type of a 32-layer model, and calls walk the 32 layers' index tables (PEFT: 32 layers'
A and B) as a training step does. Then one full training step (forward, backward, AdamW) of the
small Llama that `python -m mos demo` uses, with each adapter on every linear layer.

All methods run interleaved call by call in one process and the tables report medians, so load
from elsewhere on the machine hits them alike; compare ratios, not absolute times.

    python benchmarks/bench_torch.py            # writes its section of RESULTS.md
    python benchmarks/bench_torch.py --quick    # smoke run, writes nothing
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch and for mos's OpenBLAS (default 1: on a small shared "
                         "machine, two spinning thread pools oversubscribe the cores)")
    ap.add_argument("--dim", type=int, default=4096, help="d_in = d_out of the layer")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2048], help="N values")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32], help="forward ranks r")
    ap.add_argument("--shards", type=int, default=2, help="MoS shards per vector l")
    ap.add_argument("--layers", type=int, default=32, help="layers sharing each pool")
    ap.add_argument("--equivalent-rank", type=int, default=2)
    ap.add_argument("--private-rank", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30, help="timed calls, adapter-only cells")
    ap.add_argument("--layer-runs", type=int, default=20, help="timed calls, whole-layer cells, N <= 64")
    ap.add_argument("--big-layer-runs", type=int, default=5,
                    help="timed calls, whole-layer cells with N > 64 (each call costs seconds)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per method and cell")
    ap.add_argument("--llama-steps", type=int, default=15, help="timed training steps per method")
    ap.add_argument("--quick", action="store_true", help="tiny grid and few runs; writes nothing")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args(argv)


ARGS = parse_args()
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
os.environ["OPENBLAS_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mos  # noqa: E402
from results_md import write_section  # noqa: E402

METHODS = ("MoSLinear", "PEFT LoRA", "torch MoS")


# ---------------------------------------------------------------------------- pure-torch MoS

class TorchPools(nn.Module):
    """One module type's pools as plain Parameters, plus its index tables (same as mos.ShardPool's)."""

    def __init__(self, shard_pool: mos.ShardPool, pool_a, pool_b):
        super().__init__()
        self.r, self.l = shard_pool.rank, shard_pool.shards_per_vector
        self.pool_a = nn.Parameter(pool_a.clone())
        self.pool_b = nn.Parameter(pool_b.clone())
        ta, tb = shard_pool.index_tables()
        self.register_buffer("index_a", torch.from_numpy(np.asarray(ta, dtype=np.int64)))
        self.register_buffer("index_b", torch.from_numpy(np.asarray(tb, dtype=np.int64)))


class TorchMoSLinear(nn.Module):
    """y = base(x) + s (x A^T) B^T with A, B gathered from shared pools on every forward."""

    def __init__(self, base_layer: nn.Linear, pools: TorchPools, position: int, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        self.position = position
        object.__setattr__(self, "pools", pools)  # shared: not registered per layer

    def _gather(self, pool, index):
        shards = pool.index_select(0, index[self.position])          # (r*l, shard_len)
        l = self.pools.l
        return torch.cat([shards[t::l] for t in range(l)], dim=1)    # (r, l*shard_len)

    def forward(self, x):
        result = self.base_layer(x)
        a = self._gather(self.pools.pool_a, self.pools.index_a)      # A   (r, d_in)
        bt = self._gather(self.pools.pool_b, self.pools.index_b)     # B^T (r, d_out)
        return result + (x @ a.T) @ bt * self.scaling


def inject_torch_mos(model, config: mos.MoSConfig):
    """Replaces every nn.Linear but lm_head with TorchMoSLinear: one pool pair per module type
    (attribute name), layers ordered by the index in their path, as mos.torch does."""
    import re

    by_type = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and not path.endswith("lm_head"):
            layer = int(re.search(r"\.(\d+)\.", path).group(1))
            by_type.setdefault(path.rsplit(".", 1)[-1], []).append((layer, path, module))
    pools = nn.ModuleDict()
    for module_type, sites in by_type.items():
        sites.sort(key=lambda s: s[0])
        d_in, d_out = sites[0][2].in_features, sites[0][2].out_features
        shard_pool = mos.ShardPool(module_type, d_in, d_out, len(sites), config)
        a, b = (torch.from_numpy(v) for v in shard_pool.init_values(np.float32))
        pools[module_type] = TorchPools(shard_pool, a, b)
        for position, (_, path, linear) in enumerate(sites):
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr,
                    TorchMoSLinear(linear, pools[module_type], position, config.scaling))
    for p in model.parameters():
        p.requires_grad_(False)
    model.mos_torch_pools = pools
    for p in pools.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------- one layer

class StubLinear(nn.Linear):
    """An nn.Linear whose forward costs (almost) nothing: isolates what an adapter adds."""

    def forward(self, x):
        return x.new_zeros(x.shape[:-1] + (self.out_features,))


def make_layers(kind, base, r, args, rng_seed=0):
    """{method: list of `args.layers` adapted layers sharing `base`}."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear
    from mos.torch import MoSLinear, SharedPools

    d = base.in_features
    cfg = mos.MoSConfig(r=r, equivalent_rank=args.equivalent_rank, shards_per_vector=args.shards,
                        private_rank=args.private_rank, lora_alpha=16.0)
    shard_pool = mos.ShardPool("q_proj", d, d, args.layers, cfg)
    gen = torch.Generator().manual_seed(rng_seed)
    pool_a = torch.randn(shard_pool.pool_a_shape, generator=gen) * 0.01
    pool_b = torch.randn(shard_pool.pool_b_shape, generator=gen) * 0.01
    shared = SharedPools(shard_pool, values=(pool_a, pool_b))
    torch_pools = TorchPools(shard_pool, pool_a, pool_b)
    lcfg = LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0)
    out = {"MoSLinear": [], "PEFT LoRA": [], "torch MoS": []}
    for k in range(args.layers):
        m = MoSLinear(base, "q_proj")
        m.add_adapter("default", shared, position=k, scaling=cfg.scaling, dropout=0.0)
        m.active_adapter = "default"
        out["MoSLinear"].append(m)
        p = LoraLinear(base, "default", config=lcfg, r=r, lora_alpha=16)
        with torch.no_grad():
            p.lora_B["default"].weight.normal_(0, 0.01, generator=gen)
        out["PEFT LoRA"].append(p)
        out["torch MoS"].append(TorchMoSLinear(base, torch_pools, k, cfg.scaling))
    params = {"MoSLinear": list(shared.parameters()),
              "PEFT LoRA": [q for p in out["PEFT LoRA"] for n, q in p.named_parameters() if "lora_" in n],
              "torch MoS": list(torch_pools.parameters())}
    base.weight.requires_grad_(False)
    # Sanity: both MoS implementations compute the same layer.
    x = torch.randn(3, d, generator=gen)
    with torch.no_grad():
        ref, got = out["torch MoS"][5](x), out["MoSLinear"][5](x)
    err = (ref - got).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    if err > 1e-4:
        raise AssertionError(f"MoSLinear and torch MoS disagree ({kind}, r={r}): {err:.2e}")
    return out, params


def time_layers(layers, params, n, d, runs, warmup):
    """{(method, phase): median seconds}; methods interleaved call by call, order alternating."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen).requires_grad_(True)
    dy = torch.randn(n, d, generator=gen)
    names = list(layers)
    samples = {(m, ph): [] for m in names for ph in ("fwd", "fwd+bwd")}
    n_layers = len(layers[names[0]])
    step = 0
    for i in range(warmup + runs):
        order = names if i % 2 == 0 else names[::-1]
        for phase in ("fwd", "fwd+bwd"):
            k = step % n_layers
            step += 1
            for m in order:
                layer = layers[m][k]
                for p in params[m]:
                    p.grad = None
                x.grad = None
                t0 = time.perf_counter()
                y = layer(x)
                if phase == "fwd+bwd":
                    y.backward(dy)
                dt = time.perf_counter() - t0
                del y
                if i >= warmup:
                    samples[(m, phase)].append(dt)
    return {key: statistics.median(v) for key, v in samples.items()}


# ---------------------------------------------------------------------------- small Llama

def llama_models(args):
    from peft import LoraConfig, get_peft_model
    from mos.demo import ByteTokenizer, build_base_model

    margs = SimpleNamespace(layers=8, hidden=128, seq_len=64, seed=0)
    base = build_base_model(margs, ByteTokenizer())
    cfg = mos.MoSConfig(r=8, equivalent_rank=2, shards_per_vector=2, private_rank=1, lora_alpha=16.0,
                        target_modules="all-linear")
    import copy

    models = {
        "MoSLinear": mos.get_mos_model(copy.deepcopy(base), cfg),
        "PEFT LoRA": get_peft_model(copy.deepcopy(base),
                                    LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")),
        "torch MoS": inject_torch_mos(copy.deepcopy(base), cfg),
    }
    return models, margs, cfg


def time_llama(args):
    models, margs, cfg = llama_models(args)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (16, margs.seq_len), generator=gen)
    opts = {}
    for m, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opts[m] = (params, torch.optim.AdamW(params, lr=1e-3))
    samples = {m: [] for m in models}
    names = list(models)
    for i in range(2 + args.llama_steps):
        for m in (names if i % 2 == 0 else names[::-1]):
            params, opt = opts[m]
            t0 = time.perf_counter()
            loss = models[m](input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if i >= 2:
                samples[m].append(dt)
    trainable = {m: sum(p.numel() for p in opts[m][0]) for m in models}
    return {m: statistics.median(v) for m, v in samples.items()}, trainable, margs


# ---------------------------------------------------------------------------- report

def fmt(s):
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def machine():
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import peft
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread(s)), peft {peft.__version__}, transformers "
            f"{transformers.__version__}; `mos.build_info()` = `{mos.build_info()}`")


def main():
    args = ARGS
    if args.quick:
        args.rows, args.ranks, args.dim = [1, 64], [8], 1024
        args.runs, args.layer_runs, args.big_layer_runs, args.warmup, args.llama_steps = 5, 3, 2, 1, 3
    torch.set_num_threads(args.threads)
    mos.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.dim
    real_base = nn.Linear(d, d, bias=False)
    stub_base = StubLinear(d, d, bias=False)
    cells = []
    for r in args.ranks:
        for kind, base in (("adapter only", stub_base), ("whole layer", real_base)):
            layers, params = make_layers(kind, base, r, args)
            for n in args.rows:
                runs = args.runs if kind == "adapter only" else (
                    args.layer_runs if n <= 64 else args.big_layer_runs)
                t = time_layers(layers, params, n, d, runs, args.warmup)
                cells.append((kind, n, r, runs, t))
                print(f"{kind:>12} N={n:5d} r={r:3d}: " + "  ".join(
                    f"{m} {fmt(t[m, 'fwd'])}/{fmt(t[m, 'fwd+bwd'])}" for m in METHODS), flush=True)
            del layers, params
    llama, trainable, margs = time_llama(args)
    print("llama step: " + "  ".join(f"{m} {fmt(v)}" for m, v in llama.items()), flush=True)
    table = render(cells, llama, trainable, margs, args)
    print()
    print(table)
    if not (args.quick or args.no_write):
        print(f"\nwrote section 'bench_torch' of {write_section('bench_torch', table)}")


def render(cells, llama, trainable, margs, args):
    cmd = "python " + " ".join(["benchmarks/bench_torch.py"] + sys.argv[1:])
    lines = [
        "## mos.torch MoSLinear vs PEFT LoRA vs pure-torch MoS (CPU, float32)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {machine()}.",
        "",
        f"One adapted nn.Linear({args.dim}, {args.dim}) (frozen), forward rank r for all three. "
        f"MoS: l = {args.shards}, equivalent_rank {args.equivalent_rank}, private_rank "
        f"{args.private_rank}, pools shared by {args.layers} layers; calls walk the {args.layers} "
        "layers. *torch MoS* gathers A and B with `index_select` + `torch.cat` on every forward and "
        "lets autograd differentiate the gather (the paper's reference implementation). *adapter "
        "only*: the base matmul is replaced by a stub returning zeros, so the time is what the "
        "adapter adds (at N = 1, its per-call overhead). fwd+bwd computes dx and the adapter's "
        "parameter gradients. Medians; the three methods run interleaved call by call, alternating "
        "order, on a 2-core machine shared with other work, so read the ratios.",
        "",
        "| part | N | r | runs | MoSLinear fwd | PEFT LoRA fwd | torch MoS fwd | MoSLinear fwd+bwd | "
        "PEFT LoRA fwd+bwd | torch MoS fwd+bwd | fwd+bwd MoS/PEFT | fwd+bwd MoS/torch MoS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, n, r, runs, t in cells:
        fb = {m: t[m, "fwd+bwd"] for m in METHODS}
        lines.append(
            f"| {kind} | {n} | {r} | {runs} | {fmt(t['MoSLinear', 'fwd'])} | {fmt(t['PEFT LoRA', 'fwd'])} | "
            f"{fmt(t['torch MoS', 'fwd'])} | {fmt(fb['MoSLinear'])} | {fmt(fb['PEFT LoRA'])} | "
            f"{fmt(fb['torch MoS'])} | {fb['MoSLinear'] / fb['PEFT LoRA']:.2f}x | "
            f"{fb['MoSLinear'] / fb['torch MoS']:.2f}x |")
    lines += [
        "",
        f"One training step (forward, backward, AdamW) of the demo's LlamaForCausalLM "
        f"({margs.layers} layers, hidden {margs.hidden}, batch 16 x {margs.seq_len} tokens), adapters "
        "on every linear layer but the head at forward rank 8 (MoS: equivalent_rank 2, l = 2, "
        f"private_rank 1); median of {args.llama_steps} interleaved steps after 2 warm-up steps:",
        "",
        "| method | trainable params | step | vs PEFT LoRA |",
        "|---|---:|---:|---:|",
    ]
    for m in METHODS:
        lines.append(f"| {m} | {trainable[m]:,} | {fmt(llama[m])} | {llama[m] / llama['PEFT LoRA']:.2f}x |")
    lines += ["", verdicts(cells),
              "",
              "In the whole-layer rows the frozen d x d matmul (forward, and dx in the backward) is "
              "most of the time, so their ratios sit near 1 whatever the adapter costs; the "
              "adapter-only rows show the adapters' own difference."]
    return "\n".join(lines)


def verdicts(cells):
    """The three targets, judged on the adapter-only cells (and reported for whole layers)."""
    out = []
    big = max(n for _, n, _, _, _ in cells)
    for kind in ("adapter only", "whole layer"):
        sel = [(n, r, t) for k, n, r, _, t in cells if k == kind]
        vs_peft = [t["MoSLinear", "fwd+bwd"] / t["PEFT LoRA", "fwd+bwd"] for n, r, t in sel if n == big]
        vs_torch = [t["MoSLinear", "fwd+bwd"] / t["torch MoS", "fwd+bwd"] for n, r, t in sel if n == big]
        if vs_peft:
            out.append(f"{kind}, N = {big}: fwd+bwd MoS/PEFT worst {max(vs_peft):.2f}x (target <= 1.0x: "
                       f"{'met' if max(vs_peft) <= 1.0 else 'missed'}), MoS/torch MoS worst "
                       f"{max(vs_torch):.2f}x (target <= 0.8x: {'met' if max(vs_torch) <= 0.8 else 'missed'}).")
    one = [t for k, n, r, _, t in cells if k == "adapter only" and n == 1]
    if one:
        worst = max(max(t["MoSLinear", ph] / t["PEFT LoRA", ph] for ph in ("fwd", "fwd+bwd")) for t in one)
        out.append(f"Per-call overhead at N = 1 (adapter only), MoS/PEFT worst of fwd and fwd+bwd: "
                   f"{worst:.2f}x (target <= 1.5x: {'met' if worst <= 1.5 else 'missed'}).")
    return " ".join(out)


if __name__ == "__main__":
    main()
