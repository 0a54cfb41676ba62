"""SmolLM2-135M-Instruct (mos.pretrained): MoS against PEFT LoRA and the base model alone.

All-linear adapters at the same forward rank (r = 8; MoS R_e = 2, l = 2, p = 1; 210 adapted
layers). Rows, each timed in interleaved rounds (every method once per round), medians:

  training step   forward, backward and AdamW on a batch of 4 x 64 tokens (3x the rounds: one
                  round is short, and this row is the one a target judges end to end); the base
                  model's row is its forward and backward alone, with the gradient taken down to
                  the embeddings' output, since it has no parameter to train
  decode b=1/b=8  greedy generate of 32 new tokens after a 16-token prompt, one unmerged adapter
  mixed K=8       generate as above, batch 8, eight adapters, one per row (adapter_names=)
  layer call      one adapted q_proj call at decode (1 token), the adapter's part of it

"adapter time" is a method's time over the base model's in the same round; the decode targets are
ratios of adapter times, since the base model's own time caps any end-to-end ratio. MoS is measured twice
at decode: through the inference path (mos/torch/decode.py, what generate uses) and through the
training op (the path every call took before it). The layer-call rows split the training op's cost into its
parts, which is where its decode time went.

    python benchmarks/bench_real_model.py            # ~10 minutes on 2 idle cores; writes RESULTS.md
    python benchmarks/bench_real_model.py --quick    # smoke run, nothing written
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_md import cpu_name, write_section  # noqa: E402

R, R_E = 8, 2
NEW_TOKENS, PROMPT = 32, 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="1 round, 4 new tokens; RESULTS.md untouched")
    return p.parse_args(argv)


def build(threads):
    import peft
    import torch

    import mos
    from mos.pretrained import load_smollm2

    torch.set_num_threads(threads)
    # Every model timed is a deepcopy: the loaded model's weights are memory-mapped from the cached
    # safetensors file, and decoding over them measured ~20% slower than over a copy in ordinary memory.
    base = copy.deepcopy(load_smollm2()[0])
    torch.manual_seed(0)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0,
                                                                    target_modules="all-linear"))
    cfg = lambda seed: mos.MoSConfig(r=R, equivalent_rank=R_E, shards_per_vector=2, private_rank=1,  # noqa: E731
                                     lora_alpha=2 * R, target_modules="all-linear", seed=seed,
                                     init_lora_weights=False)
    mos_model = mos.get_mos_model(copy.deepcopy(base), cfg(0))
    with torch.no_grad():  # non-zero LoRA B so both adapters do real work
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    return torch, peft, mos, base, lora, mos_model, cfg


def median_ms(values):
    return 1e3 * statistics.median(values)


def time_call(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


TRAIN_ROUND_FACTOR = 3


def frozen_base(base):
    """The base model for the training row: every weight frozen, gradients taken from the
    embeddings' output on, so backward runs through every layer as it does under an adapter."""
    model = copy.deepcopy(base)
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def training_rows(torch, models, rounds):
    """models: {label: (model, separate ops)}; medians in ms, and for each label other than "base"
    "<label> - base", paired by round as in decode_rows. "separate ops" times MoS as every training
    call ran before the base product and the adapter became one op (ops.linear_with_adapter): a
    no-op forward hook on each base layer keeps the layer on the separate ops. A model with nothing
    to train (the base) runs forward and backward only."""
    from mos.torch import MoSLinear

    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    state = {}
    for key, (model, separate) in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        state[key] = (model, separate, torch.optim.AdamW(params, lr=1e-4) if params else None)
        model.train()

    def step(key):
        model, separate, opt = state[key]
        hooks = [m.base_layer.register_forward_hook(lambda *a: None) for m in model.modules()
                 if isinstance(m, MoSLinear)] if separate else []
        try:
            model(input_ids=ids, labels=ids).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            for hook in hooks:
                hook.remove()

    for key in models:
        step(key)  # warm-up
    times = {key: [] for key in models}
    for _ in range(rounds):
        for key in models:
            times[key].append(time_call(lambda: step(key)))
    for model, _ in models.values():
        model.eval()
    return paired_medians(times)


def decode_rows(torch, mos, runs, batch, new_tokens, rounds):
    """runs: {label: (model, generate kwargs, use the inference path)}, "base" among them; medians in
    ms, and for each other label "<label> - base": the median over rounds of its time minus the base's
    in the same round (paired, so that drift between rounds cancels)."""
    import mos.torch.layer as layer_module

    ids = torch.randint(0, 49152, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    real = layer_module.inference_update

    def gen(model, kwargs, inference_path):
        layer_module.inference_update = real if inference_path else _never
        try:
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=2, **kwargs)
        finally:
            layer_module.inference_update = real

    for label, (model, kwargs, path) in runs.items():
        gen(model, kwargs, path)  # warm-up
    times = {label: [] for label in runs}
    for _ in range(rounds):
        for label, (model, kwargs, path) in runs.items():
            times[label].append(time_call(lambda: gen(model, kwargs, path)))
    return paired_medians(times)


def paired_medians(times: dict) -> dict:
    """{label: median ms} of per-round times in seconds, and, when "base" is among them, for each
    other label "<label> - base": the median over rounds of its time minus the base's in the same
    round (paired, so that drift between rounds cancels)."""
    out = {label: median_ms(v) for label, v in times.items()}
    if "base" in times:
        out.update({f"{label} - base": median_ms([t - b for t, b in zip(v, times["base"])])
                    for label, v in times.items() if label != "base"})
    return out


def adapter_times(d: dict, labels) -> dict:
    """Each label's adapter time in ms: the paired median when measured, else the medians' difference."""
    return {k: d.get(f"{k} - base", d[k] - d["base"]) for k in labels}


def training_op(layer, x):
    """The layer's call with the inference path switched off: what every call ran before it."""
    import mos.torch.layer as layer_module

    real = layer_module.inference_update
    layer_module.inference_update = _never
    try:
        return layer(x)
    finally:
        layer_module.inference_update = real


def _never(*args):
    return None  # "this call takes the training op"


def layer_call_rows(torch, mos, lora, mos_model, rounds):
    """One q_proj call with one token, in microseconds: the whole call and its parts; then the whole
    calls with 8 rows (one token each of a batch of 8)."""
    from mos.torch import core_bridge, ops
    from mos.torch.decode import inference_update

    peft_layer = lora.base_model.model.model.layers[5].self_attn.q_proj
    mos_layer = mos_model.get_base_model().model.layers[5].self_attn.q_proj
    x = torch.randn(1, 1, 576)
    slot = mos_layer.slot("default")
    pool_a, pool_b = slot.pools.pool_a, slot.pools.pool_b
    index_a, index_b = slot.index_rows()
    base_out = mos_layer.base_layer(x)
    y = base_out.clone()
    parts = {
        "base layer alone": lambda: mos_layer.base_layer(x),
        "PEFT LoRA layer": lambda: peft_layer(x),
        "MoS layer, inference path": lambda: mos_layer(x),
        "MoS layer, training op": lambda: training_op(mos_layer, x),
        "  training op: adapter_linear (autograd Function, clone of the base output, core call)": lambda:
            ops.adapter_linear(x, pool_a, index_a, pool_b, index_b, slot.scaling, base=base_out),
        "  inference path's adapter part (checks + the core call below)": lambda: inference_update(
            mos_layer, "default", y, x),
        "  core call alone, into y in place (6 DLPack capsules, argument checks, index copies, kernel)":
            lambda: core_bridge.add_update(y, x, pool_a, index_a, pool_b, index_b, slot.scaling),
    }
    x8 = torch.randn(8, 1, 576)
    parts.update({"base layer alone, 8 rows": lambda: mos_layer.base_layer(x8),
                  "PEFT LoRA layer, 8 rows": lambda: peft_layer(x8),
                  "MoS layer, inference path, 8 rows": lambda: mos_layer(x8)})
    n = 2000
    times = {k: [] for k in parts}
    with torch.no_grad():
        for fn in parts.values():
            fn()
        for _ in range(rounds):
            for key, fn in parts.items():
                times[key].append(timeit.timeit(fn, number=n) / n)
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    rounds = args.rounds = 1 if args.quick else args.rounds  # the report names the rounds that ran
    new_tokens = 4 if args.quick else NEW_TOKENS
    torch, peft, mos, base, lora, mos_model, cfg = build(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()

    calls = layer_call_rows(torch, mos, lora, mos_model, rounds)
    print("layer call (us):", {k: round(v, 1) for k, v in calls.items()}, flush=True)

    train = training_rows(torch, {"base": (frozen_base(base), False), "PEFT LoRA": (lora, False),
                                  "MoS": (mos_model, False), "MoS, training op": (mos_model, True)},
                          TRAIN_ROUND_FACTOR * rounds)
    print("training step (ms):", train, flush=True)

    decode = {}
    for batch in (1, 8):
        decode[batch] = decode_rows(torch, mos, {
            "base": (base, {}, True), "PEFT LoRA": (lora, {}, True),
            "MoS": (mos_model, {}, True), "MoS, training op": (mos_model, {}, False)}, batch, new_tokens, rounds)
        print(f"decode b={batch} (ms):", decode[batch], flush=True)

    # Mixed batch: K = 8 adapters, one per row.
    names = [f"a{k}" for k in range(8)]
    for k, name in enumerate(names):
        mos_model.add_adapter(name, cfg(100 + k))
        lora.add_adapter(name, peft.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for pname, param in lora.named_parameters():
            if "lora_B" in pname:
                param.normal_(0, 0.01)
    mixed = decode_rows(torch, mos, {"base": (base, {}, True),
                                     "PEFT LoRA": (lora, {"adapter_names": names}, True),
                                     "MoS": (mos_model, {"adapter_names": names}, True)}, 8, new_tokens, rounds)
    print("mixed K=8 b=8 (ms):", mixed, flush=True)

    table = report(args, calls, train, decode, mixed, new_tokens, time.perf_counter() - started)
    print(table)
    if not args.quick:
        print(f"wrote section 'bench_real_model' of {write_section('bench_real_model', table)}")
    return 0


def report(args, calls, train, decode, mixed, new_tokens, seconds) -> str:
    lines = ["## bench_real_model: SmolLM2-135M-Instruct, MoS vs PEFT LoRA vs the base model", "",
             f"`python benchmarks/bench_real_model.py` on {cpu_name()} ({platform.python_version()}), "
             f"{args.threads} torch threads, {args.rounds} interleaved rounds ({TRAIN_ROUND_FACTOR * args.rounds} "
             f"for the training step), medians; all-linear adapters at "
             f"forward rank {R} (MoS R_e={R_E}, l=2, p=1; 210 adapted layers). The machine is shared with "
             f"other jobs: absolute times carry their load, ratios come from the same rounds. {seconds:.0f} s.", "",
             "| row | base | PEFT LoRA | MoS | MoS, older path | target | met? |",
             "|---|---:|---:|---:|---:|---|---|"]
    ratio = train["MoS"] / train["PEFT LoRA"]
    lines.append(f"| training step, 4 x 64 tokens (ms) | {train['base']:.0f} | {train['PEFT LoRA']:.0f} | "
                 f"{train['MoS']:.0f} | {train['MoS, training op']:.0f} | <= 0.9x PEFT | "
                 f"{'yes' if ratio <= 0.9 else 'no'}: {ratio:.2f}x |")
    ad = adapter_times(train, ("PEFT LoRA", "MoS", "MoS, training op"))
    lines.append(f"| &nbsp;&nbsp;adapter time over the base (ms) | - | {ad['PEFT LoRA']:.0f} | {ad['MoS']:.0f} | "
                 f"{ad['MoS, training op']:.0f} | | {ad['MoS'] / ad['PEFT LoRA']:.2f}x PEFT's |")
    for batch, d in decode.items():
        base = d["base"]
        ad = adapter_times(d, ("PEFT LoRA", "MoS", "MoS, training op"))
        r = ad["MoS"] / ad["PEFT LoRA"] if ad["PEFT LoRA"] > 0 else float("nan")
        lines.append(f"| decode b={batch}, {new_tokens} tokens (ms) | {base:.0f} | {d['PEFT LoRA']:.0f} | "
                     f"{d['MoS']:.0f} | {d['MoS, training op']:.0f} | | |")
        lines.append(f"| &nbsp;&nbsp;adapter time over the base (ms) | - | {ad['PEFT LoRA']:.0f} | {ad['MoS']:.0f} | "
                     f"{ad['MoS, training op']:.0f} | <= 0.5x PEFT's | {'yes' if r <= 0.5 else 'no'}: {r:.2f}x |")
    speed = mixed["PEFT LoRA"] / mixed["MoS"]
    mixed_ad = adapter_times(mixed, ("PEFT LoRA", "MoS"))
    ad_speed = mixed_ad["PEFT LoRA"] / max(mixed_ad["MoS"], 1e-9)
    cap = mixed["PEFT LoRA"] / mixed["base"]  # what end to end could reach with a free adapter
    lines.append(f"| mixed K=8, b=8, {new_tokens} tokens (ms) | {mixed['base']:.0f} | {mixed['PEFT LoRA']:.0f} | "
                 f"{mixed['MoS']:.0f} | - | >= 3x PEFT, adapter time | {'yes' if ad_speed >= 3 else 'no'}: "
                 f"{ad_speed:.1f}x (end to end {speed:.2f}x, which the base caps at {cap:.2f}x) |")
    def per_call(rows):
        suffix = "" if rows == 1 else f", {rows} rows"
        base_call = calls["base layer alone" + suffix]
        return (calls["MoS layer, inference path" + suffix] - base_call, calls["PEFT LoRA layer" + suffix] - base_call)

    steady = "; ".join(f"{rows} row{'s' if rows > 1 else ''}: MoS adds {m:.1f} us to the base layer's call, "
                       f"PEFT LoRA {p:.1f} us, {m / p:.2f}x"
                       for rows in (1, 8) if f"base layer alone{'' if rows == 1 else ', 8 rows'}" in calls
                       for m, p in [per_call(rows)])
    lines += ["", f"Adapter times are paired: each round's time minus the base model's in the same round, then the "
              f"median. They are small beside the base model's own time, whose round-to-round noise they carry "
              f"(a negative one is a method within that noise of the base). The steadier measure is one adapted "
              f"layer's call at decode (the table at the end): {steady}. The training row's base is the frozen "
              f"model's forward and backward, the gradient taken from the embeddings' output on, with no "
              f"optimizer step: its adapter times hold each adapter's own products, autograd nodes and AdamW."]
    lines += ["", "MoS, older path: in the training row the base layer and the adapter's op run separately "
              "(the adapter accumulating into a copy of the base output), as before they became one op; in the "
              "decode rows every call takes the training op (autograd Function) instead of the inference path.",
              "", floor_note(decode[1], new_tokens)]
    lines += ["", "One q_proj call at decode (576 -> 576; 1 token, then 8 rows where named), microseconds:", "",
              "| call | us |", "|---|---:|"]
    lines += [f"| {k.strip() if not k.startswith('  ') else '&nbsp;&nbsp;' + k.strip()} | {v:.1f} |"
              for k, v in calls.items()]
    return "\n".join(lines)


# SmolLM2-135M's adapted layers per decoder layer: (d_in, d_out) of q, k, v, o, gate, up, down.
_SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
_STREAM_GBPS = 10.0  # a conservative single-core read bandwidth from memory


def floor_note(d, new_tokens) -> str:
    """What one decoded token must at least move through the adapters, and how far each is from it."""
    lora_bytes = 30 * sum(R * (i + o) for i, o in _SHAPES) * 4   # A and B of every layer, float32
    mos_pool_bytes = lora_bytes * R_E // R                       # the pools: R_e/r of LoRA's bytes
    floor_ms = new_tokens * lora_bytes / (_STREAM_GBPS * 1e9) * 1e3
    ad = adapter_times(d, ("PEFT LoRA", "MoS", "MoS, training op"))
    return (f"Floor at b=1: a token reads each adapted layer's A and B once, {lora_bytes / 2**20:.1f} MiB for "
            f"LoRA r={R}, and as many for MoS, whose calls gather them from {mos_pool_bytes / 2**20:.1f} MiB of "
            f"pools (so more of it stays in cache), plus "
            f"2 r (d_in + d_out) flops a layer (4.9 MFLOP a token). At {_STREAM_GBPS:.0f} GB/s that is "
            f"{floor_ms:.0f} ms for {new_tokens} tokens; the adapter times above are "
            + ", ".join(f"{k} {v / floor_ms:.0f}x" for k, v in ad.items())
            + " that floor. The rest is per-call overhead (210 calls a token): module calls, torch op dispatch "
            f"(PEFT: two Linear modules, a scale and an add), DLPack handles and, in the training op, autograd "
            f"and a copy of the base output; the layer-call rows split it.")


if __name__ == "__main__":
    sys.exit(main())
