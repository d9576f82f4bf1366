"""Concept injection as data: what to add to the residual stream, where, per batch row.

An `Injection` holds one entry per batch row. Inside the scanned decoder, after decoder layer
`layer[b]`, every token of row b at RoPE position >= `start[b]` gets

    h += strength[b] * vector[b]                                 (raw mode)
    h += strength[b] * vector[b] / |vector[b]| * |mlp_out|       (norm_match mode)

where `mlp_out` is that layer's MLP output at that token: the per-token norm of the sublayer
output that vllm-lens' `norm_match` uses (the public 405B replication's protocol). All fields are
traced arrays, so any mix of layers, strengths, vectors and windows runs in one compiled program;
a row with strength 0 is a clean run, bit for bit.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect.config import ModelConfig


class InjectionError(ValueError):
    """An injection that cannot be applied; raised before any compute."""


@flax.struct.dataclass
class Injection:
    layer: jax.Array  # [B] int32, decoder layer whose output is modified
    strength: jax.Array  # [B] float32
    vector: jax.Array  # [B, D] float32
    start: jax.Array  # [B] int32, first injected position (0 = every position)
    norm_match: jax.Array  # [B] bool

    @property
    def batch(self) -> int:
        return int(self.layer.shape[0])


def make(layer, strength, vector, start=0, norm_match=False, *, batch: Optional[int] = None) -> Injection:
    """Build an Injection from scalars or per-row sequences (scalars are broadcast to `batch`).
    `vector` is [D] (shared) or [B, D]."""
    vector = np.asarray(vector, np.float32)
    if batch is None:
        sizes = [len(x) for x in (layer, strength, start, norm_match) if np.ndim(x) == 1]
        sizes += [vector.shape[0]] if vector.ndim == 2 else []
        batch = sizes[0] if sizes else 1

    def rows(x, dtype):
        x = np.asarray(x, dtype)
        if x.ndim == 0:
            return np.full((batch,), x, dtype)
        if x.shape != (batch,):
            raise InjectionError(f"per-row injection field has shape {x.shape}, expected ({batch},)")
        return x
    if vector.ndim == 1:
        vector = np.broadcast_to(vector, (batch, vector.shape[0]))
    if vector.ndim != 2 or vector.shape[0] != batch:
        raise InjectionError(f"vector must be [d_model] or [{batch}, d_model], got shape {vector.shape}")
    return Injection(layer=rows(layer, np.int32), strength=rows(strength, np.float32),
                     vector=np.ascontiguousarray(vector), start=rows(start, np.int32),
                     norm_match=rows(norm_match, bool))


def none(batch: int, d_model: int) -> Injection:
    """The clean run: strength 0 everywhere."""
    return make(0, 0.0, np.zeros((d_model,), np.float32), batch=batch)


def validate(injection: Injection, cfg: ModelConfig, batch: int) -> None:
    """Host-side checks, before anything is compiled or run."""
    layer = np.asarray(injection.layer)
    if injection.batch != batch:
        raise InjectionError(f"injection has {injection.batch} rows but the batch has {batch}")
    if layer.min() < 0 or layer.max() >= cfg.n_layers:
        raise InjectionError(f"injection layer {layer.tolist()} out of range: the model has layers "
                             f"0..{cfg.n_layers - 1}")
    vector = np.asarray(injection.vector)
    if vector.shape[-1] != cfg.d_model:
        raise InjectionError(f"injection vector has size {vector.shape[-1]} but d_model is {cfg.d_model}; "
                             "was it extracted from another model?")
    if not np.all(np.isfinite(np.asarray(injection.strength))):
        raise InjectionError(f"injection strength must be finite, got {np.asarray(injection.strength).tolist()}")
    if not np.all(np.isfinite(vector)):
        raise InjectionError("injection vector holds NaN or Inf")
    if np.asarray(injection.start).min() < 0:
        raise InjectionError("injection start positions must be >= 0")
    norm_rows = np.asarray(injection.norm_match) & (np.asarray(injection.strength) != 0)
    if np.any(np.linalg.norm(vector[norm_rows], axis=-1) == 0):
        raise InjectionError("norm_match needs a non-zero vector to take its direction")


def residual_delta(injection: Injection, index: jax.Array, positions: jax.Array, token_valid: jax.Array,
                   mlp_out: jax.Array, dtype) -> jax.Array:
    """What layer `index` adds to the residual stream [B, T, D] (zeros for rows not injected here)."""
    here = (injection.layer == index)[:, None] & (positions >= injection.start[:, None]) & token_valid
    vector = injection.vector[:, None, :]  # [B, 1, D], float32
    raw = injection.strength[:, None, None] * vector
    direction = vector / jnp.maximum(jnp.linalg.norm(vector, axis=-1, keepdims=True), 1e-30)
    token_norm = jnp.linalg.norm(mlp_out.astype(jnp.float32), axis=-1, keepdims=True)
    matched = injection.strength[:, None, None] * direction * token_norm
    delta = jnp.where(injection.norm_match[:, None, None], matched, raw)
    return jnp.where(here[..., None], delta, 0.0).astype(dtype)
