"""Serving many MoS adapters of one base model at once: the adapter store (store.py) and
mixed-adapter batches (mixed_batch.py), importable from here.

    model = mos.MoSModel.from_pretrained(base, "adapters/support", adapter_name="support")
    model.adapter_store.load("adapters/legal", "legal")          # at run time, others keep serving
    model.eval()
    out = model(input_ids, adapter_names=["support", "legal", "__base__"])   # one name per sample
    ids = model.generate(input_ids, adapter_names=[...], max_new_tokens=20)
    model.adapter_store.resident_bytes()                           # {name: bytes}
"""
from __future__ import annotations

from .mixed_batch import mixed_batch, plan_rows
from .names import BASE_ADAPTER
from .store import AdapterStore

__all__ = ["AdapterStore", "BASE_ADAPTER", "mixed_batch", "plan_rows"]
