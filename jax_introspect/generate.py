"""Batched generation: prefill and the decode loop inside one jitted program."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_introspect import model as model_lib
from jax_introspect.config import ModelConfig


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_generate(params: model_lib.Params, cfg: ModelConfig, tokens: jax.Array, token_valid: jax.Array,
                    eos_ids: jax.Array, pad_id: jax.Array, max_new_tokens: int):
    """Greedy continuation of a left-padded batch.

    Returns (new_tokens [B, max_new_tokens], lengths [B]): each row stops after its first EOS
    (kept in the output, counted in its length); the rest of the row is `pad_id`.
    """
    batch, prompt_len = tokens.shape
    cache = model_lib.init_cache(cfg, batch, prompt_len + max_new_tokens, params.embed.dtype)
    positions = model_lib.prompt_positions(token_valid)
    logits, cache, _ = model_lib.forward(params, cfg, tokens, positions, token_valid, cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    lengths = jnp.zeros((batch,), jnp.int32)

    def keep_going(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(state):
        step, token, position, out, done, lengths, cache = state
        out = out.at[:, step].set(jnp.where(done, pad_id, token))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos_ids)
        logits, cache, _ = model_lib.forward(params, cfg, token[:, None], position[:, None],
                                             jnp.ones((batch, 1), bool), cache)
        token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return step + 1, token, position + 1, out, done, lengths, cache

    state = (jnp.int32(0), first, positions[:, -1] + 1, out, done, lengths, cache)
    _, _, _, out, _, lengths, _ = jax.lax.while_loop(keep_going, decode_step, state)
    return out, lengths
