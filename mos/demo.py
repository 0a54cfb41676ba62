"""The toy demo: fine-tunes a small Llama-style model with MoS and with PEFT's LoRA and compares them.
(The main demo, `python -m mos demo`, fine-tunes a real pretrained LLM.)

Everything is built in: the model is a transformers LlamaForCausalLM made from a LlamaConfig
(random weights, output head at std 1/sqrt(hidden); all frozen: only the adapters train), the
tokenizer maps UTF-8 bytes to tokens, and the text is CPython's own standard-library sources
(files are split into train and eval sets by a hash of their path). Every method starts from the
same base weights and sees the same batches; the methods take their steps in turn, so load from
elsewhere on the machine slows them alike.

Rows of the table:
  LoRA at rank R_e   the same trainable parameters (and adapter bytes) as MoS
  MoS                forward rank r, parameter budget R_e (equivalent rank)
  LoRA at rank r     the same forward rank as MoS, r / R_e times the parameters
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METHODS = ("lora-same-params", "mos", "lora-same-rank")


def _default_threads() -> int:
    # Half the cores: torch's OpenMP pool and the OpenBLAS pool behind mos both spin while idle,
    # and two spinning pools on every core slow each other down.
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def add_arguments(parser) -> None:
    g = parser.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=8, help="MoS forward rank r (default 8)")
    g.add_argument("--equivalent-rank", type=int, default=2,
                   help="MoS parameter budget R_e in LoRA-rank units (default 2)")
    g.add_argument("--shards", type=int, default=2, help="MoS shards per vector l (default 2)")
    g.add_argument("--private-rank", type=int, default=1, help="MoS private rank p (default 1)")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="which rows to train (default: all three)")
    t = parser.add_argument_group("training")
    t.add_argument("--steps", type=int, default=60, help="optimizer steps per method (default 60)")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    t.add_argument("--seq-len", type=int, default=64, help="tokens (bytes) per sequence (default 64)")
    t.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    t.add_argument("--eval-batches", type=int, default=8, help="eval batches (default 8)")
    t.add_argument("--seed", type=int, default=0, help="seed of the model, adapters and batches")
    t.add_argument("--threads", type=int, default=_default_threads(),
                   help="CPU threads for torch and for mos's BLAS (default: half the cores)")
    m = parser.add_argument_group("model")
    m.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    m.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    m.add_argument("--corpus-bytes", type=int, default=2_000_000,
                   help="bytes of standard-library source to read for training (default 2 MB)")


# ---------------------------------------------------------------------------- tokenizer

class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; then beginning-of-text, end-of-text and padding."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- corpus

@dataclass
class Corpus:
    train: np.ndarray  # int64 token ids, files joined by eos
    eval: np.ndarray
    n_train_files: int
    n_eval_files: int
    root: str


def load_corpus(tokenizer: ByteTokenizer, train_bytes: int, eval_bytes: int) -> Corpus:
    """CPython's standard-library .py files; one in ten (by a CRC of the path) goes to eval."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    if not files:
        raise RuntimeError(f"no Python sources found under {root}")
    # A fixed pseudo-random order (CRC32 of the relative path) so the sample spans the library.
    keyed = sorted((zlib.crc32(str(p.relative_to(root)).encode()), p) for p in files)
    train, evals, n_train, n_eval = [], [], 0, 0
    size_train = size_eval = 0
    for key, path in keyed:
        to_eval = key % 10 == 0
        if (size_eval >= eval_bytes) if to_eval else (size_train >= train_bytes):
            if size_eval >= eval_bytes and size_train >= train_bytes:
                break
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = tokenizer.encode(text, add_eos=True)
        if to_eval:
            evals.append(ids); size_eval += len(ids); n_eval += 1
        else:
            train.append(ids); size_train += len(ids); n_train += 1
    join = lambda parts: np.fromiter((t for p in parts for t in p), dtype=np.int64)  # noqa: E731
    return Corpus(join(train), join(evals), n_train, n_eval, str(root))


def train_batches(data: np.ndarray, batch: int, seq: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch, seq) windows at random offsets; the same for every method."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq, size=(steps, batch))
    return data[starts[..., None] + np.arange(seq)]


def eval_batches(data: np.ndarray, batch: int, seq: int, n_batches: int) -> np.ndarray:
    """(n_batches, batch, seq) windows evenly spread over the eval text."""
    n = n_batches * batch
    starts = np.linspace(0, len(data) - seq - 1, n).astype(np.int64).reshape(n_batches, batch)
    return data[starts[..., None] + np.arange(seq)]


# ---------------------------------------------------------------------------- model and methods

def build_base_model(args, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, args.hidden // 32)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=args.hidden,
        intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(args.seq_len, 128), bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Output head at std 1/sqrt(hidden): after the final RMSNorm the logits then have unit
        # scale. At transformers' 0.02 they stay within a few units, and a frozen head would cap
        # what any adapter can learn.
        model.lm_head.weight.normal_(0.0, args.hidden ** -0.5)
    model.eval()
    return model


@dataclass
class Method:
    key: str
    label: str
    forward_rank: int


def methods_from(args) -> list:
    rows = {
        "lora-same-params": Method("lora-same-params", f"LoRA r={args.equivalent_rank}", args.equivalent_rank),
        "mos": Method("mos", f"MoS r={args.rank} (R_e={args.equivalent_rank}, l={args.shards}, "
                             f"p={args.private_rank})", args.rank),
        "lora-same-rank": Method("lora-same-rank", f"LoRA r={args.rank}", args.rank),
    }
    return [rows[k] for k in METHODS if k in args.methods]


def wrap(method: Method, base, args):
    """A fresh copy of the base model with this method's adapter (scale 2 for every method)."""
    import torch

    model = copy.deepcopy(base)
    torch.manual_seed(args.seed + 1)
    alpha = 2.0 * method.forward_rank
    if method.key == "mos":
        import mos

        return mos.get_mos_model(model, mos_config(args))
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=method.forward_rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules="all-linear")
    return get_peft_model(model, config)


def mos_config(args):
    import mos

    return mos.MoSConfig(r=args.rank, equivalent_rank=args.equivalent_rank,
                         shards_per_vector=args.shards, private_rank=args.private_rank,
                         lora_alpha=2.0 * args.rank, target_modules="all-linear", seed=args.seed)


def check_mos_config(args) -> str | None:
    """The error the MoS row would raise (pool sizes depend on the layer count), else None."""
    if "mos" not in args.methods:
        return None
    import mos

    try:
        for d_in, d_out in ((args.hidden, args.hidden), (args.hidden, 2 * args.hidden)):
            mos.ShardPool("check", d_in, d_out, args.layers, mos_config(args))
    except ValueError as exc:
        return str(exc)
    return None


def adapter_file_bytes(model) -> int:
    """Bytes of adapter_config.json + adapter_model.safetensors written by save_pretrained."""
    with tempfile.TemporaryDirectory(prefix="mos-demo-") as tmp:
        model.save_pretrained(tmp)
        return sum(os.path.getsize(os.path.join(tmp, name))
                   for name in ("adapter_config.json", "adapter_model.safetensors")
                   if os.path.exists(os.path.join(tmp, name)))


def evaluate(model, batches) -> float:
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for b in batches:
            ids = torch.from_numpy(b)
            total += float(model(input_ids=ids, labels=ids).loss)
    return total / len(batches)


def train_step(model, ids, params, optimizer) -> tuple[float, float]:
    """One causal-LM step (loss, backward, grad-norm clip 1.0, optimizer step): (loss, seconds)."""
    import torch

    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), time.perf_counter() - t0


def train_interleaved(models, batches, args) -> dict:
    """Trains every model on the same batches, one step of each in turn, so that load from
    elsewhere on the machine falls on all of them alike. Returns {label: step times (s)}."""
    import torch
    from tqdm.auto import tqdm

    state = {}
    for label, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        state[label] = (params, torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0))
        model.train()
    times = {label: [] for label in models}
    ema = {}
    with tqdm(total=len(batches), desc="fine-tuning", unit="step", file=sys.stderr,
              dynamic_ncols=True, mininterval=0.5) as bar:
        for b in batches:
            ids = torch.from_numpy(b)
            for label, model in models.items():
                params, opt = state[label]
                value, seconds = train_step(model, ids, params, opt)
                times[label].append(seconds)
                ema[label] = value if label not in ema else 0.9 * ema[label] + 0.1 * value
            bar.set_postfix_str("  ".join(f"{k.split(' (')[0]}: {v:.3f}" for k, v in ema.items()))
            bar.update()
    return times


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- report

def format_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def format_table(rows) -> str:
    header = ("method", "forward rank", "trainable params", "adapter file", "eval loss", "time/step")
    body = [(r["label"], str(r["rank"]) if r["rank"] else "-",
             f"{r['params']:,}" if r["params"] is not None else "-", format_bytes(r["bytes"]),
             f"{r['eval_loss']:.4f}", f"{r['step_ms']:.0f} ms" if r["step_ms"] else "-")
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    align = ["<", ">", ">", ">", ">", ">"]
    line = lambda cells: "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


# ---------------------------------------------------------------------------- entry point

def run(args) -> int:
    import warnings

    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2 or args.threads < 1:
        print("demo: --steps, --batch-size, --threads must be >= 1 and --seq-len >= 2",
              file=sys.stderr)
        return 2
    error = check_mos_config(args)
    if error:
        print(f"demo: MoS settings do not fit a {args.layers}-layer model: {error}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()
    import torch
    import transformers

    import mos

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    mos.set_num_threads(args.threads)

    tokenizer = ByteTokenizer()
    corpus = load_corpus(tokenizer, args.corpus_bytes, max(args.corpus_bytes // 8, 4 * args.seq_len))
    base = build_base_model(args, tokenizer)
    n_base = sum(p.numel() for p in base.parameters())
    print(f"mos demo: LlamaForCausalLM ({args.layers} layers, hidden {args.hidden}, "
          f"{n_base:,} parameters, random init, frozen) on {len(corpus.train):,} bytes of "
          f"{corpus.n_train_files} files from {corpus.root} (eval: {len(corpus.eval):,} bytes of "
          f"{corpus.n_eval_files} other files); {args.steps} steps x {args.batch_size} x "
          f"{args.seq_len} tokens; {args.threads} thread(s)", flush=True)

    train_data = train_batches(corpus.train, args.batch_size, args.seq_len, args.steps, args.seed)
    eval_data = eval_batches(corpus.eval, args.batch_size, args.seq_len, args.eval_batches)
    rows = [dict(label="base model (no adapter)", rank=0, params=0, bytes=None,
                 eval_loss=evaluate(base, eval_data), step_ms=None)]
    methods = methods_from(args)
    models = {}
    for method in methods:
        models[method.label] = wrap(method, base, args)
    times = train_interleaved(models, train_data, args)
    for method in methods:
        model = models[method.label]
        steady = times[method.label][2:] if args.steps > 4 else times[method.label]
        rows.append(dict(label=method.label, rank=method.forward_rank,
                         params=trainable_parameters(model), bytes=adapter_file_bytes(model),
                         eval_loss=evaluate(model, eval_data),
                         step_ms=1e3 * statistics.median(steady)))

    print()
    print(format_table(rows))
    print()
    print(summary(rows, args))
    print(f"(eval loss: mean next-byte cross-entropy in nats on held-out files, "
          f"ln({tokenizer.vocab_size}) = {math.log(tokenizer.vocab_size):.2f} is chance; "
          f"time/step: median wall time of one training step; total {time.perf_counter() - started:.0f} s)")
    print(verdict_pointer(args.steps))
    return 0


def verdict_pointer(steps: int) -> str:
    """Where the measured verdicts are: this table is one seed and one learning rate on a random base."""
    return (f"This {steps}-step table is a demo, not the method's verdict: see benchmarks/RESULTS.md of "
            f"the source repository (an installed package holds no benchmarks), section "
            f"'quality' (python benchmarks/quality.py: MoS vs LoRA and peers, lr search, 3 seeds) and section "
            f"'depth_study' (python benchmarks/depth_study.py: does MoS's edge over LoRA grow with depth?).")


def summary(rows, args) -> str:
    by = {r["label"]: r for r in rows}
    mos_row = next((r for r in rows if r["label"].startswith("MoS")), None)
    lines = []
    if mos_row is None:
        return "MoS was not run."
    same_params = by.get(f"LoRA r={args.equivalent_rank}")
    same_rank = by.get(f"LoRA r={args.rank}")
    if same_params:
        lines.append(f"MoS trains {mos_row['params']:,} parameters, as many as LoRA r={args.equivalent_rank} "
                     f"({same_params['params']:,}), at forward rank {args.rank}: eval loss "
                     f"{mos_row['eval_loss']:.4f} vs {same_params['eval_loss']:.4f}.")
    if same_rank:
        lines.append(f"LoRA at the same forward rank r={args.rank} trains "
                     f"{same_rank['params'] / max(mos_row['params'], 1):.1f}x the parameters "
                     f"({same_rank['params']:,}) for eval loss {same_rank['eval_loss']:.4f}; its file is "
                     f"{same_rank['bytes'] / max(mos_row['bytes'], 1):.1f}x MoS's.")
    return "\n".join(lines)
