"""Does MoS's edge over LoRA grow with depth? MoS vs LoRA on byte-level Llama bases of 4 to 32 layers.

MoS shares one pool per module type across all layers, so the deeper the model, the more layers draw
on each parameter. This study pretrains one base per depth (same width, same stdlib corpus, same
token budget; cached as `quality.py` caches its base), fine-tunes each on `quality.py`'s downstream
task (pydoc topics) with LoRA r in {1, 2, 8, 16} and MoS at R_e in {1, 2} (r = 4 R_e, l = 2, p = 1
where the depth allows it, else 0) plus MoS R_e=2 with l = 4, under `quality.py`'s protocol: three
learning rates on seed 0 judged on validation loss, then the chosen one on two more seeds, the same
steps and the same batches for every method. It then fits how the loss gaps MoS - LoRA (equal budget
and 8x the budget) move with log2(depth) and decides two claims from the fit.

    python benchmarks/depth_study.py --smoke         # tiny: 2 depths, a few steps (CI, < 1 min)
    python benchmarks/depth_study.py                 # CPU study: width 64, 4 depths; updates RESULTS.md
    python benchmarks/depth_study.py --device cuda   # width 512 on one GPU; its own RESULTS.md section

Finished methods are kept in benchmarks/.cache/, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import quality  # noqa: E402
from quality import TIE, Method, ModelShape, Profile, lora_builder, loss_difference, mos_builder  # noqa: E402


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Study:
    name: str
    device: str
    depths: tuple
    width: int
    heads: int
    profile: Profile

    def shape(self, depth: int) -> ModelShape:
        # intermediate 2.75x hidden as in quality.py, rounded to a multiple of 16 (l = 4 needs d % 4 == 0)
        return ModelShape(hidden_size=self.width, intermediate_size=16 * round(2.75 * self.width / 16),
                          num_hidden_layers=depth, num_attention_heads=self.heads)


STUDIES = {
    "cpu": Study("cpu", "cpu", (4, 8, 16, 32), width=64, heads=2, profile=Profile(
        "depth-cpu", pretrain_bytes=4 << 20, pretrain_steps=300, pretrain_batch=16, pretrain_lr=3e-3,
        steps=40, batch=6, seeds=3, n_lrs=3, val_windows=48, test_windows=96)),
    "cuda": Study("cuda", "cuda", (4, 8, 16, 32), width=512, heads=8, profile=Profile(
        "depth-cuda", pretrain_bytes=8 << 20, pretrain_steps=400, pretrain_batch=32, pretrain_lr=1e-3,
        steps=60, batch=16, seeds=3, n_lrs=3, val_windows=128, test_windows=256)),
    "smoke": Study("smoke", "cpu", (4, 8), width=16, heads=1, profile=Profile(
        "depth-smoke", pretrain_bytes=1 << 18, pretrain_steps=4, pretrain_batch=4, pretrain_lr=3e-3,
        steps=3, batch=2, seeds=2, n_lrs=1, val_windows=4, test_windows=4)),
}

LORA_RANKS = (1, 2, 8, 16)
MOS_VARIANTS = {  # key: (R_e, r, l); p is the largest of (1, 0) the depth allows
    "mos1": (1, 4, 2),
    "mos2": (2, 8, 2),
    "mos2_l4": (2, 8, 4),
}
MAIN = ("mos1", "mos2")  # the variants the pooled verdicts average over (the l = 4 one is reported beside)
BIG = 8  # "8x the budget": LoRA at 8 R_e


def mos_settings(key: str, shape: ModelShape) -> dict:
    """MoS's settings for one variant at this shape: p = 1 when the pools can hold it, else 0."""
    from mos import MoSConfig
    from mos.budget import llama_module_types, mos_budget
    from mos.ranks import max_rank

    budget, r, l = MOS_VARIANTS[key]
    types = llama_module_types(shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers,
                               shape.num_attention_heads, target_modules=quality.TARGETS)
    for p in (1, 0):
        kw = dict(r=r, equivalent_rank=budget, shards_per_vector=l, private_rank=p)
        config = MoSConfig(**kw)
        if r <= max_rank(shape.num_hidden_layers, config):  # else MoS would lower r for every type
            mos_budget(types, config)  # checks the shapes
            return kw
    raise ValueError(f"{key}: no private rank fits {shape.num_hidden_layers} layers with r={r}, R_e={budget}, l={l}")


def depth_methods(shape: ModelShape) -> list[Method]:
    out = [Method(f"lora{r}", f"LoRA r={r}", "lora", quality.LORA_LRS, lora_builder(r), {"lora_r": r}, budget=r)
           for r in LORA_RANKS]
    for key in MOS_VARIANTS:
        kw = mos_settings(key, shape)
        label = (f"MoS R_e={kw['equivalent_rank']} (r={kw['r']}, l={kw['shards_per_vector']}, "
                 f"p={kw['private_rank']})")
        out.append(Method(key, label, "mos", quality.LORA_LRS, mos_builder(**kw), {"mos": kw},
                          budget=kw["equivalent_rank"]))
    return out


def peer(key: str, big: bool) -> str:
    budget = MOS_VARIANTS[key][0]
    return f"lora{budget * BIG if big else budget}"


# --------------------------------------------------------------------------------------------- running
def run_depth(study: Study, depth: int, outer, fresh: bool, only: set | None = None,
              cached_only: bool = False) -> dict:
    """Pretrains (or loads) the base of this depth and runs every method on it; resumes from the cache.
    With `cached_only`, methods not in the cache are listed as missing instead of run."""
    shape, profile = study.shape(depth), study.profile
    base, meta = quality.base_model(shape, profile, study.device)
    for p in base.parameters():
        p.requires_grad_(False)
    _, data = quality.downstream_data(shape, profile)
    base_loss = quality.evaluate(base, data["test_windows"])
    tqdm.write(f"L={depth}: base stdlib held-out {meta['stdlib_heldout_loss']:.3f}, topics test {base_loss:.4f}")
    run_dir = os.path.join(quality.CACHE, f"depth-{study.name}")
    os.makedirs(run_dir, exist_ok=True)
    done_path = os.path.join(run_dir, "methods.jsonl")
    done = {} if fresh else quality.finished_runs(done_path)
    base_fp = quality.fingerprint(dataclasses.asdict(profile), dataclasses.asdict(shape), study.device)
    results, missing = {}, []
    for method in depth_methods(shape):
        if only is not None and method.key not in only:
            continue
        runs = len(quality.lr_grid(method, profile)) + profile.seeds - 1
        fp = quality.fingerprint(base_fp, method.key, method.spec, method.lrs, method.label)
        if fp in done:
            results[method.key] = dict(done[fp], cached=True)
            outer.update(runs)
            continue
        if cached_only:
            missing.append(method.label)
            outer.update(runs)
            continue
        t0 = time.perf_counter()
        res = quality.run_method(method, base, data, profile, shape, outer)
        res["wall_s"] = time.perf_counter() - t0
        quality.record_run(done_path, fp, res)
        results[method.key] = res
        tqdm.write(f"L={depth} {method.key:8s} params={res['trainable_params']:>8,} test={res['test_mean']:.4f}"
                   f"±{res['test_std']:.4f} lr={res['lr']:g} step={res['step_ms']:.0f}ms wall={res['wall_s']:.0f}s")
    return {"depth": depth, "base_loss": base_loss, "meta": meta, "shape": dataclasses.asdict(shape),
            "results": results, "missing": missing}


# --------------------------------------------------------------------------------------------- verdicts
def gap(results: dict, key: str, big: bool) -> tuple[float, float]:
    """(MoS - LoRA test loss, its standard error over seeds) at one depth."""
    return loss_difference(results[key], results[peer(key, big)])


def gap_series(per_depth: list[dict], key: str, big: bool) -> list[tuple[int, float, float]]:
    """[(depth, gap, its error)] over the depths where both the variant and its LoRA peer were measured."""
    return [(d["depth"], *gap(d["results"], key, big)) for d in per_depth
            if key in d["results"] and peer(key, big) in d["results"]]


def pooled_series(per_depth: list[dict], big: bool) -> list[tuple[int, float, float]]:
    need = set(MAIN) | {peer(key, big) for key in MAIN}
    return [(d["depth"], *pooled_gap(d["results"], big)) for d in per_depth if need <= set(d["results"])]


def pooled_gap(results: dict, big: bool) -> tuple[float, float]:
    """The MAIN variants' gaps averaged (independent runs, so their errors add in quadrature)."""
    parts = [gap(results, key, big) for key in MAIN]
    return (statistics.fmean(d for d, _ in parts),
            math.sqrt(sum(se ** 2 for _, se in parts)) / len(parts))


def slope(depths, gaps, ses) -> tuple[float, float]:
    """Least-squares slope of the gap per doubling of depth, with its standard error: the larger of
    the seeds' error carried through the fit and the fit's own residual scatter (when it has any)."""
    xs = [math.log2(d) for d in depths]
    mx = statistics.fmean(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    if len(xs) < 2 or sxx == 0:
        raise ValueError("a slope needs at least two different depths")
    beta = sum((x - mx) * g for x, g in zip(xs, gaps)) / sxx
    se_seeds = math.sqrt(sum((x - mx) ** 2 * s ** 2 for x, s in zip(xs, ses))) / sxx
    se = se_seeds
    if len(xs) > 2:
        intercept = statistics.fmean(gaps) - beta * mx
        rss = sum((g - intercept - beta * x) ** 2 for x, g in zip(xs, gaps))
        se = max(se, math.sqrt(rss / (len(xs) - 2) / sxx))
    return beta, se


def trend_verdict(depths, gaps, ses) -> tuple[str, float, float, float]:
    """('holds' | 'ties' | 'fails', slope, its error, change over the depth range) for the claim that
    the gap *falls* with depth. Ties when the change over the range is within max(TIE, 2 errors)."""
    beta, se = slope(depths, gaps, ses)
    doublings = math.log2(max(depths)) - math.log2(min(depths))
    change, change_se = beta * doublings, se * doublings
    if abs(change) <= max(TIE, 2 * change_se):
        return "ties", beta, se, change
    return ("holds" if change < 0 else "fails"), beta, se, change


CLAIMS = {
    False: "the gap to equal-budget LoRA widens with depth (MoS − LoRA r=R_e falls as layers are added)",
    True: "the gap to 8× LoRA closes with depth (MoS − LoRA r=8·R_e falls as layers are added)",
}


def verdicts(per_depth: list[dict]) -> list[str]:
    """One pooled verdict per claim, each followed by its per-variant fits."""
    lines = []
    for big, claim in CLAIMS.items():
        series = pooled_series(per_depth, big)
        if len({L for L, _, _ in series}) < 2:
            lines.append(f"**{claim}**: not decided: fewer than two depths have every method measured.")
            continue
        depths = [L for L, _, _ in series]
        verdict, beta, se, change = trend_verdict(depths, [g for _, g, _ in series], [s for _, _, s in series])
        at = ", ".join(f"L={L}: {g:+.4f} ± {s:.4f}" for L, g, s in series)
        lines.append(f"**{claim}**: {verdict}: slope {beta:+.4f} ± {se:.4f} nats/byte per doubling of depth "
                     f"({change:+.4f} from L={min(depths)} to L={max(depths)}); mean of "
                     f"{' and '.join(MAIN)} gaps: {at}.")
        for key in MOS_VARIANTS:
            series = gap_series(per_depth, key, big)
            name = f"{key} (MoS R_e={MOS_VARIANTS[key][0]}, l={MOS_VARIANTS[key][2]}) − LoRA r={peer(key, big)[4:]}"
            if len(series) < 2:
                lines.append(f"  - {name}: not decided (measured at fewer than two depths).")
                continue
            v, b, s, _ = trend_verdict([L for L, _, _ in series], [g for _, g, _ in series],
                                       [e for _, _, e in series])
            lines.append(f"  - {name}: {v}, slope {b:+.4f} ± {s:.4f}; "
                         + ", ".join(f"L={L}: {g:+.4f}" for L, g, _ in series) + ".")
        if big:
            lines.append("  - " + lora_gain_line(per_depth))
    return lines


def lora_gain_line(per_depth: list[dict]) -> str:
    """What 8x the rank buys LoRA itself per depth: a closing gap to 8x LoRA means little if this shrinks too."""
    parts = []
    for d in per_depth:
        pairs = [(f"lora{b}", f"lora{b * BIG}") for b in (1, 2) if {f"lora{b}", f"lora{b * BIG}"} <= set(d["results"])]
        if pairs:
            diffs = [loss_difference(d["results"][small], d["results"][large]) for small, large in pairs]
            parts.append(f"L={d['depth']}: {statistics.fmean(g for g, _ in diffs):+.4f} "
                         f"± {math.sqrt(sum(se ** 2 for _, se in diffs)) / len(diffs):.4f}")
    return ("for scale, what 8× the rank buys LoRA itself (LoRA r=R_e − LoRA r=8·R_e, mean over R_e = 1, 2): "
            + ", ".join(parts) + ".")


# --------------------------------------------------------------------------------------------- report
def plot(per_depth: list[dict], path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [d["depth"] for d in per_depth]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharex=True)
    styles = {"mos1": ("tab:red", "o"), "mos2": ("tab:blue", "s"), "mos2_l4": ("tab:green", "^")}
    for ax, big in zip(axes, (False, True)):
        for i, key in enumerate(MOS_VARIANTS):
            series = gap_series(per_depth, key, big)
            color, marker = styles[key]
            xs = [L * 1.04 ** (i - 1) for L, _, _ in series]  # nudged sideways so error bars do not overlap
            label = f"MoS R_e={MOS_VARIANTS[key][0]}, l={MOS_VARIANTS[key][2]} − LoRA r={peer(key, big)[4:]}"
            ax.errorbar(xs, [g for _, g, _ in series], yerr=[s for _, _, s in series], fmt=marker + "-",
                        color=color, capsize=3, label=label)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(L) for L in depths])
        ax.set_xlabel("decoder layers")
        ax.set_ylabel("test loss gap, nats/byte (± 1 s.e. over seeds)")
        ax.set_title("MoS − LoRA at 8× the budget" if big else "MoS − LoRA at an equal budget", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def depth_table(d: dict) -> str:
    r = d["results"]
    lines = ["| method | trainable params | test loss (mean ± std) | Δ vs base | vs LoRA r=R_e | vs LoRA r=8·R_e "
             "| step time | chosen lr (grid) |", "|---|---:|---:|---:|---:|---:|---:|---|",
             f"| base model, no fine-tuning | 0 | {d['base_loss']:.4f} | 0 | - | - | - | - |"]
    for key, res in r.items():
        vs = [f"{g:+.4f} ± {s:.4f}" if peer(key, big) in r else "-"
              for big in (False, True) for g, s in [gap(r, key, big) if peer(key, big) in r else (0, 0)]] \
            if key in MOS_VARIANTS else ["-", "-"]
        grid = ", ".join(f"{lr:g}" for lr in res["lr_grid"])
        edge = " (edge)" if res["lr_at_edge"] else ""
        lines.append(f"| {res['label']} | {res['trainable_params']:,} | {res['test_mean']:.4f} ± {res['test_std']:.4f} "
                     f"| {res['test_mean'] - d['base_loss']:+.4f} | {vs[0]} | {vs[1]} | {res['step_ms']:.0f} ms "
                     f"| {res['lr']:g}{edge} ({grid}) |")
    lines += [f"| {label} | not measured in this run | - | - | - | - | - | - |" for label in d.get("missing", [])]
    return "\n".join(lines)


def section(study: Study, per_depth: list[dict], command: str, wall_s: float, png: str, run_note: str = "") -> str:
    p = study.profile
    shape = ModelShape(**per_depth[0]["shape"])
    pretrain = sum(d["meta"]["pretrain_seconds"] for d in per_depth)
    runs = sum(res.get("wall_s", 0.0) for d in per_depth for res in d["results"].values())
    cached = sum(bool(res.get("cached")) for d in per_depth for res in d["results"].values())
    total = sum(len(d["results"]) for d in per_depth)
    reused = f", {cached} of its {total} methods read from the cache of earlier runs" if cached else ""
    lines = [
        f"## Does MoS's edge over LoRA grow with depth? (`depth_study`, {study.name})",
        "",
        f"Command: `{command}` — {runs / 60:.1f} min of fine-tuning and evaluation plus {pretrain / 60:.1f} min "
        f"pretraining the {len(per_depth)} bases (cached afterwards); this invocation took {wall_s / 60:.1f} min{reused} "
        f"on {quality.machine()}" + (" (a shared machine: other jobs ran beside it)" if study.device == "cpu" else "")
        + f"; code at `{quality.code_version()}`." + (f" {run_note}" if run_note else ""),
        "",
        f"Bases: byte-level Llama, hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, "
        f"{shape.num_attention_heads} heads, context {shape.seq_len}, at depths {', '.join(map(str, study.depths))}; "
        f"each pretrained from scratch for {p.pretrain_steps} steps × {p.pretrain_batch} × {shape.seq_len} bytes "
        f"({per_depth[0]['meta']['pretrain_tokens'] / 1e6:.2f}M bytes, the same for every depth) on "
        f"{per_depth[0]['meta']['corpus_bytes'] / 1e6:.1f} MB of standard-library sources. Held-out stdlib loss "
        f"per depth: " + ", ".join(f"L={d['depth']}: {d['meta']['stdlib_heldout_loss']:.3f}" for d in per_depth) + ".",
        f"Downstream and protocol as in `quality` (pydoc topics; {p.steps} steps × {p.batch} × {shape.seq_len} bytes "
        f"per run; each method tries {p.n_lrs} learning rate(s) on seed 0 and keeps the best on validation, then "
        f"reruns it on seeds 1..{p.seeds - 1}; test loss over {p.seeds} seeds on {p.test_windows} windows; every "
        f"method sees the same batches). MoS uses r = 4·R_e and l = 2 (the l = 4 row: R_e = 2), with p = 1 where "
        f"the pools can hold a private rank beside r − p public shards per layer, else p = 0 (the labels say which).",
        f"Gaps are MoS − LoRA test loss (negative: MoS better) ± the standard error of the difference over seeds. "
        f"Step time: median training step of each method's runs; runs that shared the machine with different "
        f"loads are not comparable by it.",
        "",
    ]
    for d in per_depth:
        lines += [f"### L = {d['depth']}", "", depth_table(d), ""]
    lines += [f"![loss gap MoS − LoRA against depth]({png})", "",
              f"### Verdicts (a least-squares slope of the gap against log2(depth); its error is the larger of the "
              f"seeds' error carried through the fit and the fit's residual scatter; ties when the change from "
              f"L={min(study.depths)} to L={max(study.depths)} is within max({TIE}, 2 errors))", ""]
    lines += [f"- {line}" if not line.startswith("  ") else line for line in verdicts(per_depth)]
    missing = [f"L={d['depth']} {label}" for d in per_depth for label in d.get("missing", [])]
    if missing:
        lines += ["", "Not measured (the run was cut to fit its time): " + ", ".join(missing) + "."]
    edges = [f"L={d['depth']} {res['label']} ({res['lr']:g})" for d in per_depth for res in d["results"].values()
             if res["lr_at_edge"]]
    if edges:
        lines += ["", "Chosen at the edge of the learning-rate grid (the grid may miss that method's best rate): "
                  + ", ".join(edges) + "."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: width 64 (the committed study); cuda: width 512 on one GPU")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration for CI (2 depths, few steps)")
    parser.add_argument("--depths", help="comma-separated subset of the depths (no RESULTS.md update)")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenBLAS threads (default 1)")
    parser.add_argument("--methods", help="comma-separated method keys to run (no RESULTS.md update)")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: report the methods earlier runs finished, list the rest as missing")
    parser.add_argument("--fresh", action="store_true", help="ignore methods cached by an earlier run")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md or the plot")
    parser.add_argument("--run-note", default="", help="a sentence added to the section (how the run went)")
    parser.add_argument("--out", help="directory for the plot and section.md when RESULTS.md is not updated")
    args = parser.parse_args(argv)
    if args.smoke and args.device != "cpu":
        parser.error("--smoke runs on the CPU")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    study = STUDIES["smoke" if args.smoke else args.device]
    if args.depths:
        try:
            depths = tuple(int(x) for x in args.depths.split(","))
        except ValueError:
            parser.error(f"--depths must be comma-separated integers, got {args.depths!r}")
        if not set(depths) <= set(study.depths):
            parser.error(f"--depths must be a subset of {study.depths}, got {depths}")
        study = dataclasses.replace(study, depths=tuple(sorted(depths)))
    if study.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    only = None
    if args.methods:
        only = set(args.methods.split(","))
        known = {f"lora{r}" for r in LORA_RANKS} | set(MOS_VARIANTS)
        if not only <= known:
            parser.error(f"--methods: unknown key(s) {sorted(only - known)}; known: {sorted(known)}")
    ok, why = quality.mos_available()
    if not ok:
        parser.error(f"the study needs mos.torch: {why}")

    import mos

    if study.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 storage, the GPU's fast path
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    mos.set_num_threads(args.threads)
    os.makedirs(quality.CACHE, exist_ok=True)
    start = time.perf_counter()
    p = study.profile
    n_methods = len(only) if only else len(LORA_RANKS) + len(MOS_VARIANTS)
    total = len(study.depths) * n_methods * (min(p.n_lrs, 3) + p.seeds - 1)
    per_depth = []
    with tqdm(total=total, desc="runs", mininterval=5, dynamic_ncols=True) as outer:
        for depth in study.depths:
            per_depth.append(run_depth(study, depth, outer, args.fresh or args.smoke, only, args.cached_only))
    wall = time.perf_counter() - start

    for d in per_depth:
        print(f"\nL = {d['depth']}\n" + depth_table(d))
    print()
    for line in verdicts(per_depth):
        print(line if line.startswith("  ") else f"- {line}")
    print(f"\nwall time: {wall / 60:.1f} min")

    command = "python benchmarks/depth_study.py" + (" --smoke" if args.smoke else "") + \
        (" --device cuda" if study.device == "cuda" else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
    if only is not None:  # a partial run: the tables and verdicts need every method
        print(f"\nran {sorted(only)}; wall time: {wall / 60:.1f} min")
        return
    write_results = not (args.no_results or args.smoke or args.depths)
    name = "depth_study" if study.name == "cpu" else f"depth_study_{study.name}"
    out_dir = HERE if write_results else (args.out or os.path.join(quality.CACHE, f"depth-{study.name}"))
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, f"{name}.png")
    plot(per_depth, png, f"{study.name}: width {study.width}, {p.steps} steps/run, {p.seeds} seeds, "
                          f"{p.n_lrs} lr(s)/method")
    print("plot:", png)
    text = section(study, per_depth, command, wall, f"{name}.png", args.run_note)
    if write_results:
        from results_md import write_section

        print("wrote", write_section(name, text))
    else:
        with open(os.path.join(out_dir, "section.md"), "w") as f:
            f.write(text)
        print("section:", os.path.join(out_dir, "section.md"))


if __name__ == "__main__":
    main()
