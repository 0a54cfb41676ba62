"""Names every layer of mos.torch agrees on."""
from __future__ import annotations

__all__ = ["BASE_ADAPTER"]

# The adapter name of mixed-batch rows that run the base model alone; no adapter may take it.
BASE_ADAPTER = "__base__"
