"""Quality per trainable parameter: MoS vs full fine-tuning, LoRA, VeRA and VB-LoRA, measured in one run.

A small Llama-architecture model (byte-level, 6 layers, hidden 128) is pretrained here on CPython's
standard-library sources (cached under benchmarks/.cache/, built once), then adapted to a different
real corpus: the English help texts of `pydoc_data.topics` (interleaved 2 KiB blocks: 80% train,
5% validation, 10% test, 5% unused). Every method gets the same learning-rate search (the same number
of learning rates, each run on seed 0 and judged on validation loss), then the chosen learning rate is
rerun on further seeds; the table reports test loss (nats per byte) over all seeds.

    python benchmarks/quality.py --quick    # every method, 1 seed, 1 learning rate, 1-2 minutes
    python benchmarks/quality.py            # full run, 30-45 minutes on one core; updates RESULTS.md

Both run single-threaded by default (--threads): the numbers are meant to be compared within a run.
The full run keeps each finished method in benchmarks/.cache/, so an interrupted run resumes.

Nothing is downloaded: the tokenizer is the identity on UTF-8 bytes and both corpora ship with Python.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from mos.demo import train_step  # noqa: E402

CACHE = os.path.join(HERE, ".cache")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIE = 0.005  # nats/byte: differences smaller than this (or than 2 standard errors) are called ties

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*copy construct.*")


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 352  # 2.75x hidden (LLaMA2-7B: 2.69x); divisible by 32 for VB-LoRA
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    seq_len: int = 128


@dataclass(frozen=True)
class Profile:
    name: str
    pretrain_bytes: int  # size of the stdlib corpus used for pretraining
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    steps: int  # fine-tuning steps per run
    batch: int
    seeds: int
    n_lrs: int  # learning rates tried per method (the middle of the grid when 1)
    val_windows: int  # eval windows of seq_len bytes (cap)
    test_windows: int


PROFILES = {
    "full": Profile("full", pretrain_bytes=8 << 20, pretrain_steps=1200, pretrain_batch=16, pretrain_lr=3e-3,
                    steps=80, batch=8, seeds=3, n_lrs=3, val_windows=128, test_windows=256),
    "quick": Profile("quick", pretrain_bytes=1 << 20, pretrain_steps=80, pretrain_batch=8, pretrain_lr=3e-3,
                     steps=12, batch=8, seeds=1, n_lrs=1, val_windows=32, test_windows=32),
}


# --------------------------------------------------------------------------------------------- data
SKIP_DIRS = {"site-packages", "dist-packages", "pydoc_data", "test", "tests", "idle_test", "__pycache__"}


def stdlib_corpus(max_bytes: int) -> bytes:
    """CPython's standard-library .py sources (tests and pydoc_data excluded), shuffled by file."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    random.Random(0).shuffle(paths)
    chunks, total = [], 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(chunks)[:max_bytes]


def topics_splits(block: int = 2048) -> dict[str, bytes]:
    """pydoc's help topics as text, cut into blocks assigned train/val/test by position (mod 20)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "".join(f"{key}\n{'=' * len(key)}\n\n{topics[key].strip()}\n\n\n" for key in sorted(topics))
    data = text.encode("utf-8")
    splits = {"train": [], "val": [], "test": []}
    for i in range(0, len(data), block):
        k = (i // block) % 20
        name = "val" if k == 7 else "test" if k in (3, 13) else None if k == 17 else "train"
        if name:
            splits[name].append(data[i:i + block])
    return {name: b"".join(parts) for name, parts in splits.items()}


def downstream_data(shape: ModelShape, profile: Profile) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """(the topics splits, the tensors runs use: train bytes, validation and test windows)."""
    splits = topics_splits()
    data = {"train": to_tensor(splits["train"]),
            "val_windows": eval_windows(to_tensor(splits["val"]), shape.seq_len, profile.val_windows),
            "test_windows": eval_windows(to_tensor(splits["test"]), shape.seq_len, profile.test_windows)}
    return splits, data


def to_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def eval_windows(tokens: torch.Tensor, seq_len: int, limit: int) -> torch.Tensor:
    """Non-overlapping windows, evenly spread over the split when capped."""
    n = tokens.numel() // seq_len
    windows = tokens[: n * seq_len].view(n, seq_len)
    if n > limit:
        windows = windows[torch.linspace(0, n - 1, limit).round().long()]
    return windows


def sample_batch(tokens: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor, batch: int = 32) -> float:
    """Mean next-byte cross-entropy (nats) over every predicted position of the windows."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


# --------------------------------------------------------------------------------------------- base model
def llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                       num_attention_heads=shape.num_attention_heads,
                       num_key_value_heads=shape.num_attention_heads, max_position_embeddings=shape.seq_len,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def base_model(shape: ModelShape, profile: Profile, device: str = "cpu"):
    """The pretrained base model on `device`, built once per (shape, profile) and cached as safetensors."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    key = hashlib.sha256(json.dumps([dataclasses.asdict(shape), profile.pretrain_bytes, profile.pretrain_steps,
                                     profile.pretrain_batch, profile.pretrain_lr]).encode()).hexdigest()[:12]
    path = os.path.join(CACHE, f"base-{key}.safetensors")
    meta_path = path.replace(".safetensors", ".json")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(shape)).to(device)
    if os.path.exists(path) and os.path.exists(meta_path):
        model.load_state_dict(load_file(path, device=str(device)))
        with open(meta_path) as f:
            return model, json.load(f)

    corpus = to_tensor(stdlib_corpus(profile.pretrain_bytes))
    cut = int(corpus.numel() * 0.98)
    train, held_out = corpus[:cut], corpus[cut:]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=profile.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.perf_counter()
    bar = tqdm(range(profile.pretrain_steps), desc="pretrain base on stdlib", mininterval=2, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, profile.pretrain_steps, profile.pretrain_lr, warmup=max(1, profile.pretrain_steps // 20))
        x = sample_batch(train, profile.pretrain_batch, shape.seq_len, gen).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    meta = {"pretrain_seconds": time.perf_counter() - start, "pretrain_tokens": profile.pretrain_steps *
            profile.pretrain_batch * shape.seq_len, "corpus_bytes": corpus.numel(),
            "stdlib_heldout_loss": evaluate(model, eval_windows(held_out, shape.seq_len, 256))}
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return model, meta


# --------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    key: str
    label: str
    family: str  # full | lora | mos | vera | vblora | ablation
    lrs: tuple  # learning-rate grid (low -> high)
    build: Callable  # (model, seed) -> model to train
    spec: dict = field(default_factory=dict)  # what defines the method (cache key)
    budget: int | None = None  # nominal budget in LoRA-rank units (for the claims)


def lora_builder(r):
    def build(model, seed):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    return build


def vera_builder(r):
    def build(model, seed):
        from peft import VeraConfig, get_peft_model

        torch.manual_seed(seed)
        return get_peft_model(model, VeraConfig(r=r, target_modules=TARGETS, projection_prng_key=seed,
                                                vera_dropout=0.0))
    return build


def vblora_builder(r, num_vectors, vector_length):
    def build(model, seed):
        from peft import VBLoRAConfig, get_peft_model

        torch.manual_seed(seed)
        return get_peft_model(model, VBLoRAConfig(r=r, num_vectors=num_vectors, vector_length=vector_length,
                                                  topk=2, target_modules=TARGETS, vblora_dropout=0.0))
    return build


def mos_builder(**kw):
    def build(model, seed):
        import mos
        import mos.torch

        torch.manual_seed(seed)
        config = mos.MoSConfig(lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS), seed=seed, **kw)
        return mos.torch.get_mos_model(model, config)
    return build


def _full(model, seed):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def mos_available() -> tuple[bool, str]:
    try:
        import mos.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means: run without MoS
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


# Learning-rate grids, one per family, each centred where a 100-step pilot on the validation split
# (seed 0) found that family's best rate: every method gets three rates a factor ~3 apart.
FULL_LRS = (3e-4, 1e-3, 3e-3)
LORA_LRS = (3e-3, 1e-2, 3e-2)  # LoRA and MoS (scale lora_alpha / r with alpha 16 for both)
VERA_LRS = (3e-2, 1e-1, 3e-1)
VBLORA_LRS = (1e-2, 3e-2, 1e-1)
MOS_MAIN = {1: dict(r=4, equivalent_rank=1, shards_per_vector=2, private_rank=0),
            2: dict(r=6, equivalent_rank=2, shards_per_vector=2, private_rank=1)}


def methods(with_mos: bool) -> list[Method]:
    out = [Method("full", "Full fine-tuning", "full", FULL_LRS, _full, {"full": True})]
    for r in (1, 2, 8, 16):
        out.append(Method(f"lora{r}", f"LoRA r={r}", "lora", LORA_LRS, lora_builder(r), {"lora_r": r}, budget=r))
    if with_mos:
        for b, kw in MOS_MAIN.items():
            out.append(Method(f"mos{b}", f"MoS R_e={b} (r={kw['r']}, l={kw['shards_per_vector']}, "
                              f"p={kw['private_rank']})", "mos", LORA_LRS, mos_builder(**kw), {"mos": kw}, budget=b))
    # VeRA r=160 trains exactly LoRA r=1's count here (sum of d_out + r per layer); VB-LoRA's bank of
    # 16 vectors of length 32 plus its logits lands 3.5% above it.
    out.append(Method("vera", "VeRA r=160", "vera", VERA_LRS, vera_builder(160), {"vera_r": 160}, budget=1))
    out.append(Method("vblora", "VB-LoRA r=2, bank 16x32", "vblora", VBLORA_LRS, vblora_builder(2, 16, 32),
                      {"vblora": (2, 16, 32)}, budget=1))
    if with_mos:
        main = MOS_MAIN[2]
        ablations = [
            ("abl_pd", "MoS R_e=2 w/o pair dissociation", dict(main, pair_dissociation=False)),
            ("abl_priv", "MoS R_e=2 w/o privatization (p=0)", dict(main, private_rank=0)),
            ("abl_shard", "MoS R_e=2 w/o sharding (l=1)", dict(main, shards_per_vector=1)),
            ("abl_pure", "MoS R_e=2 pure sharing (r=12, l=1, p=0)",
             dict(r=12, equivalent_rank=2, shards_per_vector=1, private_rank=0, pair_dissociation=False,
                  subset_selection=False)),
        ]
        for key, label, kw in ablations:
            out.append(Method(key, label, "ablation", LORA_LRS, mos_builder(**kw), {"mos": kw}, budget=2))
    return out


# --------------------------------------------------------------------------------------------- one run
def lr_grid(method: Method, profile: Profile) -> tuple:
    """The whole grid, or only its middle learning rate when the profile tries one."""
    return method.lrs if profile.n_lrs >= len(method.lrs) else (method.lrs[len(method.lrs) // 2],)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def adapter_file_bytes(model) -> tuple[int, int]:
    """(bytes of the .safetensors files, bytes of every file) that save_pretrained writes."""
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        model.save_pretrained(tmp)
        files = [os.path.join(d, f) for d, _, names in os.walk(tmp) for f in names]
        weights = sum(os.path.getsize(f) for f in files if f.endswith(".safetensors"))
        return weights, sum(os.path.getsize(f) for f in files)


def train_one(method: Method, base, lr: float, seed: int, data: dict, profile: Profile, shape: ModelShape,
              bar_position: int = 1):
    """Trains a fresh copy of `base` with `method`; returns (model, stats)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    model = method.build(model, seed)
    params = trainable_parameters(model)
    if "mos" in method.spec:  # the pools hold exactly what mos.budget predicts from shapes alone
        from mos import MoSConfig
        from mos.budget import module_types_from_model, mos_budget

        expected = mos_budget(module_types_from_model(base, TARGETS), MoSConfig(**method.spec["mos"]))
        got = sum(p.numel() for p in params)
        if got != expected.trainable_params:
            raise RuntimeError(f"{method.key}: {got} trainable parameters, mos.budget says "
                               f"{expected.trainable_params}")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batches for every method
    device = next(base.parameters()).device
    warmup = max(1, profile.steps // 10)
    times, losses = [], []
    model.train()
    for step in tqdm(range(profile.steps), desc=f"  {method.key} lr={lr:g} seed={seed}", leave=False,
                     position=bar_position, mininterval=2, dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, profile.steps, lr, warmup)
        x = sample_batch(data["train"], profile.batch, shape.seq_len, gen).to(device)
        loss, seconds = train_step(model, x, params, opt)
        times.append(seconds)
        losses.append(loss)
    steady = times[min(3, len(times) - 1):]
    stats = {"lr": lr, "seed": seed, "trainable_params": sum(p.numel() for p in params),
             "step_ms": 1000 * statistics.median(steady), "final_train_loss": statistics.fmean(losses[-5:]),
             "diverged": not math.isfinite(losses[-1])}
    return model, stats


def run_method(method: Method, base, data: dict, profile: Profile, shape: ModelShape, outer) -> dict:
    """LR search on seed 0 (validation loss), then the chosen LR on the remaining seeds (test loss)."""
    grid = lr_grid(method, profile)
    search, best, best_model = [], None, None
    for lr in grid:
        model, stats = train_one(method, base, lr, 0, data, profile, shape)
        stats["val_loss"] = evaluate(model, data["val_windows"]) if not stats["diverged"] else float("inf")
        search.append(stats)
        outer.update(1)
        tqdm.write(f"  {method.key:10s} lr={lr:<7g} seed=0 val={stats['val_loss']:.4f} "
                   f"step={stats['step_ms']:.0f}ms")
        if best is None or stats["val_loss"] < best["val_loss"]:
            best, best_model = stats, model
        else:
            del model
    best_model.eval()
    seeds = [dict(best, test_loss=evaluate(best_model, data["test_windows"]))]
    file_bytes, dir_bytes = adapter_file_bytes(best_model)
    del best_model
    for seed in range(1, profile.seeds):
        model, stats = train_one(method, base, best["lr"], seed, data, profile, shape)
        stats["test_loss"] = evaluate(model, data["test_windows"])
        seeds.append(stats)
        outer.update(1)
        tqdm.write(f"  {method.key:10s} lr={best['lr']:<7g} seed={seed} test={stats['test_loss']:.4f}")
        del model
    tests = [s["test_loss"] for s in seeds]
    chosen = best["lr"]
    return {
        "key": method.key, "label": method.label, "family": method.family, "budget": method.budget,
        "spec": method.spec, "lr_grid": list(grid), "lr": chosen,
        "lr_at_edge": len(grid) > 1 and chosen in (grid[0], grid[-1]),
        "search": [{"lr": s["lr"], "val_loss": s["val_loss"]} for s in search],
        "trainable_params": best["trainable_params"], "file_bytes": file_bytes, "dir_bytes": dir_bytes,
        "test_mean": statistics.fmean(tests), "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "test_losses": tests, "n_seeds": len(tests),
        "step_ms": statistics.median(s["step_ms"] for s in search + seeds[1:]),
    }


# --------------------------------------------------------------------------------------------- claims
def loss_difference(a: dict, b: dict) -> tuple[float, float]:
    """(mean(a) - mean(b), standard error of that difference)."""
    se = math.sqrt(a["test_std"] ** 2 / a["n_seeds"] + b["test_std"] ** 2 / b["n_seeds"])
    return a["test_mean"] - b["test_mean"], se


def _margin(se: float) -> float:
    return max(TIE, 2 * se)


def _vs(a: dict, b: dict) -> str:
    """'lower'/'tie'/'higher': how a's test loss compares with b's."""
    d, se = loss_difference(a, b)
    if abs(d) <= _margin(se):
        return "tie"
    return "lower" if d < 0 else "higher"


def _d(a, b):
    d, se = loss_difference(a, b)
    return f"{d:+.4f} ± {se:.4f}"


def verdicts(results: dict[str, dict]) -> list[str]:
    """One line per claim of the paper, decided from the measured test losses."""
    lines = []
    r = results

    def have(*keys):
        return all(k in r for k in keys)

    # 1. MoS at budget B matches LoRA at 8B.
    for b, big in ((1, 8), (2, 16)):
        m, small, large = f"mos{b}", f"lora{b}", f"lora{big}"
        if not have(m, small, large):
            continue
        gain = r[small]["test_mean"] - r[large]["test_mean"]
        rel = _vs(r[m], r[large])
        head = f"**MoS at budget {b} vs LoRA at 8x the parameters (r={big})**: "
        if rel in ("lower", "tie"):
            verdict = "holds" if rel == "tie" else "holds (MoS is better)"
            text = f"{verdict}: MoS R_e={b} − LoRA r={big} = {_d(r[m], r[large])} nats/byte"
        else:
            frac = (r[small]["test_mean"] - r[m]["test_mean"]) / gain if gain > 0 else float("nan")
            text = (f"does not hold: MoS R_e={b} − LoRA r={big} = {_d(r[m], r[large])} nats/byte; MoS closes "
                    f"{100 * frac:.0f}% of the gap from LoRA r={b} to LoRA r={big}" if gain > 0 else
                    f"does not hold: MoS R_e={b} − LoRA r={big} = {_d(r[m], r[large])} nats/byte")
        if _vs(r[small], r[large]) != "higher":
            text += (f" (caveat: LoRA r={big} is not measurably better than LoRA r={b} here — LoRA r={big} − "
                     f"LoRA r={b} = {_d(r[large], r[small])} — so extra rank buys nothing at this scale)")
        lines.append(head + text + ".")

    # 2. MoS beats LoRA, VeRA and VB-LoRA at an equal budget.
    for b, peers in ((1, ("lora1", "vera", "vblora")), (2, ("lora2",))):
        m = f"mos{b}"
        if m not in r:
            continue
        for peer in peers:
            if peer not in r:
                continue
            rel = _vs(r[m], r[peer])
            verdict = {"lower": "holds", "tie": "does not hold (a tie)", "higher": "does not hold (MoS is worse)"}[rel]
            lines.append(f"**MoS R_e={b} ({r[m]['trainable_params']:,} params) beats {r[peer]['label']} "
                         f"({r[peer]['trainable_params']:,} params)**: {verdict}: MoS − peer = "
                         f"{_d(r[m], r[peer])} nats/byte.")

    # 3. Ablations: each strategy helps; sharding matters least; pure sharing trails LoRA.
    if "mos2" in r:
        names = {"abl_pd": "pair dissociation", "abl_priv": "privatization", "abl_shard": "vector sharding"}
        deltas = {}
        for key, what in names.items():
            if key not in r:
                continue
            d, _ = loss_difference(r[key], r["mos2"])
            deltas[what] = d
            rel = _vs(r[key], r["mos2"])
            verdict = {"higher": "holds", "tie": "does not hold (no measurable effect)",
                       "lower": "does not hold (removing it helps)"}[rel]
            lines.append(f"**Removing {what} hurts MoS R_e=2**: {verdict}: ablation − MoS = "
                         f"{_d(r[key], r['mos2'])} nats/byte.")
        if len(deltas) == 3:
            order = sorted(deltas, key=deltas.get, reverse=True)
            smallest = order[-1]
            others = [deltas["pair dissociation"], deltas["privatization"]]
            margins = {what: _margin(loss_difference(r[key], r["mos2"])[1]) for key, what in names.items()}
            if all(abs(deltas[w]) <= margins[w] for w in deltas):
                verdict = "not testable (no removal has a measurable effect)"
            else:
                verdict = "holds" if deltas["vector sharding"] <= min(others) else "does not hold"
            lines.append(f"**Ablation ordering (paper: removing pair dissociation ≈ removing privatization "
                         f"(−1.09 each) hurt more than removing sharding (−0.41))**: {verdict}: measured harm, "
                         f"largest first: " + ", ".join(f"{k} {deltas[k]:+.4f}" for k in order)
                         + f" (smallest: {smallest}).")
        if have("abl_pure", "lora2"):
            rel = _vs(r["abl_pure"], r["lora2"])
            verdict = {"higher": "holds", "tie": "does not hold (a tie)", "lower": "does not hold (pure sharing is better)"}[rel]
            lines.append(f"**Pure sharing is worse than LoRA at the same budget (r=2)**: {verdict}: pure − LoRA = "
                         f"{_d(r['abl_pure'], r['lora2'])} nats/byte.")
        if have("abl_pure", "abl_pd", "abl_priv", "abl_shard"):
            worst = max(("mos2", "abl_pd", "abl_priv", "abl_shard", "abl_pure"), key=lambda k: r[k]["test_mean"])
            rel = _vs(r["abl_pure"], r["mos2"])
            if worst == "abl_pure" and rel == "higher":
                verdict = "holds"
            elif worst == "abl_pure":
                verdict = "does not hold (highest mean, but a tie with full MoS)"
            else:
                verdict = f"does not hold (worst: {r[worst]['label']})"
            lines.append(f"**Pure sharing is the worst MoS variant (paper: 34.33 vs 36.12 once subset selection is "
                         f"added)**: {verdict}: pure − MoS R_e=2 = {_d(r['abl_pure'], r['mos2'])} nats/byte.")
    return lines


# --------------------------------------------------------------------------------------------- report
FAMILY_STYLE = {"full": ("black", "*"), "lora": ("tab:blue", "o"), "mos": ("tab:red", "D"),
                "vera": ("tab:green", "^"), "vblora": ("tab:purple", "v"), "ablation": ("tab:orange", "s")}


def plot(results: list[dict], base_loss: float, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    markers = ["o", "s", "D", "^", "v", "<", ">", "p", "h", "P", "X", "*", "d", "8", "H"]
    seen: dict[int, int] = {}
    for i, res in enumerate(results):
        color, _ = FAMILY_STYLE[res["family"]]
        n = res["trainable_params"]
        k = seen[n] = seen.get(n, -1) + 1
        x = n * 1.06 ** k  # methods with equal budgets are spread sideways so none hides another
        ax.errorbar(x, res["test_mean"], yerr=res["test_std"], fmt=markers[i % len(markers)],
                    color=color, markersize=8, capsize=3, label=f"{res['label']} ({res['trainable_params']:,})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; equal budgets nudged apart)")
    ax.set_ylabel("test loss on pydoc topics (nats/byte, mean ± std over seeds)")
    ax.set_title(f"{title}\nbase model before fine-tuning: {base_loss:.3f} nats/byte", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def table(results: list[dict], base_loss: float) -> str:
    lines = ["| method | trainable params | test loss (mean ± std) | Δ vs base | adapter .safetensors | all saved files "
             "| step time | chosen lr (grid) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| base model, no fine-tuning | 0 | {base_loss:.4f} | 0 | - | - | - | - |")
    for res in results:
        grid = ", ".join(f"{lr:g}" for lr in res["lr_grid"])
        edge = " (edge)" if res["lr_at_edge"] else ""
        lines.append(f"| {res['label']} | {res['trainable_params']:,} | {res['test_mean']:.4f} ± {res['test_std']:.4f} "
                     f"| {res['test_mean'] - base_loss:+.4f} | {_kib(res['file_bytes'])} | {_kib(res['dir_bytes'])} | {res['step_ms']:.0f} ms "
                     f"| {res['lr']:g}{edge} ({grid}) |")
    return "\n".join(lines)


def _kib(n):
    return f"{n / 1024:,.1f} KiB" if n < (1 << 20) else f"{n / (1 << 20):,.2f} MiB"


def code_version() -> str:
    """`git describe` of the checkout the numbers came from (with -dirty for local changes)."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    from results_md import cpu_name

    cpu = cpu_name()
    import peft
    import transformers

    return (f"{cpu}, {os.cpu_count()} logical CPUs (shared), torch {torch.__version__} with "
            f"{torch.get_num_threads()} thread(s), transformers {transformers.__version__}, peft {peft.__version__}, "
            f"Python {platform.python_version()}")


def section(results, base_meta, base_loss, profile, shape, command, methods_s, png_name, skipped) -> str:
    lines = [
        "## Quality per trainable parameter (`quality`)",
        "",
        f"Command: `{command}` — {methods_s / 60:.1f} min of training and evaluation (plus "
        f"{base_meta['pretrain_seconds'] / 60:.1f} min to pretrain the base once, then cached) on {machine()}; "
        f"code at `{code_version()}`.",
        "",
        f"Base: Llama-architecture, byte-level (vocab 256), {shape.num_hidden_layers} layers, hidden "
        f"{shape.hidden_size}, intermediate {shape.intermediate_size}, {shape.num_attention_heads} heads, "
        f"context {shape.seq_len}; pretrained here for {profile.pretrain_steps} steps "
        f"({base_meta['pretrain_tokens'] / 1e6:.1f}M bytes) on {base_meta['corpus_bytes'] / 1e6:.1f} MB of CPython "
        f"standard-library sources (held-out stdlib loss {base_meta['stdlib_heldout_loss']:.3f} nats/byte).",
        f"Downstream: `pydoc_data.topics` help texts, 2 KiB blocks interleaved into train/val/test; "
        f"{profile.steps} steps × {profile.batch} × {shape.seq_len} bytes per run, AdamW (no weight decay), 10% "
        f"warmup then cosine to 10%, grad-norm clip 1.0, adapters on q, k, v, o, gate, up, down, "
        f"lora_alpha 16 (scale alpha/r), no dropout.",
        f"Protocol: each method tries {profile.n_lrs} learning rate(s) on seed 0 (grids per family, a factor "
        f"~3 apart, centred where a 100-step pilot on the validation split put each family's best rate), keeps "
        f"the one with the lowest "
        f"validation loss, then reruns it on seeds 1..{profile.seeds - 1}; test loss over {profile.seeds} seeds "
        f"({profile.test_windows} windows of {shape.seq_len} bytes). File sizes: what save_pretrained writes, "
        f"the .safetensors weights alone and every file (config, PEFT's model card); full fine-tuning saves the "
        f"whole model, VeRA its frozen projections (PEFT's default), VB-LoRA all logits (PEFT's default). "
        f"Step time = median forward+backward+AdamW step on {torch.get_num_threads()} thread(s) of a shared "
        f"machine: compare ratios within the table, not with other machines.",
        "",
        table(results, base_loss),
        "",
        f"![eval loss vs trainable parameters]({png_name})",
        "",
        f"### Does the paper hold at this scale? (ties: |Δ| ≤ max({TIE}, 2 standard errors))",
        "",
    ]
    claims = verdicts({res["key"]: res for res in results})
    lines += [f"- {c}" for c in claims] if claims else ["- (no claims could be evaluated)"]
    edges = [f"{res['label']} ({res['lr']:g})" for res in results if res["lr_at_edge"]]
    if edges:
        lines += ["", "Chosen at the edge of its learning-rate grid (the grid may miss that method's best rate): "
                  + ", ".join(edges) + "."]
    if skipped:
        lines += ["", f"Not measured in this run: {skipped}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_runs(path: str) -> dict[str, dict]:
    """{fingerprint: result} of the methods an earlier (possibly interrupted) run finished."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                done[rec["fingerprint"]] = rec["result"]
    return done


def record_run(path: str, fp: str, result: dict, append: bool = True) -> None:
    """Adds one finished method to `path` (one JSON line, so an interrupted run loses at most one method)."""
    with open(path, "a" if append else "w") as f:
        f.write(json.dumps({"fingerprint": fp, "result": result}) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every method once: 1 seed, 1 lr, few steps")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenBLAS threads (default 1)")
    parser.add_argument("--methods", default="", help="comma-separated method keys (default: all)")
    parser.add_argument("--steps", type=int, help="override fine-tuning steps per run (no RESULTS.md update)")
    parser.add_argument("--seeds", type=int, help="override the number of seeds (no RESULTS.md update)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished methods cached from an earlier run")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md / quality.png")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    profile, shape = PROFILES["quick" if args.quick else "full"], ModelShape()
    overridden = args.steps is not None or args.seeds is not None
    if args.steps is not None:
        profile = dataclasses.replace(profile, steps=args.steps)
    if args.seeds is not None:
        profile = dataclasses.replace(profile, seeds=args.seeds)
    with_mos, why = mos_available()
    if with_mos:
        import mos

        mos.set_num_threads(args.threads)
    all_methods = methods(with_mos)
    if args.methods:
        wanted = args.methods.split(",")
        unknown = set(wanted) - {m.key for m in all_methods}
        if unknown:
            parser.error(f"unknown or unavailable method(s): {sorted(unknown)}")
        all_methods = [m for m in all_methods if m.key in wanted]
    skipped = "" if with_mos else f"MoS (mos.torch unavailable: {why})"
    if skipped:
        print(f"warning: running without MoS — {why}", file=sys.stderr)

    start = time.perf_counter()
    os.makedirs(CACHE, exist_ok=True)
    base, base_meta = base_model(shape, profile)
    for p in base.parameters():
        p.requires_grad_(False)
    splits, data = downstream_data(shape, profile)
    base_loss = evaluate(base, data["test_windows"])
    print(f"base model: stdlib held-out {base_meta['stdlib_heldout_loss']:.3f}, topics test {base_loss:.4f} "
          f"nats/byte; splits (bytes): " + ", ".join(f"{k} {len(v):,}" for k, v in splits.items()))

    run_dir = os.path.join(CACHE, f"quality-{profile.name}" + ("-custom" if overridden else ""))
    os.makedirs(run_dir, exist_ok=True)
    done_path = os.path.join(run_dir, "methods.jsonl")
    base_fp = fingerprint(dataclasses.asdict(profile), dataclasses.asdict(shape))
    done = finished_runs(done_path) if not (args.fresh or args.quick) else {}

    total_runs = sum(len(lr_grid(m, profile)) + profile.seeds - 1 for m in all_methods)
    results = []
    with tqdm(total=total_runs, desc="runs", position=0, mininterval=2, dynamic_ncols=True) as outer:
        for method in all_methods:
            fp = fingerprint(base_fp, method.key, method.spec, method.lrs, method.label)
            if fp in done:
                results.append(done[fp])
                outer.update(len(lr_grid(method, profile)) + profile.seeds - 1)
                tqdm.write(f"{method.key}: cached")
                continue
            t0 = time.perf_counter()
            res = run_method(method, base, data, profile, shape, outer)
            res["wall_s"] = time.perf_counter() - t0
            results.append(res)
            record_run(done_path, fp, res, append=not args.quick)
            tqdm.write(f"{method.key:10s} params={res['trainable_params']:>9,} test={res['test_mean']:.4f}"
                       f"±{res['test_std']:.4f} lr={res['lr']:g} file={res['file_bytes']:,}B step={res['step_ms']:.0f}ms")
    wall = time.perf_counter() - start
    methods_s = sum(res.get("wall_s", 0.0) for res in results)

    print()
    print(table(results, base_loss))
    print()
    for line in verdicts({res["key"]: res for res in results}):
        print("-", line)
    print(f"\nwall time: {wall / 60:.1f} min this invocation; all methods' runs: {methods_s / 60:.1f} min")

    command = "python benchmarks/quality.py" + (" --quick" if args.quick else "") + \
        (f" --threads {args.threads}" if args.threads != 1 else "")
    title = (f"pydoc topics after stdlib pretraining — {profile.steps} steps/run, {profile.seeds} seed(s), "
             f"{profile.n_lrs} lr(s)/method")
    write_results = not (args.no_results or args.quick or args.methods or overridden)
    png = os.path.join(HERE, "quality.png") if write_results else os.path.join(run_dir, "quality.png")
    plot(results, base_loss, png, title)
    print("plot:", png)
    if write_results:
        from results_md import write_section

        print("wrote", write_section("quality", section(results, base_meta, base_loss, profile, shape, command,
                                                         methods_s, "quality.png", skipped)))
    else:
        with open(os.path.join(run_dir, "section.md"), "w") as f:
            f.write(section(results, base_meta, base_loss, profile, shape, command, methods_s, "quality.png", skipped))


if __name__ == "__main__":
    main()
