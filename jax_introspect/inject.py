"""Concept injection as data: what to add to the residual stream, where, per batch row.

An `Injection` holds one entry per batch row. Inside the scanned decoder, after decoder layer
`layer[b]`, every token of row b at RoPE position p with `start[b] <= p < end[b]` gets

    h += strength[b] * vector[b]                                              norm_match 0, "raw"
    h += strength[b] * vector[b] * |mlp_out| / (|vector[b]| + 1e-6)           norm_match 1, "mlp_out"
    h += strength[b] * vector[b] * |h|       / (|vector[b]| + 1e-6)           norm_match 2, "residual"

with the norms taken per token, in float32: `mlp_out` is that layer's MLP output and `h` the
residual stream after the layer (attention and MLP added, before this addition). These are
vllm-lens' `SteeringVector(norm_match=True)` rules (`vllm_lens/_worker_ext.py`, `norm_match` and
`_apply_steering`): 1.1.0, which the public 405B replication ran, scales to the norm of the
decoder layer's output[0], for vLLM's Llama the MLP output ("mlp_out"); >= 1.2.0 scales to
output[0] + output[1], the full residual stream ("residual"). docs/injection.md has the check
against vllm-lens and vLLM. All fields are traced arrays, so any mix of layers, strengths,
vectors, windows and modes runs in one compiled program; a row with strength 0 is a clean run,
bit for bit.

The window [start, end) is in RoPE positions (0 = the row's first real token), in the prefill and
in every decode step alike. `end` is exclusive; `NO_END` (the int32 maximum, the default of `make`)
means no end: the injection runs through the rest of the prompt and every generated token, as it
did before `end` existed (bit for bit: the extra comparison is true everywhere). A single token p
is `start=p, end=p + 1` (Rivera 2025's recipe injects the final prompt token only, then removes
the injection: the answer tokens get none).
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


# norm_match modes, by their int code (the index).
NORM_MODES = ("raw", "mlp_out", "residual")
RAW, MLP_OUT, RESIDUAL = range(len(NORM_MODES))
# vllm-lens' `norm_match(residual, steering, eps=1e-6)` divides by |steering| + eps.
VLLM_LENS_EPS = 1e-6
# `Injection.end` of a row with no end: no RoPE position reaches the int32 maximum.
NO_END = int(np.iinfo(np.int32).max)


def norm_mode(value) -> int:
    """One row's norm_match setting as its int code: False/0/"raw", True/1/"mlp_out" (vllm-lens
    1.1.0, the 405B replication's), 2/"residual" (vllm-lens >= 1.2.0)."""
    if isinstance(value, str) and value in NORM_MODES:
        return NORM_MODES.index(value)
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)) and 0 <= value < len(NORM_MODES):
        return int(value)
    raise InjectionError(f"norm_match={value!r}: choose False/0/'raw', True/1/'mlp_out' (vllm-lens 1.1.0) "
                         "or 2/'residual' (vllm-lens >= 1.2.0)")


def norm_modes(norm_match):
    """A scalar or per-row norm_match setting as int codes (a scalar stays a scalar)."""
    values = list(norm_match) if isinstance(norm_match, (list, tuple)) else np.asarray(norm_match).tolist()
    if isinstance(values, list):
        return [norm_mode(v) for v in values]
    return norm_mode(values)


@flax.struct.dataclass
class Injection:
    layer: jax.Array  # [B] int32, decoder layer whose output is modified
    strength: jax.Array  # [B] float32
    vector: jax.Array  # [B, D] float32
    start: jax.Array  # [B] int32, first injected position (0 = every position)
    end: jax.Array  # [B] int32, first position no longer injected (exclusive; NO_END = no end)
    norm_match: jax.Array  # [B] int32, index into NORM_MODES

    @property
    def batch(self) -> int:
        return int(self.layer.shape[0])


def make(layer, strength, vector, start=0, norm_match=False, *, end=None, batch: Optional[int] = None) -> Injection:
    """Build an Injection from scalars or per-row sequences (scalars are broadcast to `batch`).
    `vector` is [D] (shared) or [B, D]; `norm_match` is a mode name, code or bool (`norm_mode`);
    `end` is the exclusive end position (None: no end, `NO_END`; a per-row sequence may hold None
    for rows without one)."""
    vector = np.asarray(vector, np.float32)
    norm_match = norm_modes(norm_match)
    if end is None:
        end = NO_END
    elif np.ndim(end) == 1:
        end = [NO_END if e is None else e for e in end]
    if batch is None:
        sizes = [len(x) for x in (layer, strength, start, end, norm_match) if np.ndim(x) == 1]
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
                     end=rows(end, np.int32), norm_match=rows(norm_match, np.int32))


def none(batch: int, d_model: int) -> Injection:
    """The clean run: strength 0 everywhere (start 0, no end)."""
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
    start, end = np.asarray(injection.start), np.asarray(injection.end)
    if start.min() < 0:
        raise InjectionError("injection start positions must be >= 0")
    empty = (end <= start) & (np.asarray(injection.strength) != 0)
    if np.any(empty):
        rows = np.nonzero(empty)[0].tolist()
        raise InjectionError(f"injection rows {rows} have end <= start (start {start[rows].tolist()}, end "
                             f"{end[rows].tolist()}): the window [start, end) is empty. end is exclusive: inject "
                             "the single token p with start=p, end=p + 1, or pass end=None for no end")
    modes = np.asarray(injection.norm_match)
    if not np.all((modes >= 0) & (modes < len(NORM_MODES))):
        raise InjectionError(f"norm_match codes {modes.tolist()}: each must index {NORM_MODES}")
    norm_rows = (modes != RAW) & (np.asarray(injection.strength) != 0)
    if np.any(np.linalg.norm(vector[norm_rows], axis=-1) == 0):
        raise InjectionError("norm_match needs a non-zero vector to take its direction")


def residual_delta(injection: Injection, index: jax.Array, positions: jax.Array, token_valid: jax.Array,
                   mlp_out: jax.Array, residual: jax.Array) -> jax.Array:
    """What layer `index` adds to the residual stream [B, T, D] (zeros for rows not injected here),
    in the residual's dtype. `residual` is the stream after the layer, before this addition."""
    in_window = (positions >= injection.start[:, None]) & (positions < injection.end[:, None])
    here = (injection.layer == index)[:, None] & in_window & token_valid
    vector = injection.vector[:, None, :]  # [B, 1, D], float32
    strength = injection.strength[:, None, None]
    mode = injection.norm_match[:, None, None]

    def token_norm(x):
        return jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    target_norm = jnp.where(mode == RESIDUAL, token_norm(residual), token_norm(mlp_out))
    # vllm-lens' order: vector * (|target| / (|vector| + eps)), then * scale.
    matched = vector * (target_norm / (jnp.linalg.norm(vector, axis=-1, keepdims=True) + VLLM_LENS_EPS)) * strength
    delta = jnp.where(mode == RAW, strength * vector, matched)
    return jnp.where(here[..., None], delta, 0.0).astype(residual.dtype)
