"""Model configuration as data: read from HF config.json (both rope layouts) or GGUF metadata.

Anything we do not implement (attention bias, sliding windows, other rope types...) is rejected
with an error naming the field, never silently defaulted.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


class ConfigError(ValueError):
    """A model config we cannot honour exactly."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 ('llama3') frequency scaling; see `model.rope_inverse_frequencies`."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int = 131072
    rope_scaling: RopeScaling | None = None
    name: str = "llama"

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "grouped-query attention needs whole groups")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def num_params(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * self.d_model * self.d_ff + 2 * self.d_model
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + self.n_layers * per_layer + self.d_model + head

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {sorted(unknown)}")
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_json_dict(json.load(f))


# --- HF config.json ---------------------------------------------------------------------------

_HF_ARCHITECTURES = {"LlamaForCausalLM"}
# Fields that change the computation and that we do not implement: a true/non-null value is an error.
_HF_UNSUPPORTED_IF_SET = {
    "attention_bias": "attention projections with bias",
    "mlp_bias": "MLP projections with bias",
    "sliding_window": "sliding-window attention",
    "use_sliding_window": "sliding-window attention",
    "qk_norm": "query/key normalisation",
}
_HF_ACTIVATIONS = {"silu", "swish"}


def _hf_rope(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Both layouts: Llama-3.1's `rope_scaling` + top-level `rope_theta`, and transformers 5's
    `rope_parameters` (which carries rope_theta inside)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{source}: no rope_theta (top level or in rope_parameters)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not supported (only 'default' and 'llama3'); "
            "convert a Llama-3.x checkpoint or add that rope type to jax_introspect.model")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if k not in params]
    if missing:
        raise ConfigError(f"{source}: llama3 rope scaling lacks {missing}")
    return float(theta), RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def from_hf_dict(hf: Mapping[str, Any], source: str = "config.json", name: str = "llama") -> ModelConfig:
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if not set(archs) <= _HF_ARCHITECTURES or hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"{source}: architecture {archs} / model_type {hf.get('model_type')!r} "
                          "is not a Llama causal LM; only LlamaForCausalLM is supported")
    for key, what in _HF_UNSUPPORTED_IF_SET.items():
        if hf.get(key):
            raise ConfigError(f"{source}: {key}={hf[key]!r} ({what}) is not supported")
    act = hf.get("hidden_act", "silu")
    if act not in _HF_ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act={act!r} is not supported (Llama uses 'silu')")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported (use 1)")
    theta, scaling = _hf_rope(hf, source)
    n_heads = int(hf["num_attention_heads"])
    d_model = int(hf["hidden_size"])
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        d_ff=int(hf["intermediate_size"]),
        rope_theta=theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
        rope_scaling=scaling,
        name=name,
    )


def from_hf_config_file(path: str) -> ModelConfig:
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: an HF model folder needs its config.json")
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return from_hf_dict(hf, source=path, name=os.path.basename(os.path.dirname(os.path.abspath(path))))


# --- GGUF metadata ----------------------------------------------------------------------------

def from_gguf_metadata(meta: Mapping[str, Any], vocab_size: int, has_output_tensor: bool, source: str,
                       name: str = "llama") -> ModelConfig:
    """`meta` maps GGUF keys to python values (see convert.gguf_file.read_metadata); the vocab
    size comes from the embedding tensor, which every file has."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{source}: GGUF architecture {arch!r} is not 'llama'")
    p = "llama."
    n_heads = int(meta[p + "attention.head_count"])
    d_model = int(meta[p + "embedding_length"])
    head_dim = int(meta.get(p + "rope.dimension_count", d_model // n_heads))
    if head_dim * n_heads != d_model and p + "attention.key_length" not in meta:
        raise ConfigError(f"{source}: rope dimension {head_dim} x {n_heads} heads != embedding {d_model}")
    if meta.get(p + "rope.scaling.type", "none") not in ("none", None):
        raise ConfigError(f"{source}: GGUF rope scaling {meta[p + 'rope.scaling.type']!r} is not supported; "
                          "convert from the HF safetensors folder instead")
    return ModelConfig(
        vocab_size=int(vocab_size),
        d_model=d_model,
        n_layers=int(meta[p + "block_count"]),
        n_heads=n_heads,
        n_kv_heads=int(meta.get(p + "attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(meta[p + "feed_forward_length"]),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta[p + "attention.layer_norm_rms_epsilon"]),
        tie_word_embeddings=not has_output_tensor,
        max_position_embeddings=int(meta.get(p + "context_length", 8192)),
        rope_scaling=None,
        name=name,
    )


# --- Presets (published HF config.json values) -----------------------------------------------

_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
_LLAMA32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)


def _llama3(name, d_model, n_layers, n_heads, d_ff, rope, tie, n_kv_heads=8, head_dim=128):
    return ModelConfig(vocab_size=128256, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=head_dim, d_ff=d_ff, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=tie, max_position_embeddings=131072,
                       rope_scaling=rope, name=name)


PRESETS: dict[str, ModelConfig] = {
    "llama-3.1-8b": _llama3("llama-3.1-8b", 4096, 32, 32, 14336, _LLAMA31_ROPE, False),
    "llama-3.1-70b": _llama3("llama-3.1-70b", 8192, 80, 64, 28672, _LLAMA31_ROPE, False),
    "llama-3.1-405b": _llama3("llama-3.1-405b", 16384, 126, 128, 53248, _LLAMA31_ROPE, False),
    "llama-3.2-1b": _llama3("llama-3.2-1b", 2048, 16, 32, 8192, _LLAMA32_ROPE, True, head_dim=64),
    "llama-3.2-3b": _llama3("llama-3.2-3b", 3072, 28, 24, 8192, _LLAMA32_ROPE, True),
    "smollm2-135m": ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                head_dim=64, d_ff=1536, rope_theta=100000.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=True, max_position_embeddings=8192,
                                name="smollm2-135m"),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
