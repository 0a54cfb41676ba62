"""ShardPool: sizes, private segments, index tables and initial values of one module type's pools."""
from __future__ import annotations

import math

import numpy as np

from . import _C
from .config import MoSConfig
from .ranks import check_type

SIDE_A, SIDE_B, INIT_TAG = 0, 1, 2


class ShardPool:
    """The A- and B-pool shared by the `n_layers` layers of one module type (docs/design.md).

    Pools are (n_shards, d_in / l) and (n_shards, d_out / l); row k of a pool is one shard. Layer k
    privately owns rows n_public + [k*p*l, (k+1)*p*l); index tables are fixed at creation.
    """

    def __init__(self, name: str, d_in: int, d_out: int, n_layers: int, config: MoSConfig):
        if not isinstance(config, MoSConfig):
            raise TypeError(f"config must be a MoSConfig, got {type(config).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name, self.config = name, config
        self.d_in, self.d_out, self.n_layers = (_integer(value, key) for key, value in
                                                (("d_in", d_in), ("d_out", d_out), ("n_layers", n_layers)))
        if self.n_layers >= 1:  # the core reports other bad sizes itself
            check_type(name, self.d_in, self.d_out, self.n_layers, config, self.rank)
        shape = _C.pool_shape(self.d_in, self.d_out, self.n_layers, self.rank, config.equivalent_rank,
                              config.shards_per_vector, config.private_rank, config.subset_selection)
        self.n_shards = shape["n_shards"]
        self.n_public = shape["n_public"]
        self.shard_len_a = shape["shard_len_a"]
        self.shard_len_b = shape["shard_len_b"]
        self._tables = None

    # ------------------------------------------------------------------ sizes
    @property
    def rank(self) -> int:
        """This type's forward rank: config.rank_pattern's entry for it, else config.r."""
        return self.config.rank_for(self.name)

    @property
    def shards_per_vector(self) -> int:
        return self.config.shards_per_vector

    @property
    def pool_a_shape(self) -> tuple:
        return (self.n_shards, self.shard_len_a)

    @property
    def pool_b_shape(self) -> tuple:
        return (self.n_shards, self.shard_len_b)

    def private_rows(self, layer: int) -> range:
        """Rows of either pool that only `layer` may select."""
        self._check_layer(layer)
        width = self.config.private_rank * self.shards_per_vector
        start = self.n_public + layer * width
        return range(start, start + width)

    @property
    def public_rows(self) -> range:
        return range(0, self.n_public)

    def num_parameters(self) -> int:
        """Trainable parameters of both pools: L * R_e * (d_in + d_out)."""
        return self.n_shards * (self.shard_len_a + self.shard_len_b)

    def lora_parameters(self, rank: int | None = None) -> int:
        """What LoRA at `rank` (default: the forward rank r) costs for the same layers."""
        rank = self.rank if rank is None else rank
        return self.n_layers * rank * (self.d_in + self.d_out)

    def compression_vs_lora(self) -> float:
        """LoRA's parameters at the same forward rank divided by MoS's (r / R_e)."""
        return self.lora_parameters() / self.num_parameters()

    # ------------------------------------------------------------------ index tables
    def _draw(self, layer: int, side: int) -> np.ndarray:
        c = self.config
        return _C.route_indices(self.d_in, self.d_out, self.n_layers, self.rank, c.equivalent_rank,
                                c.shards_per_vector, c.private_rank, c.subset_selection, c.seed,
                                self.name, layer, side)

    def index_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(index_a, index_b), each (n_layers, r * l) int32; row k is layer k's table."""
        if self._tables is None:
            a = np.stack([self._draw(k, SIDE_A) for k in range(self.n_layers)])
            b = np.stack([self._draw(k, SIDE_B) for k in range(self.n_layers)]) \
                if self.config.pair_dissociation else a.copy()
            a.flags.writeable = False
            b.flags.writeable = False
            self._tables = (a, b)
        return self._tables

    def indices(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(index_a, index_b) of `layer`, each (r * l,) int32 (read-only views)."""
        self._check_layer(layer)
        a, b = self.index_tables()
        return a[layer], b[layer]

    def set_index_tables(self, index_a, index_b) -> None:
        """Installs saved tables after validating dtype, shape, range, distinctness and privatization."""
        index_a, index_b = (_integer_table(table, f"{self.name}.{key}")
                            for key, table in (("index_a", index_a), ("index_b", index_b)))
        expected = (self.n_layers, self.rank * self.shards_per_vector)
        for key, table in (("index_a", index_a), ("index_b", index_b)):
            if table.shape != expected:
                raise ValueError(f"{self.name}.{key}: shape {table.shape}, expected {expected}")
            if table.size and (table.min() < 0 or table.max() >= self.n_shards):
                raise ValueError(f"{self.name}.{key}: indices must be in [0, {self.n_shards})")
            for k in range(self.n_layers):
                row = table[k]
                if len(np.unique(row)) != len(row):
                    raise ValueError(f"{self.name}.{key}: layer {k} repeats a shard")
                private = row[row >= self.n_public]
                allowed = self.private_rows(k)
                if private.size and (private.min() < allowed.start or private.max() >= allowed.stop):
                    raise ValueError(f"{self.name}.{key}: layer {k} selects another layer's private rows")
        a, b = index_a.astype(np.int32), index_b.astype(np.int32)
        a.flags.writeable = False
        b.flags.writeable = False
        self._tables = (a, b)

    # ------------------------------------------------------------------ values and state
    def init_values(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(pool_a, pool_b): P_A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (LoRA's A init over the full
        vector), or N(0, 1/r) with init_lora_weights="gaussian" (PEFT's gaussian init); P_B = 0
        (or U(-1/sqrt(d_out), 1/sqrt(d_out)) when config.init_lora_weights is False)."""
        rng = np.random.default_rng(_C.route_key(self.config.seed, self.name, 0, INIT_TAG))
        if self.config.init_lora_weights == "gaussian":
            pool_a = rng.normal(0.0, 1.0 / self.rank, self.pool_a_shape).astype(dtype)
        else:
            bound_a = 1.0 / math.sqrt(self.d_in)
            pool_a = rng.uniform(-bound_a, bound_a, self.pool_a_shape).astype(dtype)
        if self.config.init_lora_weights:
            pool_b = np.zeros(self.pool_b_shape, dtype=dtype)
        else:
            bound_b = 1.0 / math.sqrt(self.d_out)
            pool_b = rng.uniform(-bound_b, bound_b, self.pool_b_shape).astype(dtype)
        return pool_a, pool_b

    def state_dict(self) -> dict:
        """The pool's fixed state (index tables) as arrays; pool values live with the framework."""
        a, b = self.index_tables()
        return {"index_a": a.copy(), "index_b": b.copy()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"index_a", "index_b"} - set(state)
        if missing:
            raise KeyError(f"{self.name}: state is missing {', '.join(sorted(missing))}")
        self.set_index_tables(np.asarray(state["index_a"]), np.asarray(state["index_b"]))

    def _check_layer(self, layer):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer!r}")

    def __repr__(self):
        c = self.config
        return (f"ShardPool({self.name!r}, d_in={self.d_in}, d_out={self.d_out}, "
                f"n_layers={self.n_layers}, r={self.rank}, equivalent_rank={c.equivalent_rank}, "
                f"l={c.shards_per_vector}, p={c.private_rank}, n_shards={self.n_shards})")


def _integer(value, name):
    """value as an int when it is an integer (bools and floats such as 8.9 are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _integer_table(table, name):
    """An int64 copy of an integer index table; float tables are refused, never truncated."""
    table = np.asarray(table)
    if table.dtype == np.bool_ or not np.issubdtype(table.dtype, np.integer):
        raise TypeError(f"{name}: index tables must hold integers, got {table.dtype}")
    if table.dtype == np.uint64 and table.size and table.max() >= 2**63:
        raise ValueError(f"{name}: indices must be below 2**63")
    return np.ascontiguousarray(table, dtype=np.int64)
