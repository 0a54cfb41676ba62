"""mos: MoS (Mixture of Shards) adapters with a C/CUDA core (distribution `mixture-of-shards`).

`import mos` needs only NumPy; the PyTorch layer lives in `mos.torch` (pip install
'mixture-of-shards[torch]'), the transformers/PEFT integration needs the `hf` extra.

Public API
    MoSConfig            the adapter's settings (help(mos.MoSConfig) lists every one)
    ShardPool            one module type's shard pools and index tables, on NumPy arrays
    functional           forward/backward of the core on NumPy arrays (and DLPack tensors)
    build_info()         how the extension was built: CUDA, BLAS, threads, build switches
    set_num_threads(n)   the CPU BLAS thread count
    __version__          the package version
  with torch (loaded on first use):
    get_mos_model(model, config)   wraps a torch model: base frozen, pools trainable
    MoSModel             the wrapped model: save_pretrained, from_pretrained, export_lora, serving
    MoSTrainer           transformers.Trainer that checkpoints the adapter (needs the hf extra)
  modules
    mos.torch            MoSLinear, adapter_linear, AdapterStore, export_lora, ...
    mos.testing          pytest fixtures, a pure-torch reference and adapter assertions

Command line: `mos --help` (or `python -m mos`): demo, serve-demo, --version.
"""
import json as _json
import warnings as _warnings
from pathlib import Path as _Path

import scipy_openblas32 as _openblas  # loads the OpenBLAS the extension links against

from . import _C
from .config import MoSConfig
from .pool import ShardPool
from . import functional
from ._extras import MissingExtraError, require as _require
from . import _quiet

_quiet.install()

__version__ = "0.1.0"


def _build_record():
    """The switches the extension was built with (written by setup.py next to _C), or {}."""
    try:
        return _json.loads((_Path(__file__).parent / "_build.json").read_text())
    except (OSError, ValueError):
        return {}


def build_info():
    """How the extension was built: {'cuda': bool, 'blas': str, 'blas_threads': int, ...,
    'build': the build switches (cuda_mode, nvcc, cuda_built, debug, sanitize)}."""
    return {**_C.build_info(), "build": _build_record()}


def set_num_threads(n):
    """Sets the CPU BLAS thread count (OpenBLAS's own pool); returns the previous value. Next to
    torch leave it at 1 (mos.torch's default): large CPU calls then run on torch's threads
    (torch.set_num_threads), while a second pool of busy-waiting threads would fight them."""
    return _C.set_num_threads(n)


_TORCH_EXPORTS = ("get_mos_model", "MoSModel", "MoSTrainer")


def __getattr__(name):
    # The torch integration is imported on first use, so `import mos` never imports torch
    # (and MoSTrainer, the only part that needs transformers, imports it only when asked for).
    if name == "MoSTrainer":
        _require("torch", "mos.MoSTrainer")
        _require("transformers", "mos.MoSTrainer")
        from .torch.trainer import MoSTrainer
        return MoSTrainer
    if name in _TORCH_EXPORTS:
        _require("torch", f"mos.{name}")
        from . import torch as _mos_torch
        return getattr(_mos_torch, name)
    raise AttributeError(f"module 'mos' has no attribute {name!r}")


def _warn_if_cpu_only_fallback(record):
    # pip shows a build's output only with -v: a build that found nvcc but still made a CPU-only
    # extension says so here, once per process.
    if record.get("cuda_mode") == "auto" and record.get("nvcc") and not record.get("cuda_built", True):
        _warnings.warn(f"mos was built CPU-only although nvcc was found ({record['nvcc']}) at build time; "
                       "rebuild with MOS_CUDA=1 (pip install -v) to see why CUDA was left out",
                       RuntimeWarning, stacklevel=2)


_warn_if_cpu_only_fallback(_build_record())

__all__ = ["MoSConfig", "ShardPool", "functional", "build_info", "set_num_threads", "MissingExtraError",
           *_TORCH_EXPORTS]
del _openblas
