"""Model configuration as data: read from HF config.json (both rope layouts) or GGUF metadata.

Anything we do not implement (attention bias, sliding windows, other rope types, quantization
schemes other than compressed-tensors FP8-dynamic...) is rejected with an error naming the field,
never silently defaulted.
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


FP8_DYNAMIC = "fp8_dynamic"


@dataclasses.dataclass(frozen=True)
class Quantization:
    """Weights stored quantized. The one scheme implemented is compressed-tensors' FP8-dynamic
    (`docs/numerics.md`): each weight named here is stored as float8_e4m3fn with one float32 scale
    per output channel (its `_scale` leaf in params.py); at run time each such layer's input is
    quantized to float8_e4m3fn with one scale per token. Every other weight is unquantized."""

    weights: tuple[str, ...]  # the linear weights (params.py names) stored as FP8, e.g. ("wq", ..., "w_down")
    scheme: str = FP8_DYNAMIC

    def __post_init__(self):
        if self.scheme != FP8_DYNAMIC:
            raise ConfigError(f"quantization scheme {self.scheme!r} is not supported (only {FP8_DYNAMIC!r})")
        if not self.weights:
            raise ConfigError("a quantization that quantizes no weight: store the model unquantized instead")


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
    quantization: Quantization | None = None  # None: every weight stored in float

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
        if data.get("quantization") is not None:  # absent in checkpoints converted before FP8 support
            quant = dict(data["quantization"])
            data["quantization"] = Quantization(**dict(quant, weights=tuple(quant["weights"])))
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


# --- numerics: how a checkpoint with FP8 weights runs ------------------------------------------

DEQUANTIZED = "dequantized"
NUMERICS = (DEQUANTIZED, FP8_DYNAMIC)


def with_numerics(cfg: ModelConfig, numerics: str) -> ModelConfig:
    """The config the model runs with under `numerics` (a static argument of the jitted programs):

    'dequantized': every weight in the load dtype (FP8 weights times their scales, computed at load
    time): the plain model, `cfg` without its quantization. Any checkpoint.
    'fp8_dynamic': FP8 weights as stored; each quantized layer's input is rounded through
    float8_e4m3fn with a per-token scale and multiplied with them in float32 (vLLM's FP8-dynamic
    linear layers). Needs a checkpoint converted from FP8 weights.
    """
    if numerics not in NUMERICS:
        raise ConfigError(f"numerics={numerics!r}: choose one of {NUMERICS}")
    if numerics == DEQUANTIZED:
        return dataclasses.replace(cfg, quantization=None) if cfg.quantization else cfg
    if cfg.quantization is None:
        raise ConfigError(f"numerics={numerics!r} needs a checkpoint converted from FP8 weights (compressed-tensors "
                          "FP8-dynamic); this one holds unquantized weights: use numerics='dequantized'")
    return cfg


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


# compressed-tensors' FP8-dynamic scheme (its preset FP8_DYNAMIC, what llm-compressor writes for
# Llama-3.1-405B-FP8-dynamic): the one `quantization_config` implemented. Each field must hold exactly
# this value (absent: compressed-tensors' default, which must be it too).
_CT_METHOD = "compressed-tensors"
_CT_FORMAT = "float-quantized"  # weights stored as float8_e4m3fn (+ `weight_scale`)
_CT_FP8_PRESET = "FP8_DYNAMIC"  # a config group named after the preset may hold just its targets
_FP8_ARGS = {
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True},
}
_CT_ARG_DEFAULTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": None, "dynamic": False}
# QuantizationArgs fields that do not change a stored model's computation (calibration settings),
# and those that must be null for FP8-dynamic (other layouts of the scales).
_CT_ARGS_IGNORED = {"observer", "observer_kwargs", "actorder"}
_CT_ARGS_NULL = {"group_size", "block_structure", "scale_dtype", "zp_dtype"}
# quantization_config fields that are informational, or must be empty (features not implemented).
_CT_INFORMATIONAL = {"global_compression_ratio", "version", "quantization_status"}
_CT_MUST_BE_EMPTY = {"kv_cache_scheme": "a quantized KV cache", "sparsity_config": "sparse weights",
                     "transform_config": "weight transforms", "moe_sparsity_config": "MoE sparsity"}
_FP8_DESCRIPTION = ("only compressed-tensors FP8-dynamic is supported (quant_method 'compressed-tensors', format "
                    "'float-quantized'; weights: 8-bit float, per output channel ('channel'), symmetric, static; "
                    "input_activations: 8-bit float, per token ('token'), symmetric, dynamic)")


def _refuse(source: str, field: str, value, why: str = "") -> ConfigError:
    return ConfigError(f"{source}: {field}={value!r}{' (' + why + ')' if why else ''} is not supported: "
                       f"{_FP8_DESCRIPTION}")


def _check_fp8_args(args, field: str, expected: Mapping[str, Any], source: str) -> None:
    if not isinstance(args, Mapping):
        raise _refuse(source, field, args, "must be an object of quantization arguments")
    unknown = sorted(set(args) - set(_CT_ARG_DEFAULTS) - _CT_ARGS_IGNORED - _CT_ARGS_NULL)
    if unknown:
        raise _refuse(source, f"{field}.{unknown[0]}", args[unknown[0]], "unknown quantization argument")
    for key in sorted(_CT_ARGS_NULL):
        if args.get(key) is not None:
            raise _refuse(source, f"{field}.{key}", args[key])
    for key, want in expected.items():
        value = args.get(key, _CT_ARG_DEFAULTS[key])
        value = value.lower() if isinstance(value, str) else value
        if value != want or type(value) is not type(want):  # 8.0 or 1 are not 8 or True
            raise _refuse(source, f"{field}.{key}", args.get(key, value))


def _fp8_group_targets(name: str, group, source: str) -> list:
    """The targets of one FP8-dynamic config group (a full scheme, or the preset's name with its targets)."""
    field = f"quantization_config.config_groups.{name}"
    if isinstance(group, list) and name.upper() == _CT_FP8_PRESET:
        return group
    if not isinstance(group, Mapping):
        raise _refuse(source, field, group, f"a scheme object, or {_CT_FP8_PRESET!r} with a list of targets")
    unknown = sorted(set(group) - {"targets", "weights", "input_activations", "output_activations", "format"})
    if unknown:
        raise _refuse(source, f"{field}.{unknown[0]}", group[unknown[0]], "unknown scheme field")
    if group.get("format") not in (None, _CT_FORMAT):
        raise _refuse(source, f"{field}.format", group["format"])
    if group.get("output_activations") is not None:
        raise _refuse(source, f"{field}.output_activations", group["output_activations"])
    for role, expected in _FP8_ARGS.items():
        _check_fp8_args(group.get(role), f"{field}.{role}", expected, source)
    return group.get("targets")


def _string_list(value, field: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {field}={value!r} must be a list of module names, class names or 're:' patterns")
    return tuple(value)


def _hf_quantization(hf: Mapping[str, Any], source: str, n_layers: int, tied: bool) -> Quantization | None:
    """The `quantization_config` of an HF config.json, validated: None when absent; FP8-dynamic with
    the weights its targets and ignore list select; anything else refused, naming the field."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise _refuse(source, "quantization_config", qc, "must be an object")
    if qc.get("quant_method") != _CT_METHOD:
        raise _refuse(source, "quantization_config.quant_method", qc.get("quant_method"))
    if qc.get("format") != _CT_FORMAT:
        raise _refuse(source, "quantization_config.format", qc.get("format"))
    known = {"quant_method", "format", "config_groups", "ignore"} | _CT_INFORMATIONAL | set(_CT_MUST_BE_EMPTY)
    unknown = sorted(set(qc) - known)
    if unknown:
        raise _refuse(source, f"quantization_config.{unknown[0]}", qc[unknown[0]], "unknown field")
    for key, what in _CT_MUST_BE_EMPTY.items():
        if qc.get(key):
            raise _refuse(source, f"quantization_config.{key}", qc[key], what)
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise _refuse(source, "quantization_config.config_groups", groups, "needs at least one group")
    targets = ()
    for name, group in groups.items():
        targets += _string_list(_fp8_group_targets(name, group, source),
                                f"quantization_config.config_groups.{name}.targets", source)
    ignore = _string_list(qc.get("ignore") or [], "quantization_config.ignore", source)
    from jax_introspect import params as params_lib  # params.py imports this module
    weights = params_lib.quantized_weights(targets, ignore, n_layers, tied, source)
    return Quantization(weights=weights)


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
    n_layers = _hf_int(hf, "num_hidden_layers", source)
    tied = bool(hf.get("tie_word_embeddings", False))
    return ModelConfig(
        vocab_size=_hf_int(hf, "vocab_size", source),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_hf_optional_int(hf, "num_key_value_heads", source, default=n_heads),
        head_dim=_hf_optional_int(hf, "head_dim", source, default=d_model // n_heads),
        d_ff=_hf_int(hf, "intermediate_size", source),
        rope_theta=theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=tied,
        max_position_embeddings=_hf_int(hf, "max_position_embeddings", source,
                                        default=HF_DEFAULT_MAX_POSITION_EMBEDDINGS),
        rope_scaling=scaling,
        name=name,
        quantization=_hf_quantization(hf, source, n_layers, tied),
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
