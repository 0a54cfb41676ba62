"""Optional dependencies: which extra of the distribution brings each, and the ImportError that
says so (`pip install 'mixture-of-shards[torch]'`) instead of a bare "No module named 'torch'"."""
from __future__ import annotations

import importlib

DISTRIBUTION = "mixture-of-shards"

# top-level module -> the extra that installs it
EXTRA_OF = {
    "torch": "torch", "safetensors": "torch", "tqdm": "torch",
    "transformers": "hf", "peft": "hf", "accelerate": "hf", "gguf": "hf",
    "bitsandbytes": "test", "pytest": "test", "hypothesis": "test", "psutil": "test",
    "matplotlib": "bench",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def missing_extra_error(error: ModuleNotFoundError, feature: str) -> MissingExtraError | None:
    """The MissingExtraError for `error` when the missing module belongs to an extra, else None."""
    root = (error.name or "").split(".")[0]
    extra = EXTRA_OF.get(root)
    if extra is None:
        return None
    return MissingExtraError(
        f"{feature} needs {root}, which is not installed: pip install '{DISTRIBUTION}[{extra}]'",
        name=root)


def require(module: str, feature: str):
    """Imports `module`, or raises MissingExtraError naming the extra to install for `feature`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        hint = missing_extra_error(error, feature)
        if hint is None:
            raise
        raise hint from error
