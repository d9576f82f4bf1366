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


class ContextTooLongError(ValueError):
    """A prompt (plus the tokens to generate) past the model's positions."""


def check_context(config: ModelConfig, n_prompt_tokens: int, max_new_tokens: int = 0) -> None:
    """Refuse a prompt of `n_prompt_tokens` that, with `max_new_tokens` generated after it, needs
    more positions than `config.max_position_embeddings`: RoPE would still compute there, but the
    model never saw those positions, so its output would be silently unreliable. Cheap: call it
    before loading weights (`checkpoint.load_config(path)` gives the config)."""
    needed = n_prompt_tokens + max_new_tokens
    if needed > config.max_position_embeddings:
        new = f" + {max_new_tokens} new tokens" if max_new_tokens else ""
        fix = "shorten the prompt" + (" or lower max_new_tokens" if max_new_tokens else "")
        raise ContextTooLongError(
            f"a prompt of {n_prompt_tokens} tokens{new} needs {needed} positions, more than the model's "
            f"max_position_embeddings={config.max_position_embeddings}: {fix}")


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


# transformers' defaults for a config.json that omits a field (LlamaConfig / RotaryEmbeddingConfigMixin).
HF_DEFAULT_MAX_POSITION_EMBEDDINGS = 2048
_HF_DEFAULT_ROPE_THETA = 10000.0
# transformers 5 (`convert_rope_params_to_dict`) takes `rope_scaling` when it is set, else
# `rope_parameters`; an empty or null field counts as absent.
_HF_ROPE_FIELDS = ("rope_scaling", "rope_parameters")


def _rope_of_field(params: Mapping[str, Any], top_theta, field: str,
                   source: str) -> tuple[float | None, RopeScaling | None]:
    """(rope_theta, llama3 scaling or None) one rope field describes; its theta falls back to the
    top-level `rope_theta` (None when neither gives one)."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: {field}={params!r} must be an object such as "
                          "{\"rope_type\": \"llama3\", \"factor\": 8.0, ...}")
    theta = params.get("rope_theta", top_theta)
    theta = None if theta is None else float(theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(
            f"{source}: {field} has rope type {rope_type!r}, which is not supported (only 'default' and "
            "'llama3'); convert a Llama-3.x checkpoint or add that rope type to jax_introspect.model")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if k not in params]
    if missing:
        raise ConfigError(f"{source}: llama3 rope scaling in {field} lacks {missing}")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _describe_rope(theta: float | None, scaling: RopeScaling | None) -> str:
    kind = "default RoPE" if scaling is None else "llama3 RoPE"
    if theta is None:
        return f"{kind} with rope_theta={_HF_DEFAULT_ROPE_THETA} (transformers' default: none is given)"
    return f"{kind} with rope_theta={theta}"


def _hf_rope(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Both layouts: Llama-3.1's `rope_scaling` + top-level `rope_theta`, and transformers 5's
    `rope_parameters` (which carries rope_theta inside). A config with both is accepted only when
    they describe the same RoPE: when they contradict each other, neither can be trusted."""
    fields = {field: hf[field] for field in _HF_ROPE_FIELDS if hf.get(field)}
    ropes = {field: _rope_of_field(params, hf.get("rope_theta"), field, source) for field, params in fields.items()}
    if len(set(ropes.values())) > 1:
        raise ConfigError(
            f"{source}: rope_scaling and rope_parameters contradict each other: "
            f"rope_scaling={fields['rope_scaling']!r} means {_describe_rope(*ropes['rope_scaling'])}, "
            f"rope_parameters={fields['rope_parameters']!r} means {_describe_rope(*ropes['rope_parameters'])}. "
            "transformers uses rope_scaling when both are set; delete the wrong one of the two (compare "
            "with the config.json published with the model)")
    theta, scaling = next(iter(ropes.values()), (hf.get("rope_theta"), None))
    if theta is None:
        raise ConfigError(f"{source}: no rope_theta (top level or in rope_parameters)")
    return float(theta), scaling


_REQUIRED = object()


def _hf_int(hf: Mapping[str, Any], key: str, source: str, default: Any = _REQUIRED) -> int:
    """A positive integer field of config.json, `default` when absent (refused when required)."""
    if key not in hf:
        if default is _REQUIRED:
            raise ConfigError(f"{source}: no {key}; use the config.json that came with these weights")
        return default
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {key}={value!r} must be a positive integer; use the config.json "
                          "that came with these weights")
    return value


def _hf_optional_int(hf: Mapping[str, Any], key: str, source: str, default: int) -> int:
    """Like `_hf_int`, but a null counts as absent too (as transformers does for this field)."""
    return default if hf.get(key) is None else _hf_int(hf, key, source)


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
    n_heads = _hf_int(hf, "num_attention_heads", source)
    d_model = _hf_int(hf, "hidden_size", source)
    return ModelConfig(
        vocab_size=_hf_int(hf, "vocab_size", source),
        d_model=d_model,
        n_layers=_hf_int(hf, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=_hf_optional_int(hf, "num_key_value_heads", source, default=n_heads),
        head_dim=_hf_optional_int(hf, "head_dim", source, default=d_model // n_heads),
        d_ff=_hf_int(hf, "intermediate_size", source),
        rope_theta=theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=_hf_int(hf, "max_position_embeddings", source,
                                        default=HF_DEFAULT_MAX_POSITION_EMBEDDINGS),
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
        except ValueError as e:  # not JSON, or not UTF-8
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} holds a JSON {type(hf).__name__}, not an object; an HF config.json maps "
                          "field names to values")
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
        # Missing: what transformers gives a GGUF without it (LlamaConfig's default), as for config.json.
        max_position_embeddings=int(meta.get(p + "context_length", HF_DEFAULT_MAX_POSITION_EMBEDDINGS)),
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
