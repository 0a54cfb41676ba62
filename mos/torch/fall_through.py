"""A module that forwards unknown attributes to the module it wraps, as PEFT's wrappers do, so code
written for the wrapped model (config, generate, weight, ...) keeps working on the wrapper."""
from __future__ import annotations

from torch import nn

__all__ = ["FallThroughModule"]


class FallThroughModule(nn.Module):
    """Unknown attributes come from `_fall_through_target()`; the names in `_own_attributes` never
    fall through (they are the wrapper's own, and asking the target would recurse)."""

    _own_attributes: tuple = ()

    def _fall_through_target(self) -> nn.Module:
        raise NotImplementedError

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # "_modules" is missing while the object is being built or unpickled.
            if name in self._own_attributes or "_modules" not in self.__dict__:
                raise
            return getattr(self._fall_through_target(), name)
