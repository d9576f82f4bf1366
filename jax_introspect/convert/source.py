"""A weight source seen as a lazy map from HF tensor names to loaders.

Every format (HF safetensors folders, GGUF files) is exposed as HF-named tensors in HF layout
(`[out, in]` linear weights, rotate-half q/k rows); `params.py` declares which tensor each of
our weights comes from and how it maps to our layout.
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
    load: Callable[[], np.ndarray]  # float32 or bfloat16 (ml_dtypes) array in HF layout


@dataclasses.dataclass
class Source:
    config: ModelConfig
    tensors: dict[str, SourceTensor]
    description: dict  # JSON-able: format, paths, sizes (stored in the checkpoint manifest)
    tokenizer: Optional[object] = None  # jax_introspect.tokenizer.Tokenizer


# Tensors a checkpoint may carry that we do not need (old rotary buffers; a tied head's copy).
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> HF shape of every tensor the model's weights are converted from."""
    names = {leaf.hf_tensor(): leaf.hf_shape(cfg) for leaf in params_lib.global_leaves(cfg)}
    for i in range(cfg.n_layers):
        names.update({leaf.hf_tensor(i): leaf.hf_shape(cfg) for leaf in params_lib.LAYER})
    return names


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


def _ours(source: Source, leaf: params_lib.Leaf, layer: Optional[int] = None) -> np.ndarray:
    """One weight in our layout, read from its HF tensor and checked."""
    cfg = source.config
    return leaf.from_hf(_load_checked(source.tensors[leaf.hf_tensor(layer)], leaf.hf_shape(cfg)), cfg)


def load_globals(source: Source, dtype) -> dict[str, np.ndarray]:
    # Not made contiguous: a transposed LM head (the largest global) is written without a copy.
    return {leaf.name: np.asarray(_ours(source, leaf), dtype=dtype) for leaf in params_lib.global_leaves(source.config)}


def load_layer(source: Source, index: int, dtype) -> dict[str, np.ndarray]:
    return {leaf.name: np.ascontiguousarray(_ours(source, leaf, index), dtype=dtype) for leaf in params_lib.LAYER}
