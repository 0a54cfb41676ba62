"""The layers MoS can wrap, and how to read and write their weight as a dense (d_out, d_in) matrix.

Three storage layouts hold one linear map y = x W^T + b:
- nn.Linear: weight (d_out, d_in);
- transformers' Conv1D (GPT-2): weight (d_in, d_out), PEFT's fan_in_fan_out=True;
- bitsandbytes Linear4bit / Linear8bitLt: nn.Linear subclasses whose weight is quantized
  (Params4bit / Int8Params). Writing one dequantizes nothing: the new dense matrix is quantized
  again, which rounds (as PEFT's merge into these layers does), and a warning says so.
bitsandbytes is imported only when such a layer is written.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

__all__ = ["is_adaptable", "is_conv1d", "quantization", "features", "dense_weight", "write_dense_weight"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2 and relatives), recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") and hasattr(module, "nf")


def quantization(module: nn.Module):
    """'4bit', '8bit' or None: the bitsandbytes format of the module's weight."""
    kind = type(getattr(module, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple:
    """(d_in, d_out) of a linear-like module."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    return int(module.in_features), int(module.out_features)


@torch.no_grad()
def dense_weight(module: nn.Module) -> torch.Tensor:
    """W (d_out, d_in) in at least float32, a new tensor (dequantized for bitsandbytes layers)."""
    kind = quantization(module)
    weight = module.weight
    if kind is not None:
        dense = _dequantize(module, kind)
    else:
        dense = weight.t() if is_conv1d(module) else weight
    return dense.to(torch.promote_types(dense.dtype, torch.float32), copy=True)


@torch.no_grad()
def write_dense_weight(module: nn.Module, dense: torch.Tensor) -> None:
    """Stores W (d_out, d_in) into the module in its own layout and dtype (requantizing if needed)."""
    kind = quantization(module)
    if kind is None:
        target = module.weight
        target.copy_(dense.t() if is_conv1d(module) else dense)
        return
    warnings.warn(f"writing an adapter into a {kind} bitsandbytes layer quantizes the merged weight again; "
                  f"outputs differ from the unmerged model by the rounding", UserWarning, stacklevel=3)
    _requantize(module, kind, dense)


def _dequantize(module, kind):
    import bitsandbytes as bnb
    weight = module.weight
    if kind == "4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpack_cpu_4bit(bnb, data, state)
        return bnb.functional.dequantize_4bit(data, state)
    if getattr(weight, "SCB", None) is None and getattr(module.state, "SCB", None) is None:
        return weight.data  # not quantized yet (has_fp16_weights or before .to(device))
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))


def _unpack_cpu_4bit(bnb, data, state):
    """(codes, state) in the standard 4-bit layout for a weight bitsandbytes repacked for its
    AVX512-BF16 CPU kernel (done on the first eval forward on CPU), from copies: the codes are
    unpacked and the kernel's bfloat16 block scales kept as they are, so dequantizing gives exactly
    the weight the kernel multiplies with. bitsandbytes' own inverse would quantize the scales
    again (nested statistics), which changes them."""
    inverse = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise RuntimeError(f"bitsandbytes {bnb.__version__}: cannot read a 4-bit weight in its CPU packing "
                           f"(no _convert_weight_packed_for_cpu_inverse); merge on the device it was loaded for")
    state = copy.copy(state)
    packed_scales = state.absmax  # (d_in / blocksize, d_out), bfloat16
    state.original_nested = False  # keep the scales unquantized
    codes, state = inverse(data.clone(), state)
    state.absmax = packed_scales.T.reshape(-1).float()
    return codes, state


def _requantize(module, kind, dense):
    import bitsandbytes as bnb
    weight = module.weight
    device = weight.device
    if kind == "4bit":
        # Same block size, quant type, storage and dtype as before; quantized on the move to device.
        settings = {k: v for k, v in weight.__dict__.items()
                    if not k.startswith("_") and k not in ("data", "quant_state", "bnb_quantized", "requires_grad")}
        state = weight.quant_state
        dense = dense.to("cpu", getattr(state, "original_dtype", None) if getattr(
            state, "packing_format_for_cpu", False) else state.dtype)
        module.weight = bnb.nn.Params4bit(dense, requires_grad=False, **settings).to(device)
        return
    module.weight = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False,
                                      has_fp16_weights=weight.has_fp16_weights).to(device)
    module.state.SCB = None
    module.state.reset_grads()
