"""Serves several MoS adapters from one base model in a single mixed batch.

The base model is a small Llama made from a config, over bytes, randomly initialised. Each adapter
learns, in a few training steps, the opening of one function of its corner of CPython's standard
library by heart (or is loaded with --load from directories written by --save): a task small
enough for a few steps on a random base, whose success shows in the output. Then one batch
holding each adapter's own text, served by that adapter, plus one sample for the base model
alone, is scored in a single call, `model(ids, adapter_names=[...])`, and a batch of prompts (the
first bytes of each function) is continued in a single `model.generate(..., adapter_names=[...])`:
each adapter writes its own function on, the base model writes noise. Every sample's loss and
continuation is printed next to the one the same adapter gives when it runs alone, and the memory
the adapters hold is compared with the same adapters as LoRA at the same forward rank. The exit
status is 0 when every mixed-batch result matches its single-adapter run.
"""
from __future__ import annotations

import os
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

DOMAINS = ("json", "email", "asyncio", "unittest", "xml", "http", "tomllib", "logging")


def add_arguments(parser) -> None:
    g = parser.add_argument_group("adapters")
    g.add_argument("--adapters", type=int, default=4, help=f"adapters to serve (1-{len(DOMAINS)}, default 4)")
    g.add_argument("--rank", type=int, default=8, help="MoS forward rank r (default 8)")
    g.add_argument("--equivalent-rank", type=int, default=2, help="MoS parameter budget R_e (default 2)")
    g.add_argument("--shards", type=int, default=2, help="MoS shards per vector l (default 2)")
    g.add_argument("--private-rank", type=int, default=1, help="MoS private rank p (default 1)")
    g.add_argument("--steps", type=int, default=80, help="training steps per adapter (default 80)")
    g.add_argument("--text-bytes", type=int, default=64,
                   help="bytes of its function each adapter learns (default 64)")
    g.add_argument("--load", metavar="DIR", help="load the adapters from DIR/<name> instead of training")
    g.add_argument("--save", metavar="DIR", help="save the trained adapters to DIR/<name>")
    s = parser.add_argument_group("serving")
    s.add_argument("--new-tokens", type=int, default=32, help="bytes to generate per prompt (default 32)")
    s.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="CPU threads for torch and mos's BLAS (default: half the cores)")
    m = parser.add_argument_group("model")
    m.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    m.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    m.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence (default 64)")
    m.add_argument("--init-std", type=float, default=0.2,
                   help="std of the random base's weights (default 0.2; see build_base_model)")
    m.add_argument("--batch-size", type=int, default=8, help="sequences per training step (default 8)")
    m.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    m.add_argument("--seed", type=int, default=0, help="seed of the model, adapters and batches")


def domain_text(domain: str, max_bytes: int = 400_000) -> str:
    """The sources of one standard-library package (or module), up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted((root / domain).rglob("*.py")) if (root / domain).is_dir() else [root / f"{domain}.py"]
    parts, size = [], 0
    for path in paths:
        if "test" in path.relative_to(root).parts[1:-1] or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "\n".join(parts)


def prompt_for(text: str, length: int = 24) -> str:
    """A line of the domain's own code to continue: the first `def` line with some body after it."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("def ") and len(stripped) >= 12:
            return (line + "\n")[:length]
    return text[:length]


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; then beginning-of-text, end-of-text and padding."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def build_base_model(args, tokenizer):
    """A random Llama over bytes, standing in for a pretrained base. Its weights are drawn at std
    args.init_std (0.2) rather than transformers' 0.02: at 0.02 the layers pass on almost nothing
    and the head keeps the logits near zero, so no adapter learns anything visible in a few steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, args.hidden // 32)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(args.seq_len, 128), bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, tie_word_embeddings=False,
        initializer_range=args.init_std)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def function_text(text: str, length: int) -> str:
    """`length` characters of the domain's code from its first `def` line with a body (prompt_for)."""
    start = text.index(prompt_for(text))
    return text[start:start + length]


def train_adapter(model, name, data, args):
    import torch

    model.set_adapter(name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    # zlib.crc32, not hash(): str hashes change with every interpreter, and so would the batches.
    rng = np.random.default_rng(args.seed + zlib.crc32(name.encode()) % 1000)
    losses = []
    for _ in range(args.steps):
        starts = rng.integers(0, len(data) - args.seq_len, size=args.batch_size)
        batch = torch.from_numpy(data[starts[:, None] + np.arange(args.seq_len)])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def run(args) -> int:
    import torch

    import mos
    from mos.torch.serving import BASE_ADAPTER

    if not 1 <= args.adapters <= len(DOMAINS):
        raise SystemExit(f"--adapters must be in [1, {len(DOMAINS)}]")
    torch.set_num_threads(args.threads)
    mos.set_num_threads(args.threads)
    tokenizer = ByteTokenizer()
    base = build_base_model(args, tokenizer)
    for p in base.parameters():
        p.requires_grad_(False)
    names = list(DOMAINS[:args.adapters])
    texts = {name: domain_text(name) for name in names}
    learned = {name: function_text(texts[name], args.text_bytes) for name in names}
    config = mos.MoSConfig(r=args.rank, equivalent_rank=args.equivalent_rank,
                           shards_per_vector=args.shards, private_rank=args.private_rank,
                           lora_alpha=2.0 * args.rank, target_modules="all-linear", seed=args.seed)
    start = time.perf_counter()
    if args.load:
        model = mos.MoSModel.from_pretrained(base, os.path.join(args.load, names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.adapter_store.load(os.path.join(args.load, name), name)
        print(f"loaded {len(names)} adapters from {args.load}")
    else:
        model = mos.get_mos_model(base, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
        for name in names:
            losses = train_adapter(model, name, repeated(learned[name], args.seq_len), args)
            print(f"trained {name!r:12} on {len(learned[name].encode())} bytes of Lib/{name}: loss "
                  f"{losses[0]:.3f} -> {np.mean(losses[-5:]):.3f} ({args.steps} steps)")
        if args.save:
            for name in names:
                model.adapter_store.save(name, os.path.join(args.save, name))
            print(f"saved the adapters to {args.save}/<name>")
    model.eval()
    print(f"({time.perf_counter() - start:.1f} s)\n")

    # One mixed batch scored: each adapter's own text with that adapter, and the first one's text
    # once more with the base model alone.
    serve = names + [BASE_ADAPTER]
    windows = torch.stack([window_of(learned[n], args.seq_len) for n in names] +
                          [window_of(learned[names[0]], args.seq_len)])
    with torch.no_grad():
        mixed_nll = per_sample_nll(model(windows, adapter_names=serve).logits, windows)
        alone_nll = []
        for i, name in enumerate(serve):
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    alone_nll.append(per_sample_nll(model(windows[i:i + 1]).logits, windows[i:i + 1])[0])
            else:
                model.set_adapter(name)
                alone_nll.append(per_sample_nll(model(windows[i:i + 1]).logits, windows[i:i + 1])[0])
        with model.disable_adapter():
            base_nll = per_sample_nll(model(windows).logits, windows)
    print(f"Loss (nats/byte) on each adapter's own text, one mixed batch of {len(serve)} samples of "
          f"{args.seq_len} bytes:\n")
    print(f"{'sample':22} {'served by':10} {'mixed batch':>12} {'alone':>10} {'|diff|':>9} {'base model':>11}")
    worst = 0.0
    for i, name in enumerate(serve):
        domain = names[i] if i < len(names) else names[0]
        diff = abs(float(mixed_nll[i]) - float(alone_nll[i]))
        worst = max(worst, diff)
        print(f"{'Lib/' + domain:22} {name:10} {float(mixed_nll[i]):12.4f} {float(alone_nll[i]):10.4f} "
              f"{diff:9.1e} {float(base_nll[i]):11.4f}")
    print()

    # One mixed generation: a prompt per adapter (from its own domain) and one for the base model.
    prompts = [prompt_for(texts[n]) for n in names] + [prompt_for(texts[names[0]])]
    wanted = [learned[n][len(p):] for n, p in zip(names, prompts)] + [learned[names[0]][len(prompts[0]):]]
    width = max(len(p) for p in prompts)
    batch = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + tokenizer.encode(p) for p in prompts])
    mask = (batch != tokenizer.pad_id).long()
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_id)
    t0 = time.perf_counter()
    with torch.no_grad():
        mixed = model.generate(batch, attention_mask=mask, adapter_names=serve, **gen)
    t_mixed = time.perf_counter() - t0
    alone, t_alone = [], 0.0
    with torch.no_grad():
        for i, name in enumerate(serve):
            t0 = time.perf_counter()
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    out = model.generate(batch[i:i + 1], attention_mask=mask[i:i + 1], **gen)
            else:
                model.set_adapter(name)
                out = model.generate(batch[i:i + 1], attention_mask=mask[i:i + 1], **gen)
            t_alone += time.perf_counter() - t0
            alone.append(out[0])
    print(f"One mixed batch of {len(serve)} prompts, {args.new_tokens} new bytes each, greedy:\n")
    same = recalled = 0
    for i, name in enumerate(serve):
        new_mixed = tokenizer.decode(mixed[i, batch.shape[1]:].tolist())
        new_alone = tokenizer.decode(alone[i][batch.shape[1]:].tolist())
        same += new_mixed == new_alone
        correct = common_prefix(new_mixed, wanted[i])
        recalled += name != BASE_ADAPTER and correct >= min(len(new_mixed), len(wanted[i]))
        print(f"[{name}] prompt {prompts[i]!r}")
        domain = names[i] if i < len(names) else names[0]
        print(f"  mixed batch : {new_mixed!r}  ({correct} bytes as in Lib/{domain})")
        print(f"  alone       : {new_alone!r}  {'(same)' if new_mixed == new_alone else '(DIFFERENT)'}")
    print(f"\n{same}/{len(serve)} continuations identical to single-adapter runs; {recalled}/{len(names)} "
          f"adapters wrote their own function on, the base model did not. The mixed batch took "
          f"{t_mixed:.2f} s, the {len(serve)} single runs {t_alone:.2f} s.\n")

    store = model.adapter_store
    resident, lora = store.resident_bytes(), store.lora_bytes()
    print(f"{'adapter':12} {'MoS resident':>14} {'as LoRA r=' + str(args.rank):>14} {'ratio':>7}")
    for name in names:
        print(f"{name:12} {_fmt(resident[name]):>14} {_fmt(lora[name]):>14} {resident[name] / lora[name]:7.3f}")
    total, total_lora = sum(resident.values()), sum(lora.values())
    print(f"{'all':12} {_fmt(total):>14} {_fmt(total_lora):>14} {total / total_lora:7.3f}")
    print(f"\nMoS pools hold R_e / r = {args.equivalent_rank / args.rank:.3f} of LoRA's bytes at the same "
          "forward rank; index tables add the rest. The store keeps one copy of every pool and no "
          "per-layer A or B.")
    return 0 if same == len(serve) and worst <= 1e-4 else 1


def repeated(text: str, seq_len: int) -> np.ndarray:
    """The text's bytes, repeated to hold many training windows of seq_len bytes."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return np.tile(data, 8 * seq_len // len(data) + 2)


def window_of(text: str, length: int):
    import torch

    return torch.from_numpy(repeated(text, length)[:length].copy())


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def per_sample_nll(logits, ids):
    """Mean next-byte negative log-likelihood of each sample."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(dim=1)


def _fmt(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
