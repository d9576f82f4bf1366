"""A weight source seen as a lazy map from HF tensor names to loaders.

Every format (HF safetensors folders, GGUF files) is exposed as HF-named tensors in HF layout
(`[out, in]` linear weights, rotate-half q/k rows). `param_updates` then maps each tensor to our
parameter layout, so the layout rules live in one place.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Optional

import numpy as np

from jax_introspect.config import ModelConfig


class ConversionError(ValueError):
    """Input weights that cannot be converted; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    name: str  # HF name, e.g. model.layers.3.self_attn.q_proj.weight
    file: str  # where it is read from (for error messages)
    shape: tuple[int, ...]  # in HF layout
    load: Callable[[], np.ndarray]  # float32 or bfloat16 (ml_dtypes) array in HF layout


@dataclasses.dataclass
class Source:
    config: ModelConfig
    tensors: dict[str, SourceTensor]
    description: dict  # JSON-able: format, paths, sizes (stored in the checkpoint manifest)
    tokenizer: Optional[object] = None  # jax_introspect.tokenizer.Tokenizer


# Our name within a layer -> (HF suffix, function from the HF array to ours, expected HF shape).
def _layer_rules(cfg: ModelConfig):
    D, H, K, hd, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    return {
        "attn_norm": ("input_layernorm.weight", lambda w: w, (D,)),
        "wq": ("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, hd), (H * hd, D)),
        "wk": ("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, hd), (K * hd, D)),
        "wv": ("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, hd), (K * hd, D)),
        "wo": ("self_attn.o_proj.weight", lambda w: w.T.reshape(H, hd, D), (D, H * hd)),
        "mlp_norm": ("post_attention_layernorm.weight", lambda w: w, (D,)),
        "w_gate": ("mlp.gate_proj.weight", lambda w: w.T, (F, D)),
        "w_up": ("mlp.up_proj.weight", lambda w: w.T, (F, D)),
        "w_down": ("mlp.down_proj.weight", lambda w: w.T, (D, F)),
    }


def _global_rules(cfg: ModelConfig):
    rules = {
        "embed": ("model.embed_tokens.weight", lambda w: w, (cfg.vocab_size, cfg.d_model)),
        "final_norm": ("model.norm.weight", lambda w: w, (cfg.d_model,)),
    }
    if not cfg.tie_word_embeddings:
        rules["lm_head"] = ("lm_head.weight", lambda w: w.T, (cfg.vocab_size, cfg.d_model))
    return rules


# Tensors a checkpoint may carry that we do not need (old rotary buffers; a tied head's copy).
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    names = {hf: shape for hf, _, shape in _global_rules(cfg).values()}
    for i in range(cfg.n_layers):
        for suffix, _, shape in _layer_rules(cfg).values():
            names[f"model.layers.{i}.{suffix}"] = shape
    return names


def validate(source: Source, config_file: str) -> None:
    """Check names and shapes of every tensor against the config before anything is written."""
    cfg = source.config
    expected = expected_tensors(cfg)
    present = {n for n in source.tensors if not _IGNORED.match(n)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exports keep a copy of the tied head
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        raise ConversionError(
            f"weights do not match {config_file} ({cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"vocab {cfg.vocab_size}, tied={cfg.tie_word_embeddings}): {'; '.join(parts)}. "
            "Use the config.json that came with these weights.")
    for name, shape in expected.items():
        tensor = source.tensors[name]
        if tuple(tensor.shape) != tuple(shape):
            fix = (f"they do not belong to the same model. Use the config.json that came with these "
                   f"weights, or re-download {os.path.basename(tensor.file)} if it is corrupt"
                   if config_file.endswith("config.json") else "the file is corrupt — re-download it")
            raise ConversionError(f"{tensor.file}: tensor {name} has shape {list(tensor.shape)} but "
                                  f"{config_file} implies {list(shape)}: {fix}")


def _load_checked(tensor: SourceTensor, expected_shape) -> np.ndarray:
    array = tensor.load()
    if tuple(array.shape) != tuple(expected_shape):
        raise ConversionError(f"{tensor.file}: tensor {tensor.name} read with shape {list(array.shape)}, "
                              f"header says {list(expected_shape)}; the file is corrupt — re-download it")
    if not np.all(np.isfinite(array.astype(np.float32))):
        raise ConversionError(f"{tensor.file}: tensor {tensor.name} holds NaN or Inf values; "
                              "the file is corrupt — re-download it")
    return array


def load_globals(source: Source, dtype) -> dict[str, np.ndarray]:
    return {ours: np.asarray(fn(_load_checked(source.tensors[hf], shape)), dtype=dtype)
            for ours, (hf, fn, shape) in _global_rules(source.config).items()}


def load_layer(source: Source, index: int, dtype) -> dict[str, np.ndarray]:
    out = {}
    for ours, (suffix, fn, shape) in _layer_rules(source.config).items():
        tensor = source.tensors[f"model.layers.{index}.{suffix}"]
        out[ours] = np.ascontiguousarray(fn(_load_checked(tensor, shape)), dtype=dtype)
    return out
