"""A weight source seen as a lazy map from HF tensor names to loaders.

Every format (HF safetensors folders, GGUF files) is exposed as HF-named tensors in HF layout
(`[out, in]` linear weights, rotate-half q/k rows); `params.py` declares which tensor each of
our weights comes from and how it maps to our layout. FP8 weights (compressed-tensors
FP8-dynamic) are kept as stored, float8_e4m3fn, with their scales in float32; every other weight
is converted to the checkpoint's dtype.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Optional

import numpy as np

from jax_introspect import params as params_lib
from jax_introspect.config import ModelConfig


class ConversionError(ValueError):
    """Input weights that cannot be converted; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    name: str  # HF name, e.g. model.layers.3.self_attn.q_proj.weight
    file: str  # where it is read from (for error messages)
    shape: tuple[int, ...]  # in HF layout
    load: Callable[[], np.ndarray]  # float32, bfloat16 or float8_e4m3fn (ml_dtypes) array in HF layout
    dtype: np.dtype  # what `load` returns


@dataclasses.dataclass
class Source:
    config: ModelConfig
    tensors: dict[str, SourceTensor]
    description: dict  # JSON-able: format, paths, sizes (stored in the checkpoint manifest)
    tokenizer: Optional[object] = None  # jax_introspect.tokenizer.Tokenizer


# Tensors a checkpoint may carry that we do not need (old rotary buffers; a tied head's copy).
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)")


def _sources(cfg: ModelConfig) -> dict[str, params_lib.Leaf]:
    """HF name -> our leaf, for every tensor the model's weights are converted from."""
    names = {leaf.hf_tensor(): leaf for leaf in params_lib.global_leaves(cfg)}
    for i in range(cfg.n_layers):
        names.update({leaf.hf_tensor(i): leaf for leaf in params_lib.layer_leaves(cfg)})
    return names


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> HF shape of every tensor the model's weights are converted from."""
    return {name: leaf.hf_shape(cfg) for name, leaf in _sources(cfg).items()}


def _dtype_error(tensor: SourceTensor, leaf: params_lib.Leaf, cfg: ModelConfig) -> Optional[str]:
    """Why `tensor` cannot be `leaf` of `cfg` by its dtype (None: it can): FP8 exactly where the
    quantization config says so (FP8 weights are kept as stored; one without a scale could not be
    read)."""
    fp8 = tensor.dtype == params_lib.FP8
    if params_lib.is_quantized(leaf.name, cfg) and not fp8:
        return (f"is {tensor.dtype}, but the quantization_config says it is stored as FP8 (compressed-tensors "
                "'float-quantized': float8_e4m3fn with its weight_scale); these weights are not the compressed "
                "ones: use the config.json that came with them")
    if fp8 and not params_lib.is_quantized(leaf.name, cfg):
        return ("is float8_e4m3fn, but no quantization_config lists it as quantized (it would have no scale): "
                "use the config.json that came with these weights, with its quantization_config")
    return None


def validate(source: Source, config_file: str) -> None:
    """Check names and shapes of every tensor against the config before anything is written."""
    cfg = source.config
    expected = expected_tensors(cfg)
    present = {n for n in source.tensors if not _IGNORED.match(n)}
    if cfg.tie_word_embeddings:  # some exports keep a copy of the tied head
        present -= {leaf.hf_tensor() for leaf in params_lib.GLOBAL if leaf.untied_only}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            scales = [n for n in missing if n.endswith(".weight_scale")]
            parts.append(f"missing {len(missing)} tensor(s), e.g. {(scales or missing)[:3]}"
                         + (" (the quantization_config says their weights are FP8, which needs each one's "
                            "per-channel weight_scale)" if scales else ""))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        raise ConversionError(
            f"weights do not match {config_file} ({cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"vocab {cfg.vocab_size}, tied={cfg.tie_word_embeddings}): {'; '.join(parts)}. "
            "Use the config.json that came with these weights.")
    for name, leaf in _sources(cfg).items():
        tensor, shape = source.tensors[name], leaf.hf_shape(cfg)
        dtype_error = _dtype_error(tensor, leaf, cfg)
        if dtype_error:
            raise ConversionError(f"{tensor.file}: tensor {name} {dtype_error}")
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


def _ours(source: Source, leaf: params_lib.Leaf, layer: Optional[int] = None) -> np.ndarray:
    """One weight in our layout, read from its HF tensor and checked."""
    cfg = source.config
    tensor = source.tensors[leaf.hf_tensor(layer)]
    array = _load_checked(tensor, leaf.hf_shape(cfg))
    if leaf.scale_of and not np.all(array.astype(np.float32) > 0):
        raise ConversionError(f"{tensor.file}: tensor {tensor.name} holds scales <= 0; an FP8 weight's per-channel "
                              "scales are positive: the file is corrupt — re-download it")
    return leaf.from_hf(array, cfg)


def load_globals(source: Source, dtype) -> dict[str, np.ndarray]:
    # Not made contiguous: a transposed LM head (the largest global) is written without a copy.
    cfg = source.config
    return {leaf.name: np.asarray(_ours(source, leaf), dtype=params_lib.stored_dtype(leaf, cfg, dtype))
            for leaf in params_lib.global_leaves(cfg)}


def load_layer(source: Source, index: int, dtype) -> dict[str, np.ndarray]:
    cfg = source.config
    return {leaf.name: np.ascontiguousarray(_ours(source, leaf, index), dtype=params_lib.stored_dtype(leaf, cfg, dtype))
            for leaf in params_lib.layer_leaves(cfg)}
