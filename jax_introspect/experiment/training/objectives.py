"""Training objectives on answer tokens: SFT (cross-entropy) and DPO (against the frozen base model).

Every loss runs the whole sequence through `model.forward` with a fresh KV cache of the sequence
length (prompt width + answer width), the example's injection and the adapter, in two calls on
that one cache: the left-padded prompt (only its last column's logits are computed: they predict
the first answer token), then the right-padded answer (its logits predict the answer's next
tokens). Logits are thus made for the answer tokens only: the [rows, prompt, vocab] float32
logits of a 128k vocabulary are never built. The math is one causal forward pass over
prompt + answer (tests/test_training.py checks it against transformers on whole sequences).

- SFT: mean over the batch's answer tokens (end-of-turn included) of -log p(token); prompt and
  pad tokens are masked out.
- DPO (Rafailov et al. 2023; TRL's "sigmoid" loss): per pair,
  -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]), with log pi(y) the
  sum of y's answer-token log-probs under the adapter and log ref(y) under the base model
  (`adapter=None`, stop-gradient), the same injection in both; mean over pairs.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_introspect import model as model_lib


def answer_token_logps(params, cfg, arrays: dict, adapter, *, layout):
    """(token log-probs [R, A] float32 (0 at pad slots), answer mask [R, A] bool)."""
    prompt, prompt_valid = arrays["prompt"], arrays["prompt_valid"]
    answer, answer_valid = arrays["answer"], arrays["answer_valid"]
    injection = arrays["injection"]
    R, P = prompt.shape
    A = answer.shape[1]
    cache = layout.constrain_cache(model_lib.init_cache(cfg, R, P + A, params.embed.dtype))
    logits_p, cache, _ = model_lib.forward(params, cfg, prompt, model_lib.prompt_positions(prompt_valid),
                                           prompt_valid, cache, layout=layout, injection=injection,
                                           last_only=True, adapter=adapter)
    n_prompt = jnp.sum(prompt_valid.astype(jnp.int32), axis=1)
    positions = n_prompt[:, None] + jnp.arange(A, dtype=jnp.int32)[None, :]
    logits_a, _, _ = model_lib.forward(params, cfg, answer, positions, answer_valid, cache, layout=layout,
                                       injection=injection, adapter=adapter)
    # Column j predicts answer token j: the last prompt column, then answer columns 0..A-2.
    logits = jnp.concatenate([logits_p, logits_a[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(logp, answer[..., None], axis=-1)[..., 0]
    return jnp.where(answer_valid, token, 0.0), answer_valid


def sequence_logps(params, cfg, arrays: dict, adapter, *, layout):
    """Sum of each row's answer-token log-probs [R]."""
    token, _ = answer_token_logps(params, cfg, arrays, adapter, layout=layout)
    return jnp.sum(token, axis=-1)


def sft_loss(adapter, params, cfg, arrays: dict, *, layout):
    token, mask = answer_token_logps(params, cfg, arrays, adapter, layout=layout)
    n = jnp.maximum(jnp.sum(mask), 1)
    loss = -jnp.sum(token) / n
    return loss, {"loss": loss, "answer_tokens": jnp.sum(mask).astype(jnp.float32)}


def dpo_from_logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """The DPO loss and its usual metrics from summed log-probs [B] each."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = jnp.mean(-jax.nn.log_sigmoid(margin))
    return loss, {"loss": loss, "reward_accuracy": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
                  "reward_margin": jnp.mean(margin), "chosen_reward": jnp.mean(chosen_reward),
                  "rejected_reward": jnp.mean(rejected_reward)}


def dpo_loss(adapter, params, cfg, arrays: dict, *, layout, beta: float, reference_adapter: Optional[object] = None):
    """`arrays` holds 2B rows: the B chosen answers then the B rejected ones (same prompts and
    injections). The reference is the base model (`reference_adapter` None) under stop-gradient."""
    policy = sequence_logps(params, cfg, arrays, adapter, layout=layout)
    reference = jax.lax.stop_gradient(sequence_logps(params, cfg, arrays, reference_adapter, layout=layout))
    B = policy.shape[0] // 2
    return dpo_from_logps(policy[:B], policy[B:], reference[:B], reference[B:], beta)
