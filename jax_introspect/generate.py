"""Batched generation: prefill and the decode loop inside one jitted program.

Every row carries its own sampling settings and PRNG key, and the key for step t is
`fold_in(row_key, t)`: a trial's text depends on its key, not on which batch it lands in. Keys
come from `trial_key(seed, trial_id)`. Temperature 0 means greedy.
"""
from __future__ import annotations

import hashlib

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect import inject as inject_lib
from jax_introspect import model as model_lib
from jax_introspect.config import ModelConfig


@flax.struct.dataclass
class Sampling:
    temperature: jax.Array  # [B] float32; 0 = greedy
    top_p: jax.Array  # [B] float32 in (0, 1]
    keys: jax.Array  # [B, 2] uint32 raw PRNG keys


def trial_key(seed: int, trial_id: str) -> np.ndarray:
    """A raw PRNG key derived from the run seed and the trial's identity (stable across runs,
    processes and batch layouts)."""
    digest = int.from_bytes(hashlib.sha256(trial_id.encode()).digest()[:4], "little")
    return np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), digest), np.uint32)


def sampling(batch: int, temperature=0.0, top_p=1.0, keys=None) -> Sampling:
    def rows(x):
        x = np.asarray(x, np.float32)
        return np.full((batch,), x, np.float32) if x.ndim == 0 else x
    temperature, top_p = rows(temperature), rows(top_p)
    if temperature.shape != (batch,) or top_p.shape != (batch,):
        raise ValueError(f"temperature/top_p must be scalars or have {batch} entries")
    if np.any(~np.isfinite(temperature)) or np.any(temperature < 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature.tolist()}")
    if np.any(~(top_p > 0)) or np.any(top_p > 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p.tolist()}")
    if keys is None:
        keys = np.stack([trial_key(0, str(i)) for i in range(batch)])
    keys = np.asarray(keys, np.uint32)
    if keys.shape != (batch, 2):
        raise ValueError(f"keys must have shape ({batch}, 2), got {keys.shape}")
    return Sampling(temperature=temperature, top_p=top_p, keys=keys)


def nucleus_mask(logits: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-p set of one row's logits [V] as a bool mask: the most probable tokens whose mass
    reaches top_p, the token that crosses it included (ties at the edge all kept).

    Sort-free: the set is {p >= t*}, t* = the smallest t with mass(p > t) < top_p. Non-negative
    float32 values order like their int32 bit patterns, so 31 bisection steps over those bits find
    t* exactly; each step is one masked sum over the vocabulary (a sort of a 128k vocabulary per
    row per step is far slower, and is poorly parallel on every backend)."""
    probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6))

    def mass_above(bits):
        return jnp.sum(jnp.where(probs > jax.lax.bitcast_convert_type(bits, jnp.float32), probs, 0.0))

    def bisect(_, bounds):
        lo, hi = bounds  # invariant: mass_above(hi) < top_p; the answer lies in [lo, hi]
        mid = lo + (hi - lo) // 2
        below = mass_above(mid) < top_p
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    top = jax.lax.bitcast_convert_type(jnp.max(probs), jnp.int32)
    _, threshold = jax.lax.fori_loop(0, 31, bisect, (jnp.int32(0), top))
    # top_p = 1 keeps everything even where float32 rounding makes the total mass exceed 1.
    return (probs >= jax.lax.bitcast_convert_type(threshold, jnp.float32)) | (top_p >= 1.0)


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` for NaN-free `x` (the first index holding the maximum), as a max and
    a min over indices: XLA's TPU compiler takes seconds longer over a 128k vocabulary for
    argmax's (value, index) reduction (libtpu compile-only, one chip, [32, 128256] Gumbel draws:
    5.4 s with argmax, 2.8 s with this)."""
    best = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == best, jnp.arange(x.shape[-1]), x.shape[-1]), axis=-1)


def next_tokens(logits: jax.Array, params: Sampling, step: jax.Array) -> jax.Array:
    """Each row's next token from its logits [B, V]: row b's key folded with its step (`step` a
    scalar, or [B] when rows are at different steps, as the sweep engine's slots are).

    A sampled row draws `jax.random.categorical(key, scaled logits outside the nucleus = -inf)`'s
    token: the same Gumbel noise (`jax.random.gumbel(key, [V])`) and its first maximum. The noise
    is drawn once for both nucleus paths (each draw over a 128k vocabulary is seconds of a TPU
    compile, once per sampling site)."""
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), params.keys.shape[:1])
    keys = jax.vmap(jax.random.fold_in)(params.keys, steps)
    scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
    # With top_p = 1 on every row the nucleus is the whole vocabulary: skip its threshold search.
    # Same key, same logits -> the same token on both paths (tests/test_injection.py).
    keep = jax.lax.cond(jnp.all(params.top_p >= 1.0), lambda: jnp.ones(logits.shape, bool),
                        lambda: jax.vmap(nucleus_mask)(logits, params.temperature, params.top_p))
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], logits.dtype))(keys)
    sampled = first_argmax(noise + jnp.where(keep, scaled, -jnp.inf))
    greedy = first_argmax(logits)
    return jnp.where(params.temperature > 0, sampled, greedy).astype(jnp.int32)


def _generate(params: model_lib.Params, cfg: ModelConfig, tokens: jax.Array, token_valid: jax.Array,
              injection: inject_lib.Injection, sample: Sampling, eos_ids: jax.Array, pad_id: jax.Array,
              max_new_tokens: int, return_logits: bool = False, *, layout, adapter=None):
    """Continue a left-padded batch, injecting in prefill and at every decode step.

    Returns (new_tokens [B, max_new_tokens], lengths [B], step_logits): each row stops after its
    first EOS (kept in the output, counted in its length); the rest of the row is `pad_id`.
    step_logits: with `return_logits`, the float32 logits [B, max_new_tokens, V] each token was
    chosen from (for parity checks); otherwise None.
    layout: the `sharding.Layout` to run on (one device: a 1x1 mesh). Inputs arrive placed by
    `Layout.put` (or the loader); the KV cache and activations are pinned to the layout, and the
    generated ids and lengths come back replicated (every process can read them) while step
    logits stay split over batch and vocab.
    adapter: optional `adapters.Adapter` placed on the layout (`adapters.place`), traced: adapters of
    one shape share the compiled program.
    """
    batch, prompt_len = tokens.shape
    cache = layout.constrain_cache(model_lib.init_cache(cfg, batch, prompt_len, params.embed.dtype))
    positions = model_lib.prompt_positions(token_valid)
    logits, cache, _ = model_lib.forward(params, cfg, tokens, positions, token_valid, cache,
                                         injection=injection, layout=layout, last_only=True, adapter=adapter)
    cache = layout.constrain_cache(model_lib.extend_cache(cache, max_new_tokens))
    last = logits[:, -1]
    first = next_tokens(last, sample, jnp.int32(0))
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    recorded = jnp.zeros((batch, max_new_tokens if return_logits else 0, cfg.vocab_size), jnp.float32)

    def keep_going(state):
        step, done = state[0], state[4]
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(state):
        step, token, position, out, done, lengths, cache, last, recorded = state
        out = out.at[:, step].set(jnp.where(done, pad_id, token))
        if return_logits:
            recorded = recorded.at[:, step].set(last)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos_ids)
        logits, cache, _ = model_lib.forward(params, cfg, token[:, None], position[:, None],
                                             jnp.ones((batch, 1), bool), cache, injection=injection,
                                             layout=layout, adapter=adapter)
        last = logits[:, 0]
        token = next_tokens(last, sample, step + 1)
        return step + 1, token, position + 1, out, done, lengths, cache, last, recorded

    state = (jnp.int32(0), first, positions[:, -1] + 1, out, jnp.zeros((batch,), bool),
             jnp.zeros((batch,), jnp.int32), cache, last, recorded)
    state = jax.lax.while_loop(keep_going, decode_step, state)
    out, lengths, recorded = state[3], state[5], state[8]
    out, lengths = (jax.lax.with_sharding_constraint(x, layout.replicated) for x in (out, lengths))
    return out, lengths, (layout.pin(recorded, "logits") if return_logits else None)


# One program for every mesh: `layout` is static, so a sweep compiles it once per prompt-length
# bucket (and batch shape), whatever the rows' injections and sampling settings.
generate_tokens = jax.jit(_generate, static_argnames=("cfg", "max_new_tokens", "return_logits", "layout"))
