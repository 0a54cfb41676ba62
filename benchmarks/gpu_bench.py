"""GPU timings for benchmarks/gpu_check.sh: assemble bandwidth vs a device-to-device copy, and
MoSLinear forward+backward vs PEFT LoRA at equal rank (bf16, d = 4096). Medians of CUDA-event
timings; prints one markdown table and, with --write, stores it in benchmarks/RESULTS.md."""
import argparse
import datetime
import statistics

import torch

import mos
from mos import _C


def cuda_time(fn, repeats=50, warmup=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def assemble_vs_copy(rows):
    """Bandwidth of gathering r*l shards of a large pool vs copying the same bytes."""
    config = mos.MoSConfig(r=64, equivalent_rank=16, shards_per_vector=4, private_rank=1)
    pool = mos.ShardPool("q", 4096, 4096, 32, config)
    pool_a = torch.randn(pool.pool_a_shape, device="cuda", dtype=torch.bfloat16)
    index = torch.from_numpy(pool.indices(5)[0].copy()).cuda()
    out = torch.empty(len(index), pool.shard_len_a, device="cuda", dtype=torch.bfloat16)
    src = torch.empty_like(out)
    stream = torch.cuda.current_stream().cuda_stream or 1
    t_gather = cuda_time(lambda: _C.assemble(out, pool_a, index, stream))
    t_copy = cuda_time(lambda: out.copy_(src))
    nbytes = 2 * out.numel() * out.element_size()  # read + write
    rows.append(("assemble (r=64, l=4, bf16)", f"{nbytes / t_gather / 1e9:.0f} GB/s",
                 f"copy {nbytes / t_copy / 1e9:.0f} GB/s", f"{t_copy / t_gather:.2f} of copy bw"))


class Block(torch.nn.Module):
    """One projection per block, so the four `proj` layers share one MoS pool."""

    def __init__(self, d):
        super().__init__()
        self.proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.proj(x)


def stack(d):
    return torch.nn.Sequential(*[Block(d) for _ in range(4)]).cuda().to(torch.bfloat16)


def layer_vs_lora(rows, n_rows, rank):
    import peft

    from mos.torch import get_mos_model

    d = 4096
    torch.manual_seed(0)
    lora = peft.get_peft_model(stack(d), peft.LoraConfig(r=rank, lora_alpha=16, target_modules=["proj"],
                                                         init_lora_weights=False))
    moscfg = mos.MoSConfig(r=rank, equivalent_rank=max(rank // 8, 1), shards_per_vector=4, private_rank=1,
                           target_modules=["proj"], layer_pattern=r"^(\d+)\.")
    mos_model = get_mos_model(stack(d), moscfg)
    x = torch.randn(n_rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(model):
        def run():
            model(x).float().sum().backward()
        return run

    t_lora = cuda_time(step(lora), repeats=20, warmup=5)
    t_mos = cuda_time(step(mos_model), repeats=20, warmup=5)
    rows.append((f"4 layers fwd+bwd N={n_rows} r={rank} bf16", f"mos {t_mos * 1e3:.3f} ms",
                 f"LoRA {t_lora * 1e3:.3f} ms", f"{t_mos / t_lora:.2f}x LoRA"))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="store the table in RESULTS.md")
    args = parser.parse_args()
    rows = []
    assemble_vs_copy(rows)
    for n_rows in (16, 8192):
        for rank in (16, 64):
            layer_vs_lora(rows, n_rows, rank)
    table = ["| case | mos | peer | ratio |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = (f"Device: {torch.cuda.get_device_name()}, {datetime.date.today()}; "
            f"command: `benchmarks/gpu_check.sh --write`\n\n" + "\n".join(table))
    print(text)
    if args.write:
        from results_md import write_section

        write_section("gpu", text)


if __name__ == "__main__":
    main()
