"""Every parameter leaf of the model, declared once.

A `Leaf` says what one weight is: its name (the field of `model.LayerParams` / `model.Params`
and the array's name in a stored checkpoint unit), its logical axes (from which its shape follows
through the config's sizes, and its sharding through `sharding.AxisRules`), the HF tensor it is
converted from, and how HF's array maps to ours. The model, the sharding layout, the converter
and the checkpoint reader all read this table; nothing else lists the weights.

HF stores a linear layer as `[out, in]`. A linear leaf names HF's flattening (`hf_in`, `hf_out`:
the logical axes HF's `in` and `out` dimensions cover, in order) and its stored order (`axes`, a
permutation of `hf_out + hf_in`): ours = `hf.reshape(out sizes + in sizes).transpose(to axes)`.
The stored order is the one XLA's TPU compiler wants for each matmul inside the scanned decoder:
in any other order it copies the whole [n_layers, ...] stack of that weight once per program to
change its layout (measured: 10 GB of 13.6 GB per chip for the 405B on v6e-64; docs/tpu.md,
tests/test_tpu_compile.py). So the query/key/value projections are stored head-major
(`wq [H, D, hd]`: one [D, hd] matrix per head), the MLP's gate and up projections as HF holds
them (`[F, D]`: a chip's slice of F, 832 rows for the 405B on 64 chips, is no multiple of the TPU's
128-wide tiles, and as the minor axis it made XLA re-tile the stack), `wo [H, hd, D]` and
`w_down [F, D]` in = out order. Norms and the embedding are stored as HF holds them. The LM head
is a linear layer too (`[vocab, embed]` in HF, `[embed, vocab]` here), present only when it is not
tied to the embedding.

FP8 checkpoints (compressed-tensors FP8-dynamic, `config.Quantization`): a quantized linear weight
is stored as float8_e4m3fn in the same layout, and its per-output-channel scale (HF
`..._proj.weight_scale`, `[out, 1]`) as the leaf `<weight>_scale`, whose axes are the weight's
output axes (so it is sharded like them). A scale leaf is present only when its weight is quantized.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np

from jax_introspect.config import ConfigError, ModelConfig

# Logical axis -> the ModelConfig field that sizes it.
_AXIS_SIZE_FIELDS = {
    "embed": "d_model",
    "heads": "n_heads",
    "kv_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "mlp": "d_ff",
    "vocab": "vocab_size",
    "layers": "n_layers",
}

LAYER_AXIS = "layers"  # the leading axis of every decoder-layer weight in `Params`


def axis_size(cfg: ModelConfig, logical: str) -> int:
    return getattr(cfg, _AXIS_SIZE_FIELDS[logical])


@dataclasses.dataclass(frozen=True)
class Leaf:
    name: str
    axes: tuple[str, ...]  # logical axes of one stored array (a layer's weight without the layer axis)
    hf_name: str  # HF tensor name; '{layer}' stands for the decoder layer's index
    hf_in: tuple[str, ...] = ()  # linear weights: the logical axes HF's `in` dimension flattens, in order
    hf_out: tuple[str, ...] = ()  # linear weights and scales: the axes of HF's `out` dimension
    per_layer: bool = False  # one per decoder layer, stacked on a leading layer axis in `Params`
    untied_only: bool = False  # present only when the LM head is not tied to the embedding
    scale_of: str = ""  # the per-output-channel scale of this FP8 weight; present only when it is quantized

    def __post_init__(self):
        if self.hf_in and sorted(self.axes) != sorted(self.hf_out + self.hf_in):
            raise ValueError(f"{self.name}: stored axes {self.axes} are not a permutation of HF's out {self.hf_out} "
                             f"+ in {self.hf_in}")

    @property
    def is_linear(self) -> bool:
        return bool(self.hf_in)

    def present(self, cfg: ModelConfig) -> bool:
        """Whether a model of `cfg` has this leaf."""
        if self.untied_only and cfg.tie_word_embeddings:
            return False
        return is_quantized(self.scale_of, cfg) if self.scale_of else True

    @property
    def param_axes(self) -> tuple[str, ...]:
        """Logical axes of the array as `Params` holds it (layer weights stacked)."""
        return (LAYER_AXIS,) + self.axes if self.per_layer else self.axes

    def unit_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Shape of one stored array: a global, or one layer's weight."""
        return tuple(axis_size(cfg, a) for a in self.axes)

    def scale_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """A linear weight's per-output-channel scale, reshaped to broadcast against one stored weight
        (size 1 on the input axes; the output axes appear in `axes` in HF's order)."""
        return tuple(axis_size(cfg, a) if a in self.hf_out else 1 for a in self.axes)

    def param_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(axis_size(cfg, a) for a in self.param_axes)

    def hf_tensor(self, layer: int | None = None) -> str:
        return self.hf_name.format(layer=layer)

    def hf_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        if self.scale_of:
            return math.prod(self.unit_shape(cfg)), 1  # compressed-tensors' channel scales: [out, 1]
        if not self.is_linear:
            return self.unit_shape(cfg)
        size = lambda axes: math.prod(axis_size(cfg, a) for a in axes)  # noqa: E731
        return size(self.hf_out), size(self.hf_in)  # [out, in]

    def from_hf(self, array: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        """HF's array (in `hf_shape`) as ours (in `unit_shape`)."""
        if self.scale_of:
            return array.reshape(self.unit_shape(cfg))
        if not self.is_linear:
            return array
        hf_axes = self.hf_out + self.hf_in
        split = array.reshape(tuple(axis_size(cfg, a) for a in hf_axes))
        return split.transpose(tuple(hf_axes.index(a) for a in self.axes))

    @property
    def hf_module(self) -> str:
        """The HF module this weight belongs to ('{layer}' for the layer index), e.g. model.layers.{layer}.mlp.up_proj."""
        return self.hf_name.rsplit(".", 1)[0]


def _layer(name: str, axes: tuple[str, ...], hf_suffix: str, hf_in: tuple[str, ...] = (),
           hf_out: tuple[str, ...] = ()) -> Leaf:
    return Leaf(name, axes, f"model.layers.{{layer}}.{hf_suffix}", hf_in=hf_in, hf_out=hf_out, per_layer=True)


def _scale(weight: Leaf) -> Leaf:
    """The per-output-channel scale of `weight` when it is stored as FP8: its output axes, in HF's
    order (they broadcast against the projection's output)."""
    return dataclasses.replace(weight, name=scale_name(weight.name), axes=weight.hf_out, hf_in=(),
                               hf_name=weight.hf_module + ".weight_scale", scale_of=weight.name)


def scale_name(weight: str) -> str:
    return f"{weight}_scale"


_LAYER_WEIGHTS: tuple[Leaf, ...] = (
    _layer("attn_norm", ("embed",), "input_layernorm.weight"),
    _layer("wq", ("heads", "embed", "head_dim"), "self_attn.q_proj.weight", ("embed",), ("heads", "head_dim")),
    _layer("wk", ("kv_heads", "embed", "head_dim"), "self_attn.k_proj.weight", ("embed",), ("kv_heads", "head_dim")),
    _layer("wv", ("kv_heads", "embed", "head_dim"), "self_attn.v_proj.weight", ("embed",), ("kv_heads", "head_dim")),
    _layer("wo", ("heads", "head_dim", "embed"), "self_attn.o_proj.weight", ("heads", "head_dim"), ("embed",)),
    _layer("mlp_norm", ("embed",), "post_attention_layernorm.weight"),
    _layer("w_gate", ("mlp", "embed"), "mlp.gate_proj.weight", ("embed",), ("mlp",)),
    _layer("w_up", ("mlp", "embed"), "mlp.up_proj.weight", ("embed",), ("mlp",)),
    _layer("w_down", ("mlp", "embed"), "mlp.down_proj.weight", ("mlp",), ("embed",)),
)
_GLOBAL_WEIGHTS: tuple[Leaf, ...] = (
    Leaf("embed", ("vocab", "embed"), "model.embed_tokens.weight"),
    Leaf("final_norm", ("embed",), "model.norm.weight"),
    Leaf("lm_head", ("embed", "vocab"), "lm_head.weight", hf_in=("embed",), hf_out=("vocab",), untied_only=True),
)
# Order = the fields of model.LayerParams / model.Params and the arrays of a stored unit: the
# weights, then the scales of the linear ones (present only in FP8 checkpoints).
LAYER: tuple[Leaf, ...] = _LAYER_WEIGHTS + tuple(_scale(w) for w in _LAYER_WEIGHTS if w.is_linear)
GLOBAL: tuple[Leaf, ...] = _GLOBAL_WEIGHTS + tuple(_scale(w) for w in _GLOBAL_WEIGHTS if w.is_linear)
LINEAR: tuple[Leaf, ...] = tuple(w for w in _LAYER_WEIGHTS + _GLOBAL_WEIGHTS if w.is_linear)  # may be FP8
_BY_NAME = {leaf.name: leaf for leaf in LAYER + GLOBAL}


def by_name(name: str) -> Leaf:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown parameter {name!r}; the parameters are {sorted(_BY_NAME)}") from None


def global_leaves(cfg: ModelConfig) -> tuple[Leaf, ...]:
    """The weights outside the layer stack that `cfg` has (no `lm_head` when it is tied; scales of
    FP8 weights only)."""
    return tuple(g for g in GLOBAL if g.present(cfg))


def layer_leaves(cfg: ModelConfig) -> tuple[Leaf, ...]:
    """The leaves of one decoder layer that `cfg` has (scales of FP8 weights only)."""
    return tuple(leaf for leaf in LAYER if leaf.present(cfg))


def unit_shapes(cfg: ModelConfig, leaves: tuple[Leaf, ...]) -> dict[str, tuple[int, ...]]:
    """Name -> stored shape of each of `leaves` that `cfg` has (one unit: `GLOBAL` or `LAYER`)."""
    return {leaf.name: leaf.unit_shape(cfg) for leaf in leaves if leaf.present(cfg)}


# --- FP8 weights ---------------------------------------------------------------------------------

FP8 = np.dtype("float8_e4m3fn")  # ml_dtypes' (registered with numpy by jax)
SCALE_DTYPE = np.dtype(np.float32)  # what vLLM holds the weight scales in (BF16/F16 ones convert exactly)


def is_quantized(weight: str, cfg: ModelConfig) -> bool:
    return cfg.quantization is not None and weight in cfg.quantization.weights


def stored_dtype(leaf: Leaf, cfg: ModelConfig, dtype) -> np.dtype:
    """The dtype `leaf` is held in by a model of `cfg` whose other weights are `dtype`: FP8 weights
    as stored, their scales in float32."""
    if leaf.scale_of:
        return SCALE_DTYPE
    return FP8 if is_quantized(leaf.name, cfg) else np.dtype(dtype)


def _matches(pattern: str, module: str) -> bool:
    """compressed-tensors' matching of a `targets`/`ignore` entry against a linear layer: its class
    name ('Linear'), its module name, or a 're:' regex of the name (`re.match`)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern in ("Linear", module)


def _modules(weight: Leaf, n_layers: int) -> list[str]:
    """The HF module name of `weight` in every layer (one name for a global)."""
    return [weight.hf_module.format(layer=i) for i in range(n_layers if weight.per_layer else 1)]


@functools.lru_cache(maxsize=None)
def quantized_weights(targets: tuple[str, ...], ignore: tuple[str, ...], n_layers: int, tied: bool,
                      source: str = "config.json") -> tuple[str, ...]:
    """The linear weights that a quantization config's `targets` select and `ignore` leaves out.
    The decoder is one scan over stacked layers, so a weight is quantized in every layer or in none;
    only linear layers (and not a tied LM head) can be."""
    for pattern in (p for p in targets + ignore if p.startswith("re:")):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"{source}: quantization_config pattern {pattern!r} is not a valid regex ({e})") from e
    modules = {w.name: _modules(w, n_layers) for w in LINEAR if not (w.untied_only and tied)}
    unmatched = [t for t in targets if not any(_matches(t, m) for names in modules.values() for m in names)]
    if unmatched:
        raise ConfigError(f"{source}: quantization_config targets {unmatched} match no linear layer of this Llama; "
                          "only linear layers (the attention and MLP projections, an untied lm_head) can be FP8")
    quantized = []
    for weight, names in modules.items():
        chosen = {m for m in names if any(_matches(t, m) for t in targets) and not any(_matches(p, m) for p in ignore)}
        if chosen and len(chosen) != len(names):
            raise ConfigError(
                f"{source}: quantization_config quantizes {by_name(weight).hf_module.format(layer='*')} in some "
                f"layers only (e.g. {sorted(chosen)[:2]} but not {sorted(set(names) - chosen)[:2]}); a weight must "
                "be FP8 in every layer or in none")
        if chosen:
            quantized.append(weight)
    if tied and any(_matches(t, "lm_head") for t in targets) and not any(_matches(p, "lm_head") for p in ignore):
        raise ConfigError(f"{source}: quantization_config quantizes lm_head, which is tied to the embedding; "
                          "a quantized tied head is not supported (list 'lm_head' in ignore)")
    if not quantized:
        raise ConfigError(f"{source}: quantization_config quantizes no layer (its ignore list {list(ignore)} "
                          f"covers every target {list(targets)})")
    return tuple(quantized)
