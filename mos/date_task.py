"""The real-model demo's task: write an ISO date (1987-03-05) in words (5 March 1987).

Generated with exact answers from a seed, so nothing ships and every answer is checkable.
SmolLM2-135M-Instruct cannot do it out of the box (it echoes the digits back); a few hundred
small steps teach it. Training and held-out dates come from disjoint sets of days.
"""
from __future__ import annotations

import datetime
import random

__all__ = ["QUESTION", "date_examples", "chat_prompt", "training_batch", "answers", "exact_match"]

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
QUESTION = "Write the date {iso} in words, as day, month name and year."
_FIRST = datetime.date(1950, 1, 1)
_DAYS = 100 * 365


def date_examples(n: int, seed: int, held_out: bool) -> list:
    """`n` (question, answer) pairs. A day is held out when its ordinal is divisible by 5, so the
    held-out questions are dates never trained on."""
    rng = random.Random(f"{seed}:{held_out}")
    out = []
    while len(out) < n:
        day = rng.randrange(_DAYS)
        if (day % 5 == 0) != held_out:
            continue
        d = _FIRST + datetime.timedelta(days=day)
        out.append((QUESTION.format(iso=d.isoformat()), f"{d.day} {MONTHS[d.month - 1]} {d.year}"))
    return out


def chat_prompt(tokenizer, question: str) -> str:
    """The question in the model's chat template, ending where the assistant's answer starts."""
    # A one-line system turn instead of the template's default one: half the tokens per step.
    return tokenizer.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                          {"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def training_batch(tokenizer, pairs) -> dict:
    """input_ids, attention_mask and labels (only the answer and its end-of-turn token count),
    right-padded."""
    import torch

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for question, answer in pairs:
        prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False).input_ids
        target = tokenizer(answer, add_special_tokens=False).input_ids + [end]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answers(model, tokenizer, questions, max_new_tokens: int = 12, **generate_kwargs) -> list:
    """Greedy answers to `questions`, batched with left padding."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([chat_prompt(tokenizer, q) for q in questions], return_tensors="pt",
                        padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    return [tokenizer.decode(row[enc.input_ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


def exact_match(predicted, expected) -> float:
    return sum(p == e for p, e in zip(predicted, expected)) / max(len(expected), 1)
