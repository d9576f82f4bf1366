"""Every parameter leaf of the model, declared once.

A `Leaf` says what one weight is: its name (the field of `model.LayerParams` / `model.Params`
and the array's name in a stored checkpoint unit), its logical axes (from which its shape follows
through the config's sizes, and its sharding through `sharding.AxisRules`), the HF tensor it is
converted from, and how HF's array maps to ours. The model, the sharding layout, the converter
and the checkpoint reader all read this table; nothing else lists the weights.

HF stores a linear layer as `[out, in]`; we store it as `[in..., out...]` with heads split out
(`wq [D, H, hd]`), so that `x @ w` needs no transpose: ours = `hf.T.reshape(our shape)`.
Norms and the embedding are stored as HF holds them. The LM head is a linear layer too
(`[vocab, embed]` in HF, `[embed, vocab]` here), present only when it is not tied to the embedding.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from jax_introspect.config import ModelConfig

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
    fan_in: int = 0  # linear weights: how many leading axes HF's `in` dimension covers; 0: stored as in HF
    per_layer: bool = False  # one per decoder layer, stacked on a leading layer axis in `Params`
    untied_only: bool = False  # present only when the LM head is not tied to the embedding

    @property
    def param_axes(self) -> tuple[str, ...]:
        """Logical axes of the array as `Params` holds it (layer weights stacked)."""
        return (LAYER_AXIS,) + self.axes if self.per_layer else self.axes

    def unit_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Shape of one stored array: a global, or one layer's weight."""
        return tuple(axis_size(cfg, a) for a in self.axes)

    def param_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(axis_size(cfg, a) for a in self.param_axes)

    def hf_tensor(self, layer: int | None = None) -> str:
        return self.hf_name.format(layer=layer)

    def hf_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        shape = self.unit_shape(cfg)
        if not self.fan_in:
            return shape
        return math.prod(shape[self.fan_in:]), math.prod(shape[:self.fan_in])  # [out, in]

    def from_hf(self, array: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        """HF's array (in `hf_shape`) as ours (in `unit_shape`)."""
        return array.T.reshape(self.unit_shape(cfg)) if self.fan_in else array


def _layer(name: str, axes: tuple[str, ...], hf_suffix: str, fan_in: int = 0) -> Leaf:
    return Leaf(name, axes, f"model.layers.{{layer}}.{hf_suffix}", fan_in=fan_in, per_layer=True)


# Order = the fields of model.LayerParams / model.Params and the arrays of a stored unit.
LAYER: tuple[Leaf, ...] = (
    _layer("attn_norm", ("embed",), "input_layernorm.weight"),
    _layer("wq", ("embed", "heads", "head_dim"), "self_attn.q_proj.weight", fan_in=1),
    _layer("wk", ("embed", "kv_heads", "head_dim"), "self_attn.k_proj.weight", fan_in=1),
    _layer("wv", ("embed", "kv_heads", "head_dim"), "self_attn.v_proj.weight", fan_in=1),
    _layer("wo", ("heads", "head_dim", "embed"), "self_attn.o_proj.weight", fan_in=2),
    _layer("mlp_norm", ("embed",), "post_attention_layernorm.weight"),
    _layer("w_gate", ("embed", "mlp"), "mlp.gate_proj.weight", fan_in=1),
    _layer("w_up", ("embed", "mlp"), "mlp.up_proj.weight", fan_in=1),
    _layer("w_down", ("mlp", "embed"), "mlp.down_proj.weight", fan_in=1),
)
GLOBAL: tuple[Leaf, ...] = (
    Leaf("embed", ("vocab", "embed"), "model.embed_tokens.weight"),
    Leaf("final_norm", ("embed",), "model.norm.weight"),
    Leaf("lm_head", ("embed", "vocab"), "lm_head.weight", fan_in=1, untied_only=True),
)
_BY_NAME = {leaf.name: leaf for leaf in LAYER + GLOBAL}


def by_name(name: str) -> Leaf:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown parameter {name!r}; the parameters are {sorted(_BY_NAME)}") from None


def global_leaves(cfg: ModelConfig) -> tuple[Leaf, ...]:
    """The weights outside the layer stack that `cfg` has (no `lm_head` when it is tied)."""
    return tuple(g for g in GLOBAL if not (g.untied_only and cfg.tie_word_embeddings))


def unit_shapes(cfg: ModelConfig, leaves: tuple[Leaf, ...]) -> dict[str, tuple[int, ...]]:
    """Name -> stored shape of each of `leaves` (one unit: `global_leaves(cfg)` or `LAYER`)."""
    return {leaf.name: leaf.unit_shape(cfg) for leaf in leaves}
