"""Bytes of trainable weights, gradients, AdamW state and adapter file: LoRA vs MoS at LLaMA2-7B scale.

Computed from shapes only (mos.budget over mos.ShardPool): no weights are allocated, so this runs in
well under a second anywhere. Settings are the paper's: LLaMA2-7B (32 layers, hidden 4096,
intermediate 11008), adapters on q, k, v, o, gate, up, down, fp32 adapter weights, AdamW with two fp32
moments per trainable parameter.

    python benchmarks/bench_memory.py              # prints the table, updates RESULTS.md
    python benchmarks/bench_memory.py --no-write   # prints only
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mos import MoSConfig  # noqa: E402
from mos.budget import Budget, llama_module_types, lora_budget, mos_budget  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)


def llama2_7b_types():
    """The seven adapted module types of LLaMA2-7B."""
    return llama_module_types(**LLAMA2_7B)


def mos_config(equivalent_rank: int, r: int, shards_per_vector: int, private_rank: int) -> MoSConfig:
    return MoSConfig(r=r, equivalent_rank=equivalent_rank, shards_per_vector=shards_per_vector,
                     private_rank=private_rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])


def rows() -> list[Budget]:
    """The paper's LoRA baselines and MoS at its two budgets (4.997M and 19.99M parameters)."""
    types = llama2_7b_types()
    return [
        lora_budget(types, 2),
        mos_budget(types, mos_config(2, r=8, shards_per_vector=2, private_rank=1)),
        mos_budget(types, mos_config(2, r=16, shards_per_vector=4, private_rank=1)),
        lora_budget(types, 8),
        mos_budget(types, mos_config(8, r=16, shards_per_vector=4, private_rank=2)),
        mos_budget(types, mos_config(8, r=32, shards_per_vector=4, private_rank=2)),
        lora_budget(types, 16),
        lora_budget(types, 64),
    ]


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _ratio(ref: Budget, b: Budget) -> str:
    return "1x" if b is ref else f"{ref.file_bytes / b.file_bytes:.2f}x smaller"


def table(budgets: list[Budget]) -> str:
    ref = next(b for b in budgets if b.method == "LoRA r=64")
    lines = ["| method | trainable params | weights (fp32) | grads | AdamW state | training total "
             "| adapter file | of which index tables | file vs LoRA r=64 |", "|" + "---|" * 9]
    for b in budgets:
        index = fmt_bytes(b.index_bytes) if b.index_entries else "-"
        lines.append(
            f"| {b.method} | {b.trainable_params:,} | {fmt_bytes(b.weight_bytes)} | {fmt_bytes(b.grad_bytes)} "
            f"| {fmt_bytes(b.optimizer_bytes)} | {fmt_bytes(b.training_bytes)} | {fmt_bytes(b.file_bytes)} "
            f"| {index} | {_ratio(ref, b)} |")
    return "\n".join(lines)


def section(budgets: list[Budget]) -> str:
    mos_rows = [b for b in budgets if b.index_entries]
    worst = max(mos_rows, key=lambda b: b.index_bytes / b.file_bytes)
    lora64 = next(b for b in budgets if b.method == "LoRA r=64")
    mos8 = [b for b in mos_rows if b.method.startswith("MoS R_e=8")]
    return "\n".join([
        "## Adapter memory at LLaMA2-7B scale (`bench_memory`)",
        "",
        "Command: `python benchmarks/bench_memory.py` (shapes only, no weights; machine-independent).",
        "LLaMA2-7B: 32 layers, hidden 4096, intermediate 11008; adapters on q, k, v, o, gate, up, down.",
        "Weights and gradients fp32; AdamW keeps two fp32 moments per trainable parameter. Adapter file =",
        "tensor payload (weights + MoS's two int32 index tables of shape (32, r*l) per module type); the",
        "safetensors header and adapter_config.json add a few KB to every row.",
        "",
        table(budgets),
        "",
        "MoS's parameter count depends only on the equivalent rank R_e (L * R_e * (d_in + d_out) per module",
        f"type): MoS at R_e = 8 trains {mos8[0].trainable_params:,} parameters, "
        f"{lora64.trainable_params / mos8[0].trainable_params:.0f}x fewer than LoRA r = 64, whatever its",
        "forward rank r. The index tables are the only extra bytes; the largest share they take of a file",
        f"above is {100 * worst.index_bytes / worst.file_bytes:.2f}% ({worst.method}).",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    budgets = rows()
    text = table(budgets)
    print(text)
    if not args.no_write:
        from results_md import write_section

        print("wrote", write_section("bench_memory", section(budgets)))


if __name__ == "__main__":
    main()
