"""GPU timings for benchmarks/gpu_check.sh, each against a peer measured in the same run:

  assemble          gathering 32768 shards of 2048 bf16 values (256 MiB moved) vs a device-to-device
                    copy of the same bytes;
  MoSLinear         4 stacked d=4096 layers, forward + backward in bf16 (bf16 pools) vs PEFT LoRA at
                    the same forward rank, N in {16, 8192}, r in {16, 64};
  serving decode    one batched call, 256 rows of 256 distinct adapters (per-row strategy), bytes moved
                    vs the copy bandwidth; a skewed mix vs a batch of one adapter.

mos._C consumes one DLPack capsule per tensor per call; the capsules are made before each timed
window, so a window holds only the calls (several per CUDA-event pair) and their kernels. Prints one
markdown section shaped for benchmarks/RESULTS.md; --out also writes it to a file.
"""
import argparse
import datetime
import os
import statistics
import subprocess

import numpy as np
import torch
import torch.utils.dlpack

import mos
from mos import _C

MiB = 2**20


def capsule(tensor):
    """A DLPack capsule of a CUDA tensor, made ahead of the timed window (mos._C consumes one)."""
    return torch.utils.dlpack.to_dlpack(tensor)


def stream_handle():
    return torch.cuda.current_stream().cuda_stream or 1


def per_call_seconds(prepare, run, calls, repeats=15, warmup=2):
    """Median seconds per call: `calls` runs between one pair of CUDA events, their arguments
    prepared (prepare()) before the window opens."""
    for _ in range(warmup):
        run(*prepare())
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        batch = [prepare() for _ in range(calls)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for args in batch:
            run(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / calls)
    return statistics.median(times)


def no_args():
    return ()


# ---------------------------------------------------------------------------- assemble vs copy

def copy_bandwidth(nbytes):
    """Bytes read + written per second by a device-to-device copy of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = per_call_seconds(no_args, lambda: dst.copy_(src), calls=10)
    return 2 * nbytes / t


def assemble_vs_copy(rows, copy_bw):
    n_shards, n_index, shard_len = 65536, 32768, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    pool = torch.randn(n_shards, shard_len, device="cuda", dtype=torch.bfloat16, generator=gen)
    index = torch.randperm(n_shards, device="cuda", generator=gen)[:n_index].int()
    out = torch.empty(n_index, shard_len, device="cuda", dtype=torch.bfloat16)
    stream = stream_handle()
    t = per_call_seconds(lambda: (capsule(out), capsule(pool), capsule(index)),
                         lambda o, p, i: _C.assemble(o, p, i, stream), calls=10)
    assert torch.equal(out, pool[index.long()]), "assemble gathered the wrong rows"
    moved = 2 * out.numel() * out.element_size()
    bw = moved / t
    rows.append((f"assemble, bf16, {n_index} x {shard_len} shards ({moved // MiB} MiB moved)",
                 f"{bw / 1e9:.0f} GB/s", "D2D copy", f"{copy_bw / 1e9:.0f} GB/s",
                 f"{bw / copy_bw:.2f} of copy bandwidth"))
    return bw / copy_bw


# ---------------------------------------------------------------------------- MoSLinear vs LoRA

class Block(torch.nn.Module):
    """One projection per block, so the four `proj` layers share one MoS pool."""

    def __init__(self, d):
        super().__init__()
        self.proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.proj(x)


def stack(d):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block(d) for _ in range(4)]).cuda().to(torch.bfloat16)


def layer_vs_lora(rows, n_rows, rank):
    import peft

    from mos.torch import get_mos_model

    d = 4096
    lora = peft.get_peft_model(stack(d), peft.LoraConfig(r=rank, lora_alpha=16, target_modules=["proj"],
                                                         init_lora_weights=False))
    # R_e = r / 2: four layers sharing a pool need (r - p) l <= (R_e - p) L l public shards
    config = mos.MoSConfig(r=rank, equivalent_rank=rank // 2, shards_per_vector=4,
                           private_rank=1, target_modules=["proj"], layer_pattern=r"^(\d+)\.",
                           pool_dtype="bfloat16", init_lora_weights=False)
    mos_model = get_mos_model(stack(d), config)
    dtypes = {p.dtype for n, p in mos_model.named_parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}, f"MoS trainable parameters are {dtypes}, not bf16"
    x = torch.randn(n_rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(model):
        def run():
            model(x).float().sum().backward()
        return run

    t_lora, t_mos = [], []
    for _ in range(3):  # interleaved, so drift hits both alike
        t_lora.append(per_call_seconds(no_args, step(lora), calls=5, repeats=5, warmup=2))
        t_mos.append(per_call_seconds(no_args, step(mos_model), calls=5, repeats=5, warmup=2))
    tm, tl = statistics.median(t_mos), statistics.median(t_lora)
    rows.append((f"MoSLinear fwd+bwd, 4 layers d={d}, N={n_rows}, r={rank}, bf16",
                 f"{tm * 1e3:.3f} ms", f"PEFT LoRA r={rank}", f"{tl * 1e3:.3f} ms", f"{tm / tl:.3f}x LoRA"))
    return tm / tl


# ---------------------------------------------------------------------------- serving decode

class Adapters:
    """K MoS adapters of one d x d layer, packed as batched_forward takes them (bf16 pools)."""

    def __init__(self, k, d, rank, dtype=torch.bfloat16):
        pools_a, pools_b, index_a, index_b = [], [], [], []
        off_a = off_b = 0
        gen = torch.Generator().manual_seed(1)
        for a in range(k):
            config = mos.MoSConfig(r=rank, equivalent_rank=4, shards_per_vector=2, private_rank=1, seed=a)
            pool = mos.ShardPool("q", d, d, 8, config)
            ia, ib = pool.indices(a % 8)
            pools_a.append(torch.randn(pool.pool_a_shape, generator=gen) / d ** 0.5)
            pools_b.append(torch.randn(pool.pool_b_shape, generator=gen) / rank ** 0.5)
            index_a.append(torch.from_numpy(ia + off_a))
            index_b.append(torch.from_numpy(ib + off_b))
            off_a += pool.pool_a_shape[0]
            off_b += pool.pool_b_shape[0]
        self.pool_a = torch.cat(pools_a).to("cuda", dtype)
        self.pool_b = torch.cat(pools_b).to("cuda", dtype)
        self.index_a = torch.stack(index_a).int().cuda()
        self.index_b = torch.stack(index_b).int().cuda()
        self.scales = torch.full((k,), 2.0, dtype=torch.float32, device="cuda")
        self.k, self.d, self.rank = k, d, rank

    def seconds(self, ids):
        n = len(ids)
        x = torch.randn(n, self.d, device="cuda", dtype=self.pool_a.dtype)
        y = torch.zeros_like(x)
        ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int32)).cuda()
        ws = torch.empty(max(_C.batched_workspace_bytes(n, self.rank, 2), 256), dtype=torch.uint8,
                         device="cuda")
        stream = stream_handle()
        tensors = (y, x, self.pool_a, self.index_a, self.pool_b, self.index_b, self.scales, ids_t)

        def prepare():
            return tuple(capsule(t) for t in tensors) + (capsule(ws),)

        def run(*handles):
            _C.batched_forward(*handles[:8], workspace=handles[8], stream=stream)

        return per_call_seconds(prepare, run, calls=20)


def serving(rows, copy_bw):
    d, rank, n = 4096, 16, 256
    adapters = Adapters(n, d, rank)
    rng = np.random.default_rng(2)
    t_distinct = adapters.seconds(np.arange(n))
    zipf = 1.0 / np.arange(1, n + 1) ** 1.5
    t_skewed = adapters.seconds(rng.choice(n, size=n, p=zipf / zipf.sum()))
    t_single = adapters.seconds(np.zeros(n))
    elem = adapters.pool_a.element_size()
    moved = n * rank * 2 * d * elem + 3 * n * d * elem  # each row's A and B^T; x read, y read + written
    bw = moved / t_distinct
    rows.append((f"serving decode, {n} rows x {n} distinct adapters, d={d}, r={rank}, bf16 "
                 f"({moved / MiB:.0f} MiB moved)", f"{bw / 1e9:.0f} GB/s", "D2D copy",
                 f"{copy_bw / 1e9:.0f} GB/s", f"{bw / copy_bw:.2f} of copy bandwidth"))
    rows.append((f"serving, {n} rows, skewed mix (Zipf 1.5 over {n} adapters)", f"{t_skewed * 1e6:.1f} µs",
                 "one adapter for every row", f"{t_single * 1e6:.1f} µs", f"{t_skewed / t_single:.2f}x"))
    return bw / copy_bw, t_skewed / t_single


# ---------------------------------------------------------------------------- report

def commit():
    if os.environ.get("MOS_COMMIT"):
        return os.environ["MOS_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (set MOS_COMMIT)"


def verdict(ok):
    return "met" if ok else "missed"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the section to this file")
    parser.add_argument("--write", action="store_true", help="store the section in RESULTS.md")
    args = parser.parse_args()
    assert torch.cuda.is_available() and mos.build_info()["cuda"], "needs a GPU and a CUDA build of mos"
    props = torch.cuda.get_device_properties(0)
    rows, verdicts = [], []
    copy_bw = copy_bandwidth(128 * MiB)
    frac = assemble_vs_copy(rows, copy_bw)
    verdicts.append(f"assemble at >= 70% of D2D copy bandwidth: {100 * frac:.0f}%, {verdict(frac >= 0.7)}")
    for n_rows in (16, 8192):
        for rank in (16, 64):
            ratio = layer_vs_lora(rows, n_rows, rank)
            if n_rows == 8192:
                verdicts.append(f"MoSLinear fwd+bwd <= 1.05x PEFT LoRA at N=8192, r={rank}, bf16: "
                                f"{ratio:.3f}x, {verdict(ratio <= 1.05)}")
    frac, skew = serving(rows, copy_bw)
    verdicts.append(f"serving decode, distinct adapters, >= 60% of copy bandwidth: {100 * frac:.0f}%, "
                    f"{verdict(frac >= 0.6)}")
    verdicts.append(f"skewed mix within 1.2x of a single-adapter batch: {skew:.2f}x, {verdict(skew <= 1.2)}")
    lines = [f"## GPU ({props.name.replace('NVIDIA ', '')})", "",
             f"{datetime.date.today()}; {props.name}, {props.multi_processor_count} SMs, "
             f"sm_{props.major}{props.minor}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
             f"commit {commit()}. Command: `benchmarks/gpu_check.sh OUTDIR` "
             "(`python benchmarks/gpu_bench.py`). Medians of CUDA-event windows of several calls, "
             "DLPack capsules made before each window; every ratio is against the peer measured in "
             "the same run.", "",
             "| case | mos | peer | peer measured | mos vs peer |", "|---|---:|---|---:|---:|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", "Targets:", ""] + [f"- {v}" for v in verdicts]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.write:
        from results_md import write_section

        write_section("gpu", text)


if __name__ == "__main__":
    main()
