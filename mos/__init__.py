"""mos: MoS (Mixture of Shards) adapters with a C/CUDA core.

`import mos` needs only NumPy; the PyTorch layer lives in `mos.torch`.
"""
import scipy_openblas32 as _openblas  # loads the OpenBLAS the extension links against

from . import _C
from .config import MoSConfig
from .pool import ShardPool
from . import functional

__version__ = "0.1.0"


def build_info():
    """How the extension was built: {'cuda': bool, 'blas': str, 'blas_threads': int, ...}."""
    return _C.build_info()


def set_num_threads(n):
    """Sets the CPU BLAS thread count (OpenBLAS's own pool); returns the previous value."""
    return _C.set_num_threads(n)


_TORCH_EXPORTS = ("get_mos_model", "MoSModel", "MoSTrainer")


def __getattr__(name):
    # The torch integration is imported on first use, so `import mos` never imports torch
    # (and MoSTrainer, the only part that needs transformers, imports it only when asked for).
    if name == "MoSTrainer":
        from .torch.trainer import MoSTrainer
        return MoSTrainer
    if name in _TORCH_EXPORTS:
        from . import torch as _mos_torch
        return getattr(_mos_torch, name)
    raise AttributeError(f"module 'mos' has no attribute {name!r}")


__all__ = ["MoSConfig", "ShardPool", "functional", "build_info", "set_num_threads", *_TORCH_EXPORTS]
del _openblas
