"""Adapters as data: LoRA on chosen projections and layers, and a trained residual bias vector.

An `Adapter` is a pytree of arrays (its LoRA scale is a static field). Like an `Injection`, it
rides through the jitted programs as a traced argument, so two adapters of one shape (same
targets, rank, model) run in the same compiled program. Inside the scanned decoder
(`model.forward(..., adapter=...)`), layer i computes, for every target projection `w`
(one of wq wk wv wo w_gate w_up w_down; `x` the projection's input, in its dtype):

    y = x @ w_i  +  scale * lora_mask[i] * ((x @ a_i) @ b_i)          scale = alpha / rank (peft's)

and after the MLP's residual addition, before an injection's:

    h = h + bias_mask[i] * bias[i]

A zero-initialised adapter (b = 0, bias = 0) adds exact zeros: logits equal the base model's bit
for bit. The masks are multipliers, so the gradients of layers the spec leaves out are exactly 0.

Array layouts follow the weights (`params.LAYER`, ours = HF's `.T` with heads split out):
`a` is [L, *in_axes, r] and `b` is [L, r, *out_axes], e.g. wq ([D, H, hd]): a [L, D, r],
b [L, r, H, hd]; wo ([H, hd, D]): a [L, H, hd, r], b [L, r, D]. peft's `lora_A.weight` [r, in] is
`a[i].reshape(in, r).T`, its `lora_B.weight` [out, r] is `b[i].reshape(r, out).T`.

This module is on the model side: it imports nothing from `jax_introspect.experiment`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import uuid
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect import folders
from jax_introspect import params as params_lib
from jax_introspect.config import ModelConfig

SPEC_FILE = "adapter.json"
ARRAYS_FILE = "adapter.npz"
FORMAT = 1
# The projections LoRA can adapt: the decoder layers' linear weights, in `params.LAYER` order.
TARGETS: tuple[str, ...] = tuple(leaf.name for leaf in params_lib.LAYER if leaf.is_linear)
# Our names -> peft / HF module names (LoraConfig(target_modules=...)).
HF_MODULES = {leaf.name: leaf.hf_module.rsplit(".", 1)[-1] for leaf in params_lib.LAYER if leaf.is_linear}


class AdapterError(ValueError):
    """An adapter (or its spec) that does not fit the model, or a folder that is not an adapter."""


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is, as data (JSON-able with `to_dict` / `from_dict`)."""

    rank: int = 8
    alpha: float = 16.0  # LoRA scaling = alpha / rank (peft's default, not rslora)
    targets: tuple[str, ...] = ("wq", "wv")  # LayerParams weights: wq wk wv wo w_gate w_up w_down
    layers: tuple[int, ...] = ()  # decoder layers LoRA applies to; () = all
    bias_layers: tuple[int, ...] = ()  # layers whose output gets a trained residual bias; () = none

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "bias_layers", tuple(self.bias_layers))

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)

    def lora_layers(self, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(self.layers) if self.layers else tuple(range(cfg.n_layers))

    def to_dict(self) -> dict:
        return {"rank": int(self.rank), "alpha": float(self.alpha), "targets": list(self.targets),
                "layers": [int(i) for i in self.layers], "bias_layers": [int(i) for i in self.bias_layers]}

    @classmethod
    def from_dict(cls, data) -> "AdapterSpec":
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise AdapterError(f"adapter spec: unknown fields {sorted(unknown)}; the fields are "
                               f"{[f.name for f in dataclasses.fields(cls)]}")
        for field in ("targets", "layers", "bias_layers"):
            if field in data:
                value = data[field]
                if isinstance(value, (str, int)):
                    raise AdapterError(f"adapter spec: {field} must be a list, got {value!r}")
                data[field] = tuple(value)
        return cls(**data)

    def validate(self, cfg: ModelConfig) -> None:
        """Refuse a spec that `cfg`'s model cannot run, naming the field."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise AdapterError(f"adapter spec: rank={self.rank!r} must be an integer >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.number)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise AdapterError(f"adapter spec: alpha={self.alpha!r} must be a finite number > 0")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise AdapterError(f"adapter spec: targets {unknown} are not projections of a decoder layer; choose "
                               f"from {list(TARGETS)} (HF names {[HF_MODULES[t] for t in TARGETS]})")
        if len(set(self.targets)) != len(self.targets):
            raise AdapterError(f"adapter spec: targets {list(self.targets)} name a projection twice")
        if not self.targets and not self.bias_layers:
            raise AdapterError("adapter spec: targets and bias_layers are both empty: the adapter would change nothing")
        if self.targets and self.rank > min(min(_in_out(t, cfg)) for t in self.targets):
            raise AdapterError(f"adapter spec: rank={self.rank} exceeds the smallest dimension "
                               f"({min(min(_in_out(t, cfg)) for t in self.targets)}) of the targets {list(self.targets)}")
        for field in ("layers", "bias_layers"):
            values = getattr(self, field)
            bad = [i for i in values if isinstance(i, bool) or not isinstance(i, (int, np.integer))
                   or not 0 <= i < cfg.n_layers]
            if bad:
                raise AdapterError(f"adapter spec: {field} {bad} out of range: the model has layers 0..{cfg.n_layers - 1}")
            if len(set(values)) != len(values):
                raise AdapterError(f"adapter spec: {field} {list(values)} names a layer twice")
        quantized = [t for t in self.targets if params_lib.is_quantized(t, cfg)]
        if quantized:
            raise AdapterError(f"adapter spec: targets {quantized} are FP8 weights under numerics 'fp8_dynamic'; "
                               "LoRA runs on dequantized weights only: load the model with numerics='dequantized' "
                               "or leave those targets out")


@flax.struct.dataclass
class LoRA:
    a: jax.Array  # [L, *in_axes, r]
    b: jax.Array  # [L, r, *out_axes]


@flax.struct.dataclass
class Adapter:
    lora: dict  # target name -> LoRA (only the spec's targets)
    lora_mask: jax.Array  # [L] float32: 1.0 on the spec's layers
    bias: jax.Array  # [L, D] float32 (rows of layers not in bias_layers stay 0)
    bias_mask: jax.Array  # [L] float32
    scale: float = flax.struct.field(pytree_node=False)  # alpha / rank


# --- shapes and axes -------------------------------------------------------------------------------

def _leaf(target: str) -> params_lib.Leaf:
    return params_lib.by_name(target)


def _in_out(target: str, cfg: ModelConfig) -> tuple[int, int]:
    """(fan_in, fan_out) of a projection: HF's [out, in] sizes."""
    leaf = _leaf(target)
    return (math.prod(params_lib.axis_size(cfg, a) for a in leaf.hf_in),
            math.prod(params_lib.axis_size(cfg, a) for a in leaf.hf_out))


def lora_axes(target: str) -> tuple[tuple, tuple]:
    """Logical axes of (a, b) for `target`: a = (layers, *in_axes, None), b = (layers, None, *out_axes);
    the rank axis is replicated."""
    leaf = _leaf(target)
    return ((params_lib.LAYER_AXIS,) + leaf.hf_in + (None,), (params_lib.LAYER_AXIS, None) + leaf.hf_out)


BIAS_AXES = (params_lib.LAYER_AXIS, "embed")
MASK_AXES = (params_lib.LAYER_AXIS,)


def _size(cfg: ModelConfig, axis: Optional[str], rank: int) -> int:
    return rank if axis is None else params_lib.axis_size(cfg, axis)


def lora_shapes(target: str, cfg: ModelConfig, rank: int) -> tuple[tuple, tuple]:
    a_axes, b_axes = lora_axes(target)
    return tuple(_size(cfg, x, rank) for x in a_axes), tuple(_size(cfg, x, rank) for x in b_axes)


def _masks(spec: AdapterSpec, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    lora_mask = np.zeros((cfg.n_layers,), np.float32)
    if spec.targets:
        lora_mask[list(spec.lora_layers(cfg))] = 1.0
    bias_mask = np.zeros((cfg.n_layers,), np.float32)
    bias_mask[list(spec.bias_layers)] = 1.0
    return lora_mask, bias_mask


def rank_of(adapter: Adapter) -> int:
    return int(next(iter(adapter.lora.values())).a.shape[-1]) if adapter.lora else 0


# --- building --------------------------------------------------------------------------------------

def init(spec: AdapterSpec, cfg: ModelConfig, key, dtype=jnp.float32) -> Adapter:
    """A fresh adapter: `a` as peft initialises lora_A (kaiming_uniform(a=sqrt(5)), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))), b = 0, bias = 0: the base model, exactly."""
    spec.validate(cfg)
    lora = {}
    keys = jax.random.split(key, max(len(spec.targets), 1))
    for k, target in zip(keys, sorted(spec.targets)):
        a_shape, b_shape = lora_shapes(target, cfg, spec.rank)
        bound = 1.0 / math.sqrt(_in_out(target, cfg)[0])
        lora[target] = LoRA(a=jax.random.uniform(k, a_shape, dtype, -bound, bound), b=jnp.zeros(b_shape, dtype))
    lora_mask, bias_mask = _masks(spec, cfg)
    return Adapter(lora=lora, lora_mask=jnp.asarray(lora_mask), bias=jnp.zeros((cfg.n_layers, cfg.d_model), jnp.float32),
                   bias_mask=jnp.asarray(bias_mask), scale=spec.scale)


def trainable(adapter: Adapter) -> Adapter:
    """Bools of `adapter`'s structure: True for the LoRA factors and the bias, False for the masks.
    The masks get zero gradients but must not move under weight decay either: train with
    `optax.multi_transform({True: optimizer, False: optax.set_to_zero()}, adapters.trainable(adapter))`
    (not `optax.masked`, which passes the masked leaves' raw gradients through)."""
    return Adapter(lora={t: LoRA(a=True, b=True) for t in adapter.lora}, lora_mask=False, bias=True,
                   bias_mask=False, scale=adapter.scale)


def check(adapter: Adapter, cfg: ModelConfig, spec: Optional[AdapterSpec] = None) -> None:
    """Refuse an adapter whose arrays do not fit `cfg` (or `spec`, when given), naming the array."""
    if not isinstance(adapter, Adapter):
        raise AdapterError(f"expected an adapters.Adapter, got {type(adapter).__name__}")
    unknown = [t for t in adapter.lora if t not in TARGETS]
    if unknown:
        raise AdapterError(f"adapter has LoRA for {unknown}, which are not projections; choose from {list(TARGETS)}")
    rank = rank_of(adapter)
    expected = {}
    for target in adapter.lora:
        a_shape, b_shape = lora_shapes(target, cfg, rank)
        expected[f"lora.{target}.a"], expected[f"lora.{target}.b"] = a_shape, b_shape
    expected.update({"lora_mask": (cfg.n_layers,), "bias": (cfg.n_layers, cfg.d_model), "bias_mask": (cfg.n_layers,)})
    for name, array in flat_arrays(adapter).items():
        if tuple(np.shape(array)) != expected[name]:
            raise AdapterError(f"adapter array {name} has shape {tuple(np.shape(array))} but this model "
                               f"(d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
                               f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, d_ff={cfg.d_ff}) needs "
                               f"{expected[name]}: the adapter was made for another model")
    if spec is not None:
        if sorted(adapter.lora) != sorted(spec.targets):
            raise AdapterError(f"adapter has LoRA for {sorted(adapter.lora)} but its spec's targets are {sorted(spec.targets)}")
        if adapter.lora and rank != spec.rank:
            raise AdapterError(f"adapter has rank {rank} but its spec says rank={spec.rank}")
        if not math.isclose(adapter.scale, spec.scale, rel_tol=1e-12):
            raise AdapterError(f"adapter scale {adapter.scale} != spec alpha/rank = {spec.scale}")
        lora_mask, bias_mask = _masks(spec, cfg)
        if not (np.array_equal(np.asarray(adapter.lora_mask), lora_mask)
                and np.array_equal(np.asarray(adapter.bias_mask), bias_mask)):
            raise AdapterError(f"adapter masks do not match its spec's layers={list(spec.layers)} / "
                               f"bias_layers={list(spec.bias_layers)}")


def spec_of(adapter: Adapter, cfg: ModelConfig) -> AdapterSpec:
    """The spec an adapter's arrays and masks describe."""
    rank = rank_of(adapter)
    mask = np.asarray(adapter.lora_mask) > 0
    layers = () if mask.all() else tuple(int(i) for i in np.flatnonzero(mask))
    return AdapterSpec(rank=max(rank, 1), alpha=adapter.scale * max(rank, 1), targets=tuple(sorted(adapter.lora)),
                       layers=layers if adapter.lora else (),
                       bias_layers=tuple(int(i) for i in np.flatnonzero(np.asarray(adapter.bias_mask) > 0)))


# --- the computation (called inside model.forward's scanned layer, on one layer's slices) ----------

def lora_delta(layer_adapter: Adapter, target: str, x: jax.Array, precision) -> jax.Array:
    """scale * mask * ((x @ a) @ b) for one layer (`layer_adapter` holds that layer's slices), in
    x's dtype; the output has x's free axes then the weight's output axes."""
    lora = layer_adapter.lora[target]
    n_in = lora.a.ndim - 1
    xa = jnp.tensordot(x, lora.a.astype(x.dtype), axes=n_in, precision=precision)
    # scale * mask is folded into b (r x out, small): the delta then reaches the projection's output
    # as a plain matmul result, which keeps a zero adapter's programs bit for bit on the base model's
    # values (a multiply feeding the add would let the compiler contract it into other FMAs).
    b = (layer_adapter.scale * jax.lax.stop_gradient(layer_adapter.lora_mask) * lora.b).astype(x.dtype)
    return jnp.tensordot(xa, b, axes=1, precision=precision)


def bias_delta(layer_adapter: Adapter, dtype) -> jax.Array:
    """bias_mask * bias of one layer ([D]), in `dtype`."""
    return (jax.lax.stop_gradient(layer_adapter.bias_mask) * layer_adapter.bias).astype(dtype)


# --- placement -------------------------------------------------------------------------------------

def shardings(adapter_or_spec, cfg: ModelConfig, layout) -> Adapter:
    """`NamedSharding`s of an adapter on `layout`, by the rules of the weights it adapts: `a`'s input
    axes as the weight's input axes, `b`'s output axes as its output axes, the rank and the layer axis
    replicated (the layer axis follows the 'layers' rule), the bias like the model width ('embed')."""
    if isinstance(adapter_or_spec, AdapterSpec):
        targets, scale = adapter_or_spec.targets, adapter_or_spec.scale
    else:
        targets, scale = tuple(adapter_or_spec.lora), adapter_or_spec.scale
    lora = {}
    for target in targets:
        a_axes, b_axes = lora_axes(target)
        lora[target] = LoRA(a=layout.sharding(*a_axes), b=layout.sharding(*b_axes))
    return Adapter(lora=lora, lora_mask=layout.sharding(*MASK_AXES), bias=layout.sharding(*BIAS_AXES),
                   bias_mask=layout.sharding(*MASK_AXES), scale=scale)


def for_run(adapter: Adapter, cfg: ModelConfig, run_cfg: ModelConfig) -> Adapter:
    """`adapter` (shaped for `cfg`) for a model that holds `run_cfg.n_kv_heads` KV heads: the
    output side of wk/wv LoRA repeated per KV head as the loader repeats wk/wv (head j -> j // copies)."""
    if run_cfg.n_kv_heads == cfg.n_kv_heads:
        return adapter
    copies = run_cfg.n_kv_heads // cfg.n_kv_heads
    lora = dict(adapter.lora)
    for target, factors in adapter.lora.items():
        _, b_axes = lora_axes(target)
        if "kv_heads" in b_axes:
            lora[target] = LoRA(a=factors.a, b=np.repeat(np.asarray(factors.b), copies, axis=b_axes.index("kv_heads")))
    return adapter.replace(lora=lora)


def place(adapter: Adapter, cfg: ModelConfig, layout) -> Adapter:
    """Check `adapter` against `cfg` (the stored config) and put it on `layout`'s mesh (KV heads
    repeated as the layout holds them)."""
    check(adapter, cfg)
    run = for_run(adapter, cfg, layout.run_config(cfg))
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), run)
    return layout.put(host, shardings(host, layout.run_config(cfg), layout))


# --- files -----------------------------------------------------------------------------------------

def flat_arrays(adapter: Adapter) -> dict[str, Any]:
    """name -> array: lora.<target>.a / .b, lora_mask, bias, bias_mask."""
    out = {}
    for target in sorted(adapter.lora):
        out[f"lora.{target}.a"] = adapter.lora[target].a
        out[f"lora.{target}.b"] = adapter.lora[target].b
    out.update(lora_mask=adapter.lora_mask, bias=adapter.bias, bias_mask=adapter.bias_mask)
    return out


def digest(adapter: Adapter) -> str:
    """sha256 of what the adapter computes: its scale and every array as float32 (an adapter and its
    saved copy have one digest; metadata does not count)."""
    h = hashlib.sha256(f"jax_introspect.adapter/{FORMAT}/scale={float(adapter.scale)!r}".encode())
    for name, array in flat_arrays(adapter).items():
        array = np.ascontiguousarray(np.asarray(array, np.float32))
        h.update(f"|{name}:{array.shape}|".encode())
        h.update(array.tobytes())
    return "sha256:" + h.hexdigest()


def save(path: str, adapter: Adapter, spec: AdapterSpec, metadata: Optional[dict] = None) -> None:
    """Write `adapter` to the folder `path` (adapter.json: spec, shapes, digest, metadata;
    adapter.npz: float32 arrays). Written into a staging folder and renamed into place; an existing
    adapter folder at `path` is replaced."""
    if set(adapter.lora) != set(spec.targets):
        raise AdapterError(f"adapter has LoRA for {sorted(adapter.lora)} but the spec's targets are {sorted(spec.targets)}")
    arrays = {name: np.asarray(x, np.float32) for name, x in flat_arrays(adapter).items()}
    record = {"format": FORMAT, "spec": spec.to_dict(), "scale": float(adapter.scale), "digest": digest(adapter),
              "shapes": {n: list(a.shape) for n, a in arrays.items()}, "metadata": dict(metadata or {})}
    json.dumps(record)  # refuse metadata that is not JSON before anything is written
    path = os.path.normpath(path)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, SPEC_FILE)):
        raise AdapterError(f"{path} exists and is not an adapter folder: choose another path")
    staging = f"{path}.incomplete-{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)
    try:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with open(os.path.join(staging, ARRAYS_FILE), "wb") as f:
            f.write(buffer.getvalue())
        with open(os.path.join(staging, SPEC_FILE), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        folders.swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_spec(path: str) -> tuple[AdapterSpec, dict]:
    """(spec, the whole adapter.json record) of an adapter folder, without its arrays."""
    spec_path = os.path.join(path, SPEC_FILE)
    if not os.path.isfile(spec_path):
        raise AdapterError(f"{path} is not an adapter folder (no {SPEC_FILE}); write one with adapters.save")
    try:
        with open(spec_path) as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{spec_path} is not valid JSON ({e})") from e
    if record.get("format") != FORMAT:
        raise AdapterError(f"{spec_path}: format {record.get('format')!r}, this version reads format {FORMAT}")
    return AdapterSpec.from_dict(record["spec"]), record


def check_folder(path: str, cfg: ModelConfig) -> AdapterSpec:
    """The spec of the adapter folder `path`, checked against `cfg` (spec and recorded shapes):
    cheap, for before the weights load."""
    spec, record = read_spec(path)
    try:
        spec.validate(cfg)
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None
    expected = {"bias": [cfg.n_layers, cfg.d_model], "lora_mask": [cfg.n_layers], "bias_mask": [cfg.n_layers]}
    for target in spec.targets:
        a_shape, b_shape = lora_shapes(target, cfg, spec.rank)
        expected[f"lora.{target}.a"], expected[f"lora.{target}.b"] = list(a_shape), list(b_shape)
    shapes = record.get("shapes", {})
    if shapes.get("bias") and shapes["bias"][-1] != cfg.d_model:
        raise AdapterError(f"{path}: the adapter was made for d_model={shapes['bias'][-1]} but this model has "
                           f"d_model={cfg.d_model}: it belongs to another model")
    if shapes.get("bias") and shapes["bias"][0] != cfg.n_layers:
        raise AdapterError(f"{path}: the adapter was made for n_layers={shapes['bias'][0]} but this model has "
                           f"n_layers={cfg.n_layers}: it belongs to another model")
    for name, shape in expected.items():
        if list(shapes.get(name, [])) != shape:
            raise AdapterError(f"{path}: array {name} has shape {shapes.get(name)} but this model needs {shape} "
                               f"(d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, "
                               f"head_dim={cfg.head_dim}, d_ff={cfg.d_ff}): it belongs to another model")
    return spec


def load(path: str, cfg: ModelConfig, layout=None) -> tuple[Adapter, AdapterSpec, dict]:
    """(adapter, spec, metadata) from a folder written by `save`, checked against `cfg` (the model's
    config; under numerics 'fp8_dynamic', the config it runs with). With `layout`, the adapter is
    placed on its mesh (`place`); otherwise its arrays are host numpy float32."""
    spec = check_folder(path, cfg)
    _, record = read_spec(path)
    try:
        with np.load(os.path.join(path, ARRAYS_FILE)) as data:
            arrays = {name: np.asarray(data[name], np.float32) for name in data.files}
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read {ARRAYS_FILE} ({e})") from e
    try:
        adapter = Adapter(lora={t: LoRA(a=arrays[f"lora.{t}.a"], b=arrays[f"lora.{t}.b"]) for t in spec.targets},
                          lora_mask=arrays["lora_mask"], bias=arrays["bias"], bias_mask=arrays["bias_mask"],
                          scale=spec.scale)
    except KeyError as e:
        raise AdapterError(f"{path}: {ARRAYS_FILE} has no array {e}") from None
    check(adapter, cfg, spec)
    if record.get("digest") and digest(adapter) != record["digest"]:
        raise AdapterError(f"{path}: the arrays' digest {digest(adapter)} differs from the one recorded in "
                           f"{SPEC_FILE} ({record['digest']}): the folder is damaged or was edited")
    if layout is not None:
        adapter = place(adapter, cfg, layout)
    return adapter, spec, dict(record.get("metadata", {}))
