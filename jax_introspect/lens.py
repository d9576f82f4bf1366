"""What a prompt's last position says before any token is sampled: the first answer token's yes / no
probability and the logit lens, as pure functions of one forward's last-position logits and
residuals. The sweep engine computes them inside its cell prefill (`engine.py`), the experiment
side's readout in its own forward (`experiment/readout.py`); both call `answer_readout`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect import model as model_lib

WORD_FORMS = 4  # a word's first tokens: "Word", " Word", "word", " word" (repeats dropped, padded)


def padded_word_ids(ids) -> list:
    """A word's first tokens padded to WORD_FORMS with its first (a repeat changes no maximum); [0] * WORD_FORMS
    for none (a control: its word fields are not recorded)."""
    ids = list(ids) or [0]
    return (ids + ids[:1] * WORD_FORMS)[:WORD_FORMS]


def token_mask(ids, vocab_size: int) -> np.ndarray:
    """[V] float32: 1 at `ids`, 0 elsewhere (p_yes sums the softmax under it)."""
    mask = np.zeros(vocab_size, np.float32)
    mask[list(ids)] = 1.0
    return mask


def k_largest(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` exactly (the k largest along the last axis, descending; of equal values
    the lower index first; NaN-free input), as k passes of max and first index. XLA's TPU compiler
    takes ~30 s for one `lax.top_k` over a 128k vocabulary, in every engine program with a readout
    (libtpu compile-only v6e, [64, 2, 128256], top 10: 29.9-32.1 s; these passes: 2.4 s); at run time
    the passes read a few rows' probabilities k times, nothing beside the prefill before them."""
    index = jnp.arange(x.shape[-1])

    def one_pass(i, carry):  # a loop: 10 passes unrolled took 25.2 s to compile
        taken, values, indices = carry
        best = jnp.max(jnp.where(taken, -jnp.inf, x), axis=-1)
        # The first untaken index holding the maximum (argmax of a bool: its first True).
        first = jnp.argmax((x == best[..., None]) & ~taken, axis=-1).astype(jnp.int32)
        return (taken | (index == first[..., None]), values.at[..., i].set(best), indices.at[..., i].set(first))

    batch = x.shape[:-1]
    _, values, indices = jax.lax.fori_loop(
        0, k, one_pass, (jnp.zeros(x.shape, bool), jnp.zeros(batch + (k,), x.dtype), jnp.zeros(batch + (k,), jnp.int32)))
    return values, indices


def answer_readout(params, cfg, last_logits, last_residuals, lens_layers, word_ids, yes_mask, no_mask, *, top_k: int):
    """Per row b: p_yes / p_no [B] (float32 softmax of `last_logits` [B, V] summed over `yes_mask` /
    `no_mask` [V]); per lens m: the residual after layer lens_layers[b, m] ([B, M] int32) at the last
    position (`last_residuals` [L, B, D]: `forward(return_residuals="last")`), through the final
    RMSNorm and the unembedding, softmaxed: its top-k (probs, ids) [B, M, k], the best probability
    among word_ids[b] ([B, WORD_FORMS]) [B, M], that token [B, M] and its rank [B, M] (1 = top)."""
    batch = last_logits.shape[0]
    probs = jax.nn.softmax(last_logits.astype(jnp.float32), axis=-1)
    out = {"p_yes": jnp.sum(probs * yes_mask, axis=-1), "p_no": jnp.sum(probs * no_mask, axis=-1)}
    h = last_residuals[lens_layers, jnp.arange(batch)[:, None]]  # [B, M, D]
    h = model_lib.rms_norm(h, params.final_norm, cfg.rms_norm_eps)
    head = params.embed.T if params.lm_head is None else params.lm_head
    lens = model_lib.linear("btd,dv->btv", h, head, params.lm_head_scale, model_lib._precision(h.dtype))
    lens_probs = jax.nn.softmax(lens.astype(jnp.float32), axis=-1)  # [B, M, V]
    out["top_probs"], out["top_ids"] = k_largest(lens_probs, top_k)
    word_probs = jnp.take_along_axis(lens_probs, jnp.broadcast_to(word_ids[:, None], h.shape[:2] + word_ids.shape[1:]),
                                     axis=-1)  # [B, M, WORD_FORMS]
    best = jnp.argmax(word_probs, axis=-1)[..., None]
    out["word_prob"] = jnp.take_along_axis(word_probs, best, axis=-1)[..., 0]
    out["word_token"] = jnp.take_along_axis(jnp.broadcast_to(word_ids[:, None], word_probs.shape), best, axis=-1)[..., 0]
    out["word_rank"] = 1 + jnp.sum(lens_probs > out["word_prob"][..., None], axis=-1)
    return out
