"""Where a decode step of SmolLM2-135M goes on this CPU, and what two changes would buy.

    python -m benchmarks.decode_breakdown [--batches=1,8,32] [--runs=3]

Per decode step (ms, one token for each of `batch` rows, a 228-slot KV cache as in the
throughput benchmark: 128 prompt + 100 new tokens), each timed as a jitted loop of `steps`
steps so dispatch is amortized:

- `model.forward`, T=1, with the injection: the library's decoder step;
- the same with `model._attention` replaced by the identity (what attention costs);
- a prototype of the same decoder step (`forward_kv_head_major` below: the library's math,
  unsharded) with the KV cache stored `[L, B, K, hd, S]` (keys, transposed) and `[L, B, K, S, hd]`
  (values) instead of `[L, B, S, K, hd]`, and the query heads of a KV head batched into one
  matmul;
- sampling, temperature 1, top_p 1 on `[batch, vocab]` float32 logits: the library's
  `generate.next_tokens` (sort-based nucleus on every row), `jax.random.categorical` (the same
  draw when top_p = 1, no sort), inverse-CDF (one uniform per row), and greedy argmax;
- end to end: `generate_tokens`' decode rate (batch x 20 / (t(21) - t(1)), median of
  `e2e_runs`) as shipped, and with `next_tokens` patched (in this process only) to skip the sort
  when every row has top_p = 1; "same tokens" compares the two programs' sampled ids.

Nothing in jax_introspect is modified: the variants are monkeypatched before tracing.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.generation_throughput import LAYER, PROMPT_LEN, START, STRENGTH, injection_vector, prompt_ids

CACHE = PROMPT_LEN + 100
E2E_TOKENS = 21


def _timed(fn, args, steps, runs):
    jax.block_until_ready(fn(*args))
    return common.median([common.time_call(lambda: jax.block_until_ready(fn(*args))) for _ in range(runs)]) / steps * 1e3


@contextlib.contextmanager
def patched(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def forward_steps(lm, batch, steps, attention=None):
    from jax_introspect import inject
    from jax_introspect import model as model_lib
    cfg = lm.config
    injection = inject.make(LAYER, STRENGTH, injection_vector(cfg.d_model), start=START, batch=batch)

    def run(params, injection):
        cache = model_lib.init_cache(cfg, batch, CACHE, params.embed.dtype)
        cache = cache.replace(valid=cache.valid.at[:, :PROMPT_LEN].set(True), length=jnp.int32(PROMPT_LEN))

        def one(i, carry):
            token, cache = carry
            logits, cache, _ = model_lib.forward(params, cfg, token[:, None], jnp.full((batch, 1), PROMPT_LEN) + i,
                                                 jnp.ones((batch, 1), bool), cache, injection=injection)
            return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache
        return jax.lax.fori_loop(0, steps, one, (jnp.zeros((batch,), jnp.int32), cache))[0]
    ctx = patched(model_lib, "_attention", attention) if attention else contextlib.nullcontext()
    with ctx:
        fn = jax.jit(run)
        jax.block_until_ready(fn(lm.params, injection))  # trace while patched
    return fn, (lm.params, injection)


def forward_kv_head_major(params, cfg, tokens, positions, token_valid, k_cache, v_cache, valid, start, injection):
    """`model.forward` (no layout, logits of the last column) with a head-major KV cache:
    k_cache [L, B, K, hd, S], v_cache [L, B, K, S, hd]."""
    from jax_introspect import inject
    from jax_introspect import model as m
    B, T = tokens.shape
    K, G, hd = cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim
    cache_valid = jax.lax.dynamic_update_slice(valid, token_valid, (0, start))
    mask = m.attention_mask(cache_valid, start, T)
    cos, sin = m.rope_cos_sin(m.rope_inverse_frequencies(cfg), positions, params.embed.dtype)

    def layer_step(carry, layer_and_index):
        h, k_all, v_all = carry
        layer, index = layer_and_index
        x = m.rms_norm(h, layer.attn_norm, cfg.rms_norm_eps)
        q = m.apply_rope(jnp.einsum("btd,dhk->bthk", x, layer.wq), cos, sin)
        k = m.apply_rope(jnp.einsum("btd,dhk->bthk", x, layer.wk), cos, sin)
        v = jnp.einsum("btd,dhk->bthk", x, layer.wv)
        k_all = jax.lax.dynamic_update_slice(k_all, k.transpose(0, 2, 3, 1)[None], (index, 0, 0, 0, start))
        v_all = jax.lax.dynamic_update_slice(v_all, v.transpose(0, 2, 1, 3)[None], (index, 0, 0, start, 0))
        # The G query heads of each KV head (and the T queries) form the rows of one matmul.
        qh = q.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, hd)
        scores = jnp.einsum("bkmd,bkds->bkms", qh, k_all[index]) * hd ** -0.5
        scores = jnp.where(mask[:, None, None], scores.reshape(B, K, G, T, -1), -jnp.inf)
        probs = jax.nn.softmax(scores, -1).reshape(B, K, G * T, -1)
        attn = jnp.einsum("bkms,bksd->bkmd", probs, v_all[index]).reshape(B, K, G, T, hd)
        attn = attn.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, hd)
        h = h + jnp.einsum("bthk,hkd->btd", attn, layer.wo)
        mlp_out = m._mlp(m.rms_norm(h, layer.mlp_norm, cfg.rms_norm_eps), layer)
        h = h + mlp_out + inject.residual_delta(injection, index, positions, token_valid, mlp_out, h.dtype)
        return (h, k_all, v_all), None

    (h, k_all, v_all), _ = jax.lax.scan(layer_step, (params.embed[tokens], k_cache, v_cache),
                                        (params.layers, jnp.arange(cfg.n_layers)))
    h = m.rms_norm(h[:, -1:], params.final_norm, cfg.rms_norm_eps)
    head = params.embed.T if params.lm_head is None else params.lm_head
    return jnp.einsum("btd,dv->btv", h, head), k_all, v_all, cache_valid


def forward_steps_head_major(lm, batch, steps):
    from jax_introspect import inject
    cfg = lm.config
    L, K, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    injection = inject.make(LAYER, STRENGTH, injection_vector(cfg.d_model), start=START, batch=batch)

    def run(params, injection):
        k = jnp.zeros((L, batch, K, hd, CACHE), params.embed.dtype)
        v = jnp.zeros((L, batch, K, CACHE, hd), params.embed.dtype)
        valid = jnp.zeros((batch, CACHE), bool).at[:, :PROMPT_LEN].set(True)

        def one(i, carry):
            token, k, v, valid = carry
            logits, k, v, valid = forward_kv_head_major(
                params, cfg, token[:, None], jnp.full((batch, 1), PROMPT_LEN) + i, jnp.ones((batch, 1), bool),
                k, v, valid, PROMPT_LEN + i, injection)
            return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), k, v, valid
        return jax.lax.fori_loop(0, steps, one, (jnp.zeros((batch,), jnp.int32), k, v, valid))[0]
    return jax.jit(run), (lm.params, injection)


def sampling_steps(cfg, batch, steps, method):
    from jax_introspect import generate as generate_lib
    sample = generate_lib.sampling(batch, 1.0, 1.0, np.stack([generate_lib.trial_key(0, str(i)) for i in range(batch)]))
    logits = jax.random.normal(jax.random.PRNGKey(1), (batch, cfg.vocab_size)) * 3

    def draw(logits, sample, step):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(sample.keys)
        if method == "library":
            return generate_lib.next_tokens(logits, sample, step)
        if method == "categorical":
            return jax.vmap(jax.random.categorical)(keys, logits / sample.temperature[:, None]).astype(jnp.int32)
        if method == "inverse_cdf":
            scaled = logits / sample.temperature[:, None]
            cdf = jnp.cumsum(jnp.exp(scaled - scaled.max(-1, keepdims=True)), -1)
            u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
            return jnp.argmax(cdf > u[:, None], -1).astype(jnp.int32)
        return jnp.argmax(logits, -1).astype(jnp.int32)

    @jax.jit
    def run(logits, sample):
        # Each step's logits depend on the previous draw, so no step can be hoisted or dropped.
        def one(i, acc):
            return acc + draw(logits + 1e-6 * acc[:, None].astype(jnp.float32), sample, i)
        return jax.lax.fori_loop(0, steps, one, jnp.zeros((batch,), jnp.int32))
    return run, (logits, sample)


def next_tokens_skipping_sort(logits, params, step):
    """`generate.next_tokens` with the sort-based nucleus only when some row has top_p < 1;
    otherwise `jax.random.categorical` on the tempered logits (the draw the nucleus path makes
    when it keeps the whole vocabulary)."""
    from jax_introspect import generate as generate_lib
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(params.keys)

    def nucleus(_):
        return jax.vmap(generate_lib._sample_row)(logits, keys, params.temperature, params.top_p)

    def whole_vocabulary(_):
        scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
        return jax.vmap(jax.random.categorical)(keys, scaled)
    sampled = jax.lax.cond(jnp.all(params.top_p >= 1.0), whole_vocabulary, nucleus, None)
    greedy = jnp.argmax(logits, axis=-1)
    return jnp.where(params.temperature > 0, sampled, greedy).astype(jnp.int32)


def end_to_end(lm, batch, runs, patch_sampling: bool):
    """generate_tokens' decode rate (tokens/s over 20 steps), as shipped or with the sampling patch."""
    from benchmarks.generation_throughput import Ours
    from jax_introspect import generate as generate_lib
    ours = Ours(lm, prompt_ids(lm), batch)

    def fresh(params, cfg, tokens, token_valid, injection, sample, eos_ids, pad_id, max_new_tokens,
              return_logits=False, layout=None):
        # A new function object, so jax's trace caches (keyed on the function) cannot hand back
        # a program traced before the patch.
        return generate_lib._generate(params, cfg, tokens, token_valid, injection, sample, eos_ids, pad_id,
                                      max_new_tokens, return_logits, layout)
    program = jax.jit(fresh, static_argnames=("cfg", "max_new_tokens", "return_logits", "layout"))
    ctx = patched(generate_lib, "next_tokens", next_tokens_skipping_sort) if patch_sampling else contextlib.nullcontext()
    with ctx, patched(generate_lib, "generate_tokens", program):
        tokens = ours(E2E_TOKENS)  # compiles (while patched) and runs once untimed
        ours.compile(1)
        tn, t1 = [], []
        for _ in range(runs):
            tn.append(common.time_call(lambda: ours(E2E_TOKENS)))
            t1.append(common.time_call(lambda: ours(1)))
    return batch * (E2E_TOKENS - 1) / (common.median(tn) - common.median(t1)), tokens


def run(batches: Sequence[int] = (1, 8, 32), runs: int = 3, steps: int = 10, checkpoint: Optional[str] = None,
        e2e_runs: int = 2):
    common.quiet_libraries()
    import jax_introspect
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint(checkpoint or common.SMOLLM2_CHECKPOINT))
    cfg = lm.config
    rows = []
    for batch in batches:
        row = dict(batch=batch, load=common.load_average()[0])
        row["forward"] = _timed(*forward_steps(lm, batch, steps), steps, runs)
        row["forward_no_attention"] = _timed(*forward_steps(lm, batch, steps, lambda c, q, k, v, m: q), steps, runs)
        row["forward_head_major"] = _timed(*forward_steps_head_major(lm, batch, steps), steps, runs)
        for method in ("library", "categorical", "inverse_cdf", "greedy"):
            row[f"sample_{method}"] = _timed(*sampling_steps(cfg, batch, steps * 2, method), steps * 2, runs)
        row["e2e_now"], now_tokens = end_to_end(lm, batch, e2e_runs, False)
        row["e2e_patched"], patched_tokens = end_to_end(lm, batch, e2e_runs, True)
        row["same_tokens"] = float(np.mean(now_tokens == patched_tokens))
        common.log(f"batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
        rows.append(row)
    return rows


def markdown(rows) -> str:
    lines = ["### Decode step breakdown (SmolLM2-135M float32, 228-slot KV cache, ms per step)", "",
             "Evidence for the recommendations in docs/performance.md; variants are monkeypatched in this "
             "process, the library is unchanged.", ""]
    body = []
    for r in rows:
        body.append([r["batch"], f"{r['forward']:.1f}", f"{r['forward'] - r['forward_no_attention']:.1f}",
                     f"{r['forward_head_major']:.1f}",
                     f"{r['sample_library']:.1f}", f"{r['sample_categorical']:.1f}", f"{r['sample_inverse_cdf']:.1f}",
                     f"{r['sample_greedy']:.1f}", f"{r['e2e_now']:.1f}", f"{r['e2e_patched']:.1f}",
                     f"{r['e2e_patched'] / r['e2e_now']:.2f}x",
                     f"{100 * r['same_tokens']:.0f}%", f"{r['load']:.2f}"])
    lines.append(common.table(
        ["batch", "forward step", "of it attention", "forward step, head-major KV cache (prototype)",
         "sampling: next_tokens (sort)", "sampling: categorical", "sampling: inverse CDF", "greedy argmax",
         "decode tok/s as shipped", "decode tok/s, sort skipped at top_p=1", "gain",
         "same tokens as shipped", "load"], body))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    print(markdown(run([int(b) for b in args.batches.split(",")], args.runs, checkpoint=args.checkpoint)))


if __name__ == "__main__":
    main()
