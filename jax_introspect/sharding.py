"""Device meshes and the one table that maps logical array axes to mesh axes.

A mesh has two named axes, `data` (batch rows) and `tensor` (tensor parallelism inside a
layer). Every array the model touches names its axes logically (`embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, `layers`, `batch`, `seq`, `cache_seq`; the weights' axes are declared
in params.py, the others below); `AxisRules` maps those names to mesh axes, and `Layout` turns
the mapping into the `NamedSharding`s of `Params`, `KVCache`, `Injection`, sampling settings and
batch arrays (see docs/sharding.md). One device is a 1x1 mesh: every model has a `Layout`, and
the same jitted programs run from one device to a pod.

Default rules (decode-friendly tensor parallelism, Megatron style): the attention heads, the MLP
hidden axis and the vocabulary are split over `tensor`; the model width (`embed`) is kept whole,
so activations are replicated inside a tensor group and each layer costs two all-reduces; batch
rows are split over `data`, and the weights are replicated across `data`.

More tensor-parallel ways than KV heads (Llama-3.1 has 8): every KV head is duplicated at load
time into `lcm(n_kv_heads, tensor) / n_kv_heads` identical copies, so the KV projections and the
KV cache split evenly and each device holds the KV heads its own query heads read (one head per
device when `tensor` is a multiple of the KV heads). Results are unchanged: a query head's copy
holds the same keys and values as the original.

Meshes are built with `AxisType.Auto` (`jax.make_mesh` defaults to explicit axes in current JAX):
GSPMD propagates shardings from the inputs (placed by `Layout.put` and the checkpoint loader) and
the `with_sharding_constraint`s that pin activations, KV cache and outputs (`model.forward`,
`lm._prefill`, `generate.generate_tokens`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jax_introspect.config import ModelConfig

DATA = "data"
TENSOR = "tensor"
MESH_AXES = (DATA, TENSOR)

# Logical axis -> mesh axis (None: replicated). The only place that decides who holds what.
DEFAULT_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ("batch", DATA),
    ("vocab", TENSOR),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("mlp", TENSOR),
    ("embed", None),
    ("residual_embed", TENSOR),  # d_model of the residuals handed back to the host (not kept)
    ("head_dim", None),
    ("layers", None),
    ("seq", None),
    ("cache_seq", None),
)

# The logical axes of every array other than the weights (those are declared in params.py), by role.
CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "head_dim", "cache_seq"),
    "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "valid": ("batch", "cache_seq"),
    "length": (),
}
INJECTION_AXES = {
    "layer": ("batch",), "strength": ("batch",), "vector": ("batch", "embed"), "start": ("batch",),
    "end": ("batch",), "norm_match": ("batch",),
}
SAMPLING_AXES = {"temperature": ("batch",), "top_p": ("batch",), "keys": ("batch", None)}
ACTIVATION_AXES = {
    "tokens": ("batch", "seq"),  # tokens, token_valid, generated ids
    "hidden": ("batch", "seq", "embed"),
    "logits": ("batch", "seq", "vocab"),
    "residuals": ("layers", "batch", "seq", "residual_embed"),
    "cache_k": CACHE_AXES["k"],
    "cache_v": CACHE_AXES["v"],
    "rows": ("batch",),
}


class LayoutError(ValueError):
    """A mesh or rule set that cannot hold this model on these devices."""


# --- meshes -----------------------------------------------------------------------------------

def parse_mesh_shape(spec: Union[str, Sequence[int]], n_devices: int) -> tuple[int, int]:
    """'2x4' / (2, 4) -> (data, tensor); one side may be -1 ('-1x8', '1x-1'): the rest of the devices."""
    if isinstance(spec, str):
        try:
            shape = tuple(int(s) for s in spec.lower().replace("*", "x").split("x"))
        except ValueError:
            raise LayoutError(f"mesh {spec!r}: write it as DATAxTENSOR, e.g. '2x4' or '1x-1'") from None
    else:
        shape = tuple(int(s) for s in spec)
    if len(shape) != 2 or any(s == 0 or s < -1 for s in shape) or shape == (-1, -1):
        raise LayoutError(f"mesh {spec!r}: need two axis sizes (data x tensor), positive or one -1")
    if -1 in shape:
        known = shape[0] if shape[1] == -1 else shape[1]
        if n_devices % known:
            raise LayoutError(f"mesh {spec!r}: {known} does not divide the {n_devices} devices")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if shape[0] * shape[1] != n_devices:
        raise LayoutError(
            f"mesh {spec!r} = {shape[0]}x{shape[1]} needs {shape[0] * shape[1]} devices but "
            f"{n_devices} are given: data x tensor must equal the device count (e.g. '1x{n_devices}')")
    return shape


def make_mesh(spec: Union[str, Sequence[int]] = "1x-1", devices: Optional[Sequence] = None) -> Mesh:
    """A (data, tensor) mesh with `AxisType.Auto` axes over `devices` (default: all of them, on
    every host). On TPU `jax.make_mesh` lays the tensor axis along the fastest interconnect."""
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_shape(spec, len(devices))
    auto = (AxisType.Auto, AxisType.Auto)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except AssertionError as e:
        # jax's TPU topology code asserts that the devices form a whole cuboid of chips
        # (mesh_utils._get_physical_tpu_mesh); a subset with holes cannot follow the torus.
        logging.warning("mesh %s over %d devices ignores the interconnect (the tensor axis may cross slow "
                        "links): jax.make_mesh cannot lay out a device subset that is not a whole slice (%s)",
                        "x".join(map(str, shape)), len(devices), e)
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def one_device_mesh() -> Mesh:
    """The mesh of a model on one device: 1x1, on this process's first device."""
    return make_mesh("1x1", jax.local_devices()[:1])


def mesh_of(shardings) -> Mesh:
    """The (data, tensor) mesh a pytree of shardings (or of arrays) lives on: the mesh of their
    `NamedSharding`s, or a 1x1 mesh on the one device that holds them all."""
    leaves = [getattr(x, "sharding", x) for x in jax.tree.leaves(shardings)]
    meshes = {s.mesh for s in leaves if isinstance(s, NamedSharding)}
    if len(meshes) == 1 and all(isinstance(s, NamedSharding) for s in leaves):
        mesh = meshes.pop()
        if tuple(mesh.axis_names) == MESH_AXES:
            return mesh
    devices = {d for s in leaves for d in s.device_set}
    if len(devices) == 1:
        return make_mesh("1x1", list(devices))
    raise LayoutError(f"parameters spread over {len(devices)} devices but not on one {MESH_AXES} mesh: "
                      "place them with sharding.make_mesh and Layout.params (or load with mesh=)")


# --- rules ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AxisRules:
    """Logical axis name -> mesh axis name (or None: replicated)."""

    rules: tuple[tuple[str, Optional[str]], ...] = DEFAULT_RULES

    def __post_init__(self):
        names = [n for n, _ in self.rules]
        if len(set(names)) != len(names):
            raise LayoutError(f"axis rules name a logical axis twice: {names}")

    def mesh_axis(self, logical: Optional[str]) -> Optional[str]:
        if logical is None:
            return None
        for name, axis in self.rules:
            if name == logical:
                return axis
        raise LayoutError(f"no axis rule for logical axis {logical!r}; rules cover {[n for n, _ in self.rules]}")

    def spec(self, logical_axes: Sequence[Optional[str]]) -> PartitionSpec:
        axes = [self.mesh_axis(a) for a in logical_axes]
        used = [a for a in axes if a is not None]
        if len(set(used)) != len(used):
            raise LayoutError(f"logical axes {tuple(logical_axes)} map twice onto one mesh axis: {axes}")
        return PartitionSpec(*axes)

    def replace(self, **changes: Optional[str]) -> "AxisRules":
        return AxisRules(tuple((n, changes.get(n, a)) for n, a in self.rules))


def kv_heads_for(cfg: ModelConfig, tensor: int) -> int:
    """KV heads held in memory on a `tensor`-way axis: the stored ones, or lcm(n_kv_heads, tensor)
    after duplicating each (always divides n_heads when tensor does)."""
    if cfg.n_kv_heads % tensor == 0:
        return cfg.n_kv_heads
    return math.lcm(cfg.n_kv_heads, tensor)


# --- the layout of one model on one mesh ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every array of one model lives on one mesh. Hashable: it is a static argument of the
    jitted forward and generate."""

    mesh: Mesh
    rules: AxisRules
    kv_heads: int  # KV heads held in memory (duplicated past n_kv_heads when tensor needs it)

    @classmethod
    def for_model(cls, mesh: Mesh, cfg: ModelConfig, rules: Optional[AxisRules] = None) -> "Layout":
        """Check that the mesh can hold `cfg` and adapt the rules to it."""
        rules = rules or AxisRules()
        if tuple(mesh.axis_names) != MESH_AXES:
            raise LayoutError(f"mesh axes {mesh.axis_names}: expected {MESH_AXES} (use sharding.make_mesh)")
        sizes = dict(mesh.shape)

        def ways(logical):
            axis = rules.mesh_axis(logical)
            return 1 if axis is None else sizes[axis]
        heads = ways("heads")
        if cfg.n_heads % heads:
            raise LayoutError(
                f"the {rules.mesh_axis('heads')!r} mesh axis of size {heads} does not divide the model's "
                f"n_heads={cfg.n_heads} query heads: choose a tensor size that divides {cfg.n_heads} "
                f"(e.g. {_divisors(cfg.n_heads)})")
        kv_ways = ways("kv_heads")
        kv_heads = kv_heads_for(cfg, kv_ways)
        if kv_heads != cfg.n_kv_heads:
            if cfg.n_heads % kv_heads:
                raise LayoutError(f"kv_heads split {kv_ways}-way needs lcm({cfg.n_kv_heads}, {kv_ways})="
                                  f"{kv_heads} KV heads, which does not divide n_heads={cfg.n_heads}")
            logging.info("tensor axis %d > %d KV heads: each KV head is held as %d copies (%d in all)",
                         kv_ways, cfg.n_kv_heads, kv_heads // cfg.n_kv_heads, kv_heads)
        # Axes that do not split evenly are replicated rather than padded.
        changes = {}
        for logical, size in (("vocab", cfg.vocab_size), ("mlp", cfg.d_ff), ("embed", cfg.d_model),
                              ("residual_embed", cfg.d_model), ("head_dim", cfg.head_dim),
                              ("layers", cfg.n_layers)):
            if size % ways(logical):
                logging.warning("%s=%d does not split %d-way: replicated", logical, size, ways(logical))
                changes[logical] = None
        return cls(mesh=mesh, rules=rules.replace(**changes) if changes else rules, kv_heads=kv_heads)

    # --- basic pieces
    @property
    def data_size(self) -> int:
        axis = self.rules.mesh_axis("batch")
        return 1 if axis is None else dict(self.mesh.shape)[axis]

    @property
    def tensor_size(self) -> int:
        return dict(self.mesh.shape)[TENSOR]

    def spec(self, *logical: Optional[str]) -> PartitionSpec:
        return self.rules.spec(logical)

    def sharding(self, *logical: Optional[str]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(*logical))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def run_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config the jitted programs run with: `cfg` with the KV heads held in memory."""
        return cfg if cfg.n_kv_heads == self.kv_heads else dataclasses.replace(cfg, n_kv_heads=self.kv_heads)

    # --- shardings of the model's pytrees
    def params(self, cfg: ModelConfig):
        from jax_introspect import model as model_lib
        return model_lib.params_tree(cfg, lambda leaf: self.sharding(*leaf.param_axes))

    def cache(self):
        from jax_introspect import model as model_lib
        return model_lib.KVCache(**{n: self.sharding(*a) for n, a in CACHE_AXES.items()})

    def injection(self):
        from jax_introspect.inject import Injection
        return Injection(**{n: self.sharding(*a) for n, a in INJECTION_AXES.items()})

    def sampling(self):
        from jax_introspect.generate import Sampling
        return Sampling(**{n: self.sharding(*a) for n, a in SAMPLING_AXES.items()})

    # --- moving data
    def constrain(self, x: jax.Array, *logical: Optional[str]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(*logical))

    def pin(self, x: jax.Array, role: str) -> jax.Array:
        """Constrain an activation by its role in ACTIVATION_AXES ('hidden', 'logits', ...)."""
        return self.constrain(x, *ACTIVATION_AXES[role])

    def of(self, role: str) -> NamedSharding:
        return self.sharding(*ACTIVATION_AXES[role])

    def constrain_cache(self, cache):
        return jax.tree.map(jax.lax.with_sharding_constraint, cache, self.cache())

    def put(self, tree, shardings):
        """Host arrays (the same on every process) -> global arrays with `shardings` (a matching
        pytree or one sharding). Each process copies in only the slices its devices hold."""
        def one(x, sharding):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
        if isinstance(shardings, jax.sharding.Sharding):
            return jax.tree.map(lambda x: one(x, shardings), tree)
        return jax.tree.map(one, tree, shardings)

    def __repr__(self):
        shape = "x".join(str(s) for s in self.mesh.devices.shape)
        return f"Layout(mesh={shape} {MESH_AXES}, kv_heads={self.kv_heads})"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and d <= 64]


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host) array as numpy on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- sizing ----------------------------------------------------------------------------------

def per_device_bytes(cfg: ModelConfig, data: int, tensor: int, batch: int, prompt_len: int, new_tokens: int,
                     param_bytes: int = 2, cache_bytes: int = 2, linear_bytes: Optional[int] = None) -> dict[str, int]:
    """HBM one device needs under the default rules: weights split `tensor`-way (KV projections
    duplicated to lcm(n_kv_heads, tensor) heads) and replicated over `data`; the KV cache of
    ceil(batch / data) rows x (prompt_len + new_tokens) slots; the float32 prefill logits
    (last column only, vocab split). XLA's other scratch is not counted. `linear_bytes`: per
    element of the decoder layers' projections (default `param_bytes`; 1 for an FP8 checkpoint
    run 'fp8_dynamic', whose float32 scales, one per output channel, are left out)."""
    def part(n, logical):
        ways = tensor if AxisRules().mesh_axis(logical) == TENSOR else 1
        return n / ways if n % ways == 0 else n
    kv = kv_heads_for(cfg, tensor)
    D, H, hd, F, V, L = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    projections = 2 * D * part(H, "heads") * hd + 2 * D * part(kv, "kv_heads") * hd + 3 * D * part(F, "mlp")
    per_layer = 2 * D * param_bytes + projections * (param_bytes if linear_bytes is None else linear_bytes)
    weights = L * per_layer + ((1 if cfg.tie_word_embeddings else 2) * part(V, "vocab") * D + D) * param_bytes
    rows = -(-batch // data)
    kv_cache = 2 * L * rows * (prompt_len + new_tokens) * part(kv, "kv_heads") * hd * cache_bytes
    logits = rows * part(V, "vocab") * 4
    return {"weights": int(weights), "kv_cache": int(kv_cache), "logits": int(logits),
            "total": int(weights + kv_cache + logits), "kv_heads": kv}
