"""The forward rank of each module type: the rule tying r to the layer count, and errors in config terms.

A type with L layers has pools of (equivalent_rank - private_rank) * L public rank vectors, and each
layer draws r - private_rank distinct ones of them (subset selection), so

    r <= private_rank + (equivalent_rank - private_rank) * L.

A type with too few layers (lm_head, a regex picking one layer, a small model) gets the largest r
its pools allow, with a warning naming the type and the r used. The lowered ranks are recorded in
the config's `rank_pattern`, so a saved adapter loads with exactly the ranks it was trained with.
A rank asked for explicitly (`rank_pattern`) or read from a saved adapter is never changed: if it
does not fit, the error says which values would.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings

from .config import MoSConfig

__all__ = ["max_rank", "check_type", "fit_ranks"]


def max_rank(n_layers: int, config: MoSConfig) -> int:
    """The largest forward rank a type with `n_layers` layers supports (with subset selection)."""
    p = config.private_rank
    return p + (config.equivalent_rank - p) * n_layers


def _layers(n):
    return f"{n} layer" if n == 1 else f"{n} layers"


def _settings(config):
    return (f"equivalent_rank={config.equivalent_rank}, private_rank={config.private_rank}, "
            f"shards_per_vector={config.shards_per_vector}")


def check_type(name: str, d_in: int, d_out: int, n_layers: int, config: MoSConfig, r: int) -> None:
    """Raises ValueError, saying which values would work, when `name` cannot have forward rank r."""
    l = config.shards_per_vector
    if d_in % l or d_out % l:
        common = math.gcd(d_in, d_out)
        works = [k for k in range(1, min(common, 64) + 1) if common % k == 0]
        raise ValueError(f"{name} is {d_in} -> {d_out}: shards_per_vector={l} must divide both; "
                         f"values that work: {', '.join(map(str, works))}")
    if r < config.private_rank:
        raise ValueError(f"{name}: r={r} is below private_rank={config.private_rank}; r must be >= private_rank")
    limit = max_rank(n_layers, config)
    if not config.subset_selection and r != limit:
        raise ValueError(f"{name} has {_layers(n_layers)}: without subset_selection every layer takes all "
                         f"public shards, so with {_settings(config)} r must be {limit} "
                         f"(set r={limit} or rank_pattern={{{name!r}: {limit}}})")
    if r > limit:
        raise ValueError(f"{name} has {_layers(n_layers)}: with {_settings(config)}, r can be at most "
                         f"{limit} (got r={r}); lower r, raise equivalent_rank, or set "
                         f"rank_pattern={{{name!r}: {limit}}}")


def fit_ranks(config: MoSConfig, types, lower: bool = True) -> MoSConfig:
    """The config to build pools with for `types`, an iterable of (name, d_in, d_out, n_layers).

    With `lower`, a type whose rank comes from `config.r` and exceeds what its layers allow gets
    the largest rank that fits, with a warning, recorded in the returned config's rank_pattern.
    Ranks set in rank_pattern, and every rank when `lower` is False, must fit as they are."""
    types = list(types)
    names = {name for name, *_ in types}
    unknown = sorted(set(config.rank_pattern) - names)
    if unknown:
        raise ValueError(f"rank_pattern names module type(s) {unknown} that the adapter does not target; "
                         f"its module types: {sorted(names)}")
    pattern, lowered = dict(config.rank_pattern), []
    for name, d_in, d_out, n_layers in types:
        r = config.rank_for(name)
        limit = max_rank(n_layers, config)
        if lower and name not in config.rank_pattern and config.subset_selection and r > limit:
            pattern[name] = r = limit
            lowered.append(f"{name} ({_layers(n_layers)}): r={limit}")
        check_type(name, d_in, d_out, n_layers, config, r)
    if lowered:
        warnings.warn(f"MoS: r={config.r} does not fit every module type's pools (a type with L layers allows "
                      f"r <= private_rank + (equivalent_rank - private_rank) * L = {config.private_rank} + "
                      f"{config.equivalent_rank - config.private_rank} * L); using {'; '.join(lowered)} "
                      f"(recorded in rank_pattern)", UserWarning, stacklevel=_user_stacklevel())
    if pattern == config.rank_pattern:
        return config
    return dataclasses.replace(config, rank_pattern=pattern)


def _user_stacklevel() -> int:
    """The warnings stacklevel of the first caller outside the mos package (the user's line)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level
