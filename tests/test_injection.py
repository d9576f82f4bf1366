"""Concept injection against HF transformers with forward hooks doing the same addition, and
its norm-matched modes against vllm-lens' steering formulas."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
import jax_introspect
from jax_introspect import generate as generate_lib
from jax_introspect import inject, model as model_lib
from launch import gpu_reference
from tests import hf_reference as ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Briefly trained so greedy decoding has clear winners (a random model's near-ties would make
    # token-by-token comparisons depend on round-off rather than on the code under test).
    root = tmp_path_factory.mktemp("inject")
    model = ref.build_hf_model("gqa_untied", str(root / "hf"), train_steps=150)
    ref.run_convert(str(root / "hf"), str(root / "ckpt"))
    return jax_introspect.load(str(root / "ckpt")), model


def _tokens(batch, length, seed=0):
    return ref.bigram_batch(np.random.RandomState(seed), batch, length, 256)


def _vector(d, seed=0, scale=1.0):
    return np.random.RandomState(seed).standard_normal(d).astype(np.float32) * scale


# Strengths that steer the tiny model clearly without making its greedy steps near-ties: the
# residual stream's norm is several times the MLP output's.
MODE_STRENGTH = {"raw": 4.0, "mlp_out": 1.0, "residual": 0.3}


@pytest.mark.parametrize("norm_match", list(MODE_STRENGTH))
@pytest.mark.parametrize("layer,start", [(0, 0), (1, 7), (2, 19)])
def test_prefill_and_16_decode_steps_match_hf_hooks(tiny, layer, start, norm_match):
    lm, model = tiny
    prompt = _tokens(1, 20, seed=layer)
    vector = _vector(lm.config.d_model, seed=start)
    strength = MODE_STRENGTH[norm_match]
    injection = inject.make(layer, strength, vector, start=start, norm_match=norm_match, batch=1)
    with gpu_reference.Injection(model, layer, vector, strength, start, norm_match):
        hf_prefill, _ = ref.hf_logits_and_hidden(model, prompt)
        hf_residuals = ref.hf_raw_residuals(model, prompt)  # [L, 1, T, D]
        hf_tokens, hf_step_logits = ref.hf_greedy_with_logits(model, prompt, 16)
    clean, _ = ref.hf_logits_and_hidden(model, prompt)
    assert np.abs(hf_prefill - clean).max() > 1e-2, "the injection must change the reference"
    ours_prefill = lm.logits(prompt, injection=injection)
    assert np.abs(ours_prefill - hf_prefill).max() <= 1e-4
    ours_residuals = lm.residuals(prompt, injection=injection)
    scale = np.abs(hf_residuals).max(axis=-1, keepdims=True)
    assert (np.abs(ours_residuals - hf_residuals) / scale).max() <= 1e-5
    top2 = np.sort(hf_step_logits[0], axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "a near-tie would make greedy tokens ill-defined"
    gen = lm.generate(prompt.tolist(), max_new_tokens=16, injection=injection, return_logits=True)[0]
    assert gen.token_ids == hf_tokens[0].tolist()
    assert np.abs(gen.logits - hf_step_logits[0]).max() <= 1e-4


def test_mixed_rows_each_match_their_own_reference(tiny):
    lm, model = tiny
    rows = [_tokens(1, n, seed=n)[0].tolist() for n in (9, 14, 20)]
    settings = [(0, 3.0, 2), (2, 0.0, 0), (1, -2.0, 5)]
    vectors = np.stack([_vector(lm.config.d_model, seed=i) for i in range(3)])
    injection = inject.make([s[0] for s in settings], [s[1] for s in settings], vectors,
                            start=[s[2] for s in settings])
    ours = lm.logits(rows, injection=injection)
    for i, (row, (layer, strength, start)) in enumerate(zip(rows, settings)):
        with gpu_reference.Injection(model, layer, vectors[i], strength, start):
            theirs, _ = ref.hf_logits_and_hidden(model, [row])
        assert np.abs(ours[i, -len(row):] - theirs[0]).max() <= 1e-4


def test_mixed_norm_modes_in_one_batch_each_match_their_own_reference(tiny):
    lm, model = tiny
    rows = [_tokens(1, n, seed=n)[0].tolist() for n in (9, 14, 20, 11)]
    settings = [(1, "raw", 3), (1, "mlp_out", 0), (2, "residual", 4), (0, "mlp_out", 2)]
    vectors = np.stack([_vector(lm.config.d_model, seed=10 + i) for i in range(len(rows))])
    strengths = [MODE_STRENGTH[mode] for _, mode, _ in settings]
    injection = inject.make([s[0] for s in settings], strengths, vectors, start=[s[2] for s in settings],
                            norm_match=[s[1] for s in settings])
    ours = lm.logits(rows, injection=injection)
    for i, (row, (layer, mode, start)) in enumerate(zip(rows, settings)):
        with gpu_reference.Injection(model, layer, vectors[i], strengths[i], start, mode):
            theirs, _ = ref.hf_logits_and_hidden(model, [row])
        assert np.abs(ours[i, -len(row):] - theirs[0]).max() <= 1e-4, mode


# --- the window's end ----------------------------------------------------------------------------
# (layer, start, end) on a 20-token prompt + 16 greedy steps (RoPE positions 0..35): the final
# prompt token alone (Rivera 2025's single token), a middle token, a span ending inside the prompt,
# a span of generated tokens only (positions 22..25: decode steps 3..6).
END_WINDOWS = [(0, 19, 20), (2, 19, 20), (1, 7, 8), (2, 5, 12), (1, 22, 26)]


@pytest.mark.parametrize("norm_match", list(MODE_STRENGTH))
@pytest.mark.parametrize("layer,start,end", END_WINDOWS)
def test_window_with_an_end_matches_hf_hooks(tiny, layer, start, end, norm_match):
    """Prefill logits, residuals and 16 greedy decode steps against the torch hooks with the same
    [start, end): float32, logits <= 1e-4 absolute, residuals <= 1e-5 of each token's largest
    element, tokens identical (the same bounds as without an end)."""
    lm, model = tiny
    prompt = _tokens(1, 20, seed=layer + 3)
    vector = _vector(lm.config.d_model, seed=start + 1)
    strength = MODE_STRENGTH[norm_match] * 2
    injection = inject.make(layer, strength, vector, start=start, end=end, norm_match=norm_match, batch=1)
    with gpu_reference.Injection(model, layer, vector, strength, start, norm_match, end=end):
        hf_prefill, _ = ref.hf_logits_and_hidden(model, prompt)
        hf_residuals = ref.hf_raw_residuals(model, prompt)
        hf_tokens, hf_step_logits = ref.hf_greedy_with_logits(model, prompt, 16)
    clean, _ = ref.hf_logits_and_hidden(model, prompt)
    _, clean_steps = ref.hf_greedy_with_logits(model, prompt, 16)
    changed = max(np.abs(hf_prefill - clean).max(), np.abs(hf_step_logits - clean_steps).max())
    assert changed > 1e-2, "the injection must change the reference"
    # The torch reference itself ends the injection: the decode steps after `end` see no addition
    # (for a window inside the prompt, the first decode step's logits depend on it only through
    # the cache), and a window in the generated tokens leaves the prefill clean.
    if start >= prompt.shape[1]:
        np.testing.assert_array_equal(hf_prefill, clean)
    ours_prefill = lm.logits(prompt, injection=injection)
    ours_residuals = lm.residuals(prompt, injection=injection)
    gen = lm.generate(prompt.tolist(), max_new_tokens=16, injection=injection, return_logits=True)[0]
    scale = np.abs(hf_residuals).max(axis=-1, keepdims=True)
    top2 = np.sort(hf_step_logits[0], axis=-1)[:, -2:]
    print(f"end window {(layer, start, end, norm_match)}: prefill {np.abs(ours_prefill - hf_prefill).max():.1e}, "
          f"residuals {(np.abs(ours_residuals - hf_residuals) / scale).max():.1e}, "
          f"steps {np.abs(gen.logits - hf_step_logits[0]).max():.1e}, top-2 gap {(top2[:, 1] - top2[:, 0]).min():.1e}")
    assert np.abs(ours_prefill - hf_prefill).max() <= 1e-4
    assert (np.abs(ours_residuals - hf_residuals) / scale).max() <= 1e-5
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "a near-tie would make greedy tokens ill-defined"
    assert gen.token_ids == hf_tokens[0].tolist()
    assert np.abs(gen.logits - hf_step_logits[0]).max() <= 1e-4


def test_mixed_windows_in_one_ragged_batch_each_match_their_own_reference(tiny):
    """Left-padded rows of different lengths: the window is in each row's RoPE positions, not in
    the padded columns; rows with and without an end in one program."""
    lm, model = tiny
    rows = [_tokens(1, n, seed=30 + n)[0].tolist() for n in (9, 14, 20, 12)]
    settings = [(0, 3.0, 8, 9), (1, 4.0, 13, 14), (2, -3.0, 2, None), (1, 4.0, 4, 7)]  # layer, strength, start, end
    vectors = np.stack([_vector(lm.config.d_model, seed=20 + i) for i in range(len(rows))])
    injection = inject.make([s[0] for s in settings], [s[1] for s in settings], vectors,
                            start=[s[2] for s in settings], end=[s[3] for s in settings])
    assert injection.end.tolist() == [9, 14, inject.NO_END, 7]
    ours = lm.logits(rows, injection=injection)
    for i, (row, (layer, strength, start, end)) in enumerate(zip(rows, settings)):
        with gpu_reference.Injection(model, layer, vectors[i], strength, start, end=end):
            theirs, _ = ref.hf_logits_and_hidden(model, [row])
        clean, _ = ref.hf_logits_and_hidden(model, [row])
        assert np.abs(theirs - clean).max() > 1e-2
        assert np.abs(ours[i, -len(row):] - theirs[0]).max() <= 1e-4


@pytest.mark.parametrize("norm_match", list(MODE_STRENGTH))
def test_the_injection_touches_only_its_window(tiny, norm_match):
    """Residuals after every layer, bit for bit against the clean run (same program, strength 0):
    every layer before the injected one, every position before `start`, and at the injected layer
    every position outside [start, end) are the clean run's exactly; at the injected layer the
    window's positions differ by the addition alone. Decoding after `end`, the new tokens' residuals
    differ only through attention to the injected positions (layers after the injected one)."""
    lm, _ = tiny
    tokens = _tokens(2, 20, seed=11)
    d = lm.config.d_model
    vector = _vector(d, seed=4, scale=2.0)
    layer, windows = 1, [(19, 20), (6, 10)]
    strength = MODE_STRENGTH[norm_match] * 2
    injection = inject.make(layer, strength, vector, start=[w[0] for w in windows], end=[w[1] for w in windows],
                            norm_match=norm_match)
    clean = lm.residuals(tokens, injection=inject.make(layer, 0.0, vector, start=0, batch=2))
    np.testing.assert_array_equal(clean, lm.residuals(tokens))
    ours = lm.residuals(tokens, injection=injection)
    for row, (start, end) in enumerate(windows):
        np.testing.assert_array_equal(ours[:layer, row], clean[:layer, row])
        np.testing.assert_array_equal(ours[:, row, :start], clean[:, row, :start])
        outside = np.r_[0:start, end:tokens.shape[1]]
        np.testing.assert_array_equal(ours[layer, row, outside], clean[layer, row, outside])
        added = ours[layer, row, start:end] - clean[layer, row, start:end]
        assert np.all(np.abs(added).max(axis=-1) > 0)
        if norm_match == "raw":  # exactly strength * vector, up to the float32 rounding of the sum
            np.testing.assert_allclose(added, np.broadcast_to(strength * vector, added.shape),
                                       atol=1e-5 * np.abs(clean[layer, row]).max())
        if end < tokens.shape[1]:  # later layers see the window through attention
            assert np.abs(ours[layer + 1:, row, end:] - clean[layer + 1:, row, end:]).max() > 0


def test_huge_end_equals_no_end_and_the_start_only_formula_bit_for_bit(tiny, monkeypatch):
    """end = None (NO_END), end = 10**6 and end past the last generated position all give what
    `residual_delta` gave before it had an end (a start-only copy traced into the same forward
    program), bit for bit, in the prefill and in generation."""
    lm, _ = tiny
    tokens = _tokens(3, 16, seed=9)
    valid = np.ones_like(tokens, bool)
    vectors = np.stack([_vector(lm.config.d_model, seed=40 + i) for i in range(3)])
    kw = dict(layer=[0, 1, 2], strength=[4.0, 1.0, 0.3], vector=vectors, start=[0, 5, 15],
              norm_match=["raw", "mlp_out", "residual"])
    no_end = inject.make(**kw)
    assert no_end.end.tolist() == [inject.NO_END] * 3 == [np.iinfo(np.int32).max] * 3
    variants = [inject.make(**kw, end=10**6), inject.make(**kw, end=[None, 16 + 8, inject.NO_END])]

    def program(injection):
        cache = model_lib.init_cache(lm.config, 3, 16, lm.params.embed.dtype)
        return jax.jit(lambda p, t, v, inj: model_lib.forward(p, lm.config, t, model_lib.prompt_positions(v), v,
                                                               cache, layout=lm.layout, injection=inj)[0])(
            lm.params, tokens, valid, injection)

    ours = np.asarray(program(no_end))
    for other in variants:
        np.testing.assert_array_equal(np.asarray(program(other)), ours)
        np.testing.assert_array_equal(lm.logits(tokens, injection=other), lm.logits(tokens, injection=no_end))
    gen = [g.token_ids for g in lm.generate(tokens.tolist(), max_new_tokens=8, injection=no_end, return_logits=True)]
    for other in variants:
        assert [g.token_ids for g in lm.generate(tokens.tolist(), max_new_tokens=8, injection=other)] == gen

    def start_only(injection, index, positions, token_valid, mlp_out, residual):  # before `end` existed
        here = (injection.layer == index)[:, None] & (positions >= injection.start[:, None]) & token_valid
        vector = injection.vector[:, None, :]
        strength = injection.strength[:, None, None]
        mode = injection.norm_match[:, None, None]

        def token_norm(x):
            return jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
        target_norm = jnp.where(mode == inject.RESIDUAL, token_norm(residual), token_norm(mlp_out))
        matched = vector * (target_norm / (jnp.linalg.norm(vector, axis=-1, keepdims=True) + inject.VLLM_LENS_EPS)) \
            * strength
        delta = jnp.where(mode == inject.RAW, strength * vector, matched)
        return jnp.where(here[..., None], delta, 0.0).astype(residual.dtype)
    monkeypatch.setattr(inject, "residual_delta", start_only)
    np.testing.assert_array_equal(np.asarray(program(no_end)), ours)


def test_end_spellings_and_empty_windows_refused(tiny):
    lm, _ = tiny
    vector = np.ones(64, np.float32)
    assert inject.make(0, 1.0, vector, start=3, end=4, batch=2).end.tolist() == [4, 4]
    assert inject.make(0, 1.0, vector, start=[1, 2], end=[None, 5]).end.tolist() == [inject.NO_END, 5]
    assert inject.make(0, 1.0, vector, start=[1, 2, 3], end=[5, 6, 7]).end.dtype == np.int32
    assert inject.none(2, 64).end.tolist() == [inject.NO_END] * 2
    with pytest.raises(inject.InjectionError, match="expected"):
        inject.make(0, 1.0, vector, end=[3, 4], batch=3)
    before = jax_introspect.lm._prefill._cache_size()
    for start, end in ((3, 3), (4, 2)):
        with pytest.raises(inject.InjectionError, match=r"end <= start.*start=p, end=p \+ 1"):
            lm.logits(_tokens(1, 5), injection=inject.make(1, 1.0, vector, start=start, end=end, batch=1))
    assert jax_introspect.lm._prefill._cache_size() == before
    # A strength-0 row is clean whatever its window; an empty one is allowed there.
    zero = inject.make(1, [0.0, 2.0], vector, start=[3, 1], end=[3, 2])
    tokens = _tokens(2, 5)
    np.testing.assert_array_equal(lm.logits(tokens, injection=zero)[0], lm.logits(tokens)[0])


def _clean_program(params, cfg, layout, tokens, valid):
    cache = model_lib.init_cache(cfg, tokens.shape[0], tokens.shape[1], params.embed.dtype)
    return model_lib.forward(params, cfg, tokens, model_lib.prompt_positions(valid), valid, cache,
                             layout=layout)[0]


def test_strength_zero_is_the_clean_model_bit_for_bit(tiny):
    lm, _ = tiny
    tokens = _tokens(3, 16, seed=5)
    valid = np.ones_like(tokens, bool)
    clean = np.asarray(jax.jit(_clean_program, static_argnums=(1, 2))(lm.params, lm.config, lm.layout, tokens, valid))
    zero = inject.make([0, 1, 2], 0.0, np.stack([_vector(lm.config.d_model, i, 50.0) for i in range(3)]),
                       norm_match=["raw", "mlp_out", "residual"])
    np.testing.assert_array_equal(lm.logits(tokens, injection=zero), clean)
    mixed = inject.make([1, 1, 1], [0.0, 8.0, 0.0], _vector(lm.config.d_model, 1, 3.0),
                        norm_match=["residual", "raw", "mlp_out"])
    out = lm.logits(tokens, injection=mixed)
    np.testing.assert_array_equal(out[[0, 2]], clean[[0, 2]])
    assert np.abs(out[1] - clean[1]).max() > 1e-2


def test_layer_strength_grid_compiles_once_per_batch_shape(tiny):
    lm, _ = tiny
    d = lm.config.d_model
    prompts = [_tokens(1, 12, seed=i)[0].tolist() for i in range(8)]
    grid = [(layer, strength) for layer in range(3) for strength in (0.0, 1.0, 2.0, 4.0)] + [(0, 8.0)] * 4
    before = generate_lib.generate_tokens._cache_size()
    prefill_before = jax_introspect.lm._prefill._cache_size()
    for i in range(0, len(grid), 8):  # 16 cells in two batches of 8 mixed rows
        cells = grid[i:i + 8]
        injection = inject.make([c[0] for c in cells], [c[1] for c in cells],
                                np.stack([_vector(d, j) for j in range(len(cells))]),
                                start=[j % 5 for j in range(len(cells))],
                                end=[None if j % 2 else j % 5 + 1 + j for j in range(len(cells))],
                                norm_match=[(i + j) % 3 for j in range(len(cells))])
        lm.generate(prompts, max_new_tokens=4, injection=injection, temperature=1.0, seed=i)
        lm.logits(prompts, injection=injection)
    assert generate_lib.generate_tokens._cache_size() - before <= 1
    assert jax_introspect.lm._prefill._cache_size() - prefill_before <= 1


def test_trial_text_does_not_depend_on_its_batch(tiny):
    lm, _ = tiny
    prompts = [_tokens(1, n, seed=n)[0].tolist() for n in (6, 11, 15, 20)]
    vectors = np.stack([_vector(lm.config.d_model, i) for i in range(4)])
    injection = inject.make([0, 1, 2, 1], [1.0, 2.0, 0.0, 3.0], vectors)
    together = lm.generate(prompts, max_new_tokens=12, injection=injection, temperature=1.0, top_p=0.9,
                           seed=7, trial_ids=["a", "b", "c", "d"])
    for i in (3, 0):
        alone = lm.generate([prompts[i]], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7,
                            trial_ids=["abcd"[i]],
                            injection=inject.make(injection.layer[i], injection.strength[i], vectors[i], batch=1))
        assert alone[0].token_ids == together[i].token_ids
    other_seed = lm.generate(prompts, max_new_tokens=12, injection=injection, temperature=1.0, seed=8,
                             trial_ids=["a", "b", "c", "d"])
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in together]


@pytest.mark.parametrize("top_p", [0.8, 1.0])
def test_sampling_matches_reference_distribution(tiny, top_p):
    """Temperature/top-p sampling against an independent numpy computation of the nucleus
    distribution: empirical frequencies of the first sampled token over many keys. top_p = 1
    takes the sort-free path of `next_tokens`."""
    lm, _ = tiny
    prompt = _tokens(1, 10, seed=3)[0].tolist()
    logits = lm.logits([prompt])[0, -1].astype(np.float64)
    temperature = 1.5
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: np.searchsorted(np.cumsum(p[order]), top_p) + 1]
    expected = np.zeros_like(p)
    expected[keep] = p[keep] / p[keep].sum()
    n = 4000
    keys = np.stack([generate_lib.trial_key(0, str(i)) for i in range(n)])
    sample = generate_lib.sampling(n, temperature, top_p, keys)
    tokens = np.asarray(generate_lib.next_tokens(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits))),
                                                 sample, jnp.int32(0)))
    freq = np.bincount(tokens, minlength=len(p)) / n
    assert set(np.nonzero(freq)[0]) <= set(keep.tolist())
    assert np.abs(freq - expected).max() < 0.03


def test_nucleus_set_matches_numpy_sort():
    """The sort-free top-p set against a float64 numpy nucleus (sort, keep each token whose
    exclusive cumulative mass is below top_p, i.e. up to and including the one that reaches it;
    tokens tied with the last kept one kept too), on peaked and flat rows of a 5000-token vocab.
    Tokens whose cumulative mass lies within float32 round-off (1e-6) of top_p may go either way."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(48, 5000)) * np.repeat([0.3, 2.0, 6.0], 16)[:, None]
    logits[0, :10] = 4.0  # ties at the top
    checked = 0
    for temperature in (0.7, 1.0):
        for top_p in (0.05, 0.5, 0.9, 0.99, 1.0):
            got = np.asarray(jax.vmap(generate_lib.nucleus_mask, in_axes=(0, None, None))(
                jnp.asarray(logits, jnp.float32), jnp.float32(temperature), jnp.float32(top_p)))
            for row, mask in zip(logits, got):
                p = np.exp((row - row.max()) / temperature)
                p /= p.sum()
                order = np.argsort(-p, kind="stable")
                exclusive = np.cumsum(p[order]) - p[order]
                kept = p >= p[order][exclusive < top_p].min()
                if top_p >= 1.0:
                    kept[:] = True
                edge = np.isin(p, p[order][np.abs(exclusive - top_p) < 1e-6])
                np.testing.assert_array_equal(mask[~edge], kept[~edge], err_msg=f"T={temperature} top_p={top_p}")
                checked += int(edge.sum() == 0)
    assert checked > 200  # the round-off allowance must stay an exception


def test_sampled_tokens_are_jax_random_categorical_draws():
    """`next_tokens` draws, row by row, `jax.random.categorical`'s token for the row's key folded with
    its step (temperature-scaled logits, -inf outside the nucleus) and greedy rows take `np.argmax`'s
    (the first of tied maxima): rows with ties at the top and -inf entries, temperatures 0 / 0.7 /
    1.3, top_p 1 on every row (the path without the threshold search) and mixed, 3 steps, float32."""
    rng = np.random.default_rng(3)
    n, vocab = 24, 1000
    logits = np.round(rng.normal(size=(n, vocab)) * 2, 1).astype(np.float32)  # rounding: many ties
    logits[:, 0] = logits.max(axis=1)  # a tie at the top of every row
    logits[::3, 500:] = -np.inf  # half the vocabulary masked out
    keys = np.stack([generate_lib.trial_key(11, str(i)) for i in range(n)])
    temperature = np.resize([0.0, 0.7, 1.3], n).astype(np.float32)

    @jax.jit
    def reference(keys, temperature, top_p, step):  # JAX's own draw, one row at a time (vmap)
        def row(key, logits, temperature, top_p):
            keep = generate_lib.nucleus_mask(logits, temperature, top_p)
            return jax.random.categorical(jax.random.fold_in(key, step),
                                          jnp.where(keep, logits / temperature, -jnp.inf))
        return jax.vmap(row)(keys, jnp.asarray(logits), temperature, top_p)

    for top_p in (np.ones(n, np.float32), np.resize([1.0, 0.9, 0.5, 0.2], n).astype(np.float32)):
        sample = generate_lib.sampling(n, temperature, top_p, keys)
        for step in range(3):
            got = np.asarray(generate_lib.next_tokens(jnp.asarray(logits), sample, jnp.int32(step)))
            want = np.where(temperature > 0, np.asarray(reference(keys, temperature, top_p, step)),
                            np.argmax(logits, axis=-1))
            np.testing.assert_array_equal(got, want, err_msg=f"step {step}, top_p {top_p.tolist()}")
    assert len(set(got.tolist())) > 8  # really sampled


def test_top_p_one_rows_draw_the_same_tokens_on_both_sampling_paths(tiny):
    """A row with top_p = 1 must draw the same token whether its batch takes the sort-free path
    (every row top_p = 1) or the nucleus path (some other row has top_p < 1)."""
    lm, _ = tiny
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(64, lm.config.vocab_size)) * 3, jnp.float32)
    keys = np.stack([generate_lib.trial_key(5, str(i)) for i in range(64)])
    all_one = generate_lib.sampling(64, 1.3, 1.0, keys)
    mixed = generate_lib.sampling(64, 1.3, np.r_[np.ones(63), 0.5].astype(np.float32), keys)
    for step in range(3):
        fast = np.asarray(generate_lib.next_tokens(logits, all_one, jnp.int32(step)))
        nucleus = np.asarray(generate_lib.next_tokens(logits, mixed, jnp.int32(step)))
        np.testing.assert_array_equal(fast[:63], nucleus[:63])
        assert len(set(fast.tolist())) > 32  # really sampled, not greedy


@pytest.mark.parametrize("bad,message", [
    (dict(layer=3), "out of range"),
    (dict(layer=-1), "out of range"),
    (dict(vector=np.ones(10, np.float32)), "d_model"),
    (dict(strength=float("nan")), "finite"),
    (dict(vector=np.full(64, np.inf, np.float32)), "NaN or Inf"),
])
def test_bad_injection_is_refused_before_compute(tiny, bad, message):
    lm, _ = tiny
    kw = dict(layer=1, strength=1.0, vector=np.ones(64, np.float32))
    kw.update(bad)
    injection = inject.make(kw["layer"], kw["strength"], kw["vector"], batch=1)
    before = jax_introspect.lm._prefill._cache_size()
    with pytest.raises(inject.InjectionError, match=message):
        lm.logits(_tokens(1, 5), injection=injection)
    assert jax_introspect.lm._prefill._cache_size() == before


def test_norm_match_spellings():
    vector = np.ones(4, np.float32)
    rows = inject.make(0, 1.0, vector, norm_match=[False, True, "raw", "mlp_out", "residual", 0, 1, 2])
    assert rows.norm_match.dtype == np.int32
    assert rows.norm_match.tolist() == [0, 1, 0, 1, 2, 0, 1, 2]
    assert inject.make(0, 1.0, vector, norm_match="residual", batch=3).norm_match.tolist() == [2, 2, 2]
    assert inject.make(0, 1.0, vector, norm_match=np.array([True, False])).norm_match.tolist() == [1, 0]
    for bad in ("full", 3, -1, 1.0, None, ["mlp_out", "norm"]):
        with pytest.raises(inject.InjectionError, match="'mlp_out'.*'residual'"):
            inject.make(0, 1.0, vector, norm_match=bad, batch=2)


def test_norm_match_needs_a_direction(tiny):
    lm, _ = tiny
    injection = inject.make(1, 1.0, np.zeros(64, np.float32), norm_match="residual", batch=1)
    with pytest.raises(inject.InjectionError, match="non-zero vector"):
        lm.logits(_tokens(1, 5), injection=injection)


def test_wrong_batch_size_is_refused(tiny):
    lm, _ = tiny
    with pytest.raises(inject.InjectionError, match="rows"):
        lm.logits(_tokens(2, 5), injection=inject.make(0, 1.0, np.ones(64), batch=3))


# --- vllm-lens' steering, transcribed ------------------------------------------------------------
# vllm_lens/_worker_ext.py from the vllm-lens wheels 1.1.0 and 1.3.0 (1.2.0's steering code is
# 1.3.0's): `norm_match` verbatim, and for a broadcast vector ((1, hidden) activations, no
# position_indices) the 2D branch of `_apply_steering` with the norm reference its caller
# `_hook_inner` passes: 1.1.0 norm-matches `target`, the clone of the decoder layer's output[0];
# 1.2.0+ passes `norm_ref = output[0] + output[1]`. vLLM's Llama decoder layer returns
# (hidden_states, residual) = (the MLP output, the stream before the MLP add), and the next layer
# adds the two. benchmarks/vllm_lens_check.py checks this transcription against the packages.

def vllm_lens_norm_match(residual, steering, eps=1e-6):
    r_norm = residual.float().norm(dim=-1, keepdim=True)
    v_norm = steering.float().norm(dim=-1, keepdim=True)
    return (steering * (r_norm / (v_norm + eps))).to(residual.dtype)


def vllm_lens_steered_stream(version: str, output: tuple, vector, scale: float, norm_match: bool):
    """The residual stream the next layer sees, output[0] + output[1], after vllm-lens `version`
    steered one request's tokens [T, hidden] at this layer."""
    hidden_states, residual = output
    target = hidden_states.clone()
    norm_ref = target if version == "1.1.0" else hidden_states + residual
    v = vector.to(target.dtype).unsqueeze(0)
    if norm_match:
        v = vllm_lens_norm_match(norm_ref, v)
    target = target + v * scale
    return target + residual


VLLM_LENS_MODE = {"raw": ("1.3.0", False), "mlp_out": ("1.1.0", True), "residual": ("1.3.0", True)}


def ours_steered_stream(mode: str, output: tuple, vector: np.ndarray, scale: float) -> np.ndarray:
    """Our residual_delta on the same layer output, one row of T tokens all injected."""
    mlp_out, before_mlp = (jnp.asarray(x.numpy()) for x in output)
    stream = before_mlp + mlp_out
    T = stream.shape[0]
    injection = inject.make(3, scale, vector, norm_match=mode, batch=1)
    delta = inject.residual_delta(injection, jnp.int32(3), jnp.arange(T)[None], jnp.ones((1, T), bool),
                                  mlp_out[None], stream[None])
    return np.asarray(stream + delta[0])


@pytest.mark.parametrize("mode", list(VLLM_LENS_MODE))
def test_norm_modes_equal_vllm_lens_formulas(mode):
    """float32, random layer outputs whose stream is ~10x the MLP output (as in real models) and
    scales from 0.1 to 16: ours equals the transcription to 1e-6 of each token's largest element
    (about 8 float32 ulps; the norms are reduced and the three terms summed in another order)."""
    version, norm_match = VLLM_LENS_MODE[mode]
    rng = np.random.default_rng(0)
    for trial in range(6):
        d, T = 256, 7
        mlp_out = torch.as_tensor(rng.standard_normal((T, d)), dtype=torch.float32)
        before_mlp = torch.as_tensor(10 * rng.standard_normal((T, d)), dtype=torch.float32)
        vector = rng.standard_normal(d).astype(np.float32) * rng.uniform(0.01, 100)
        scale = float([0.1, 0.5, 1.0, 2.0, 8.0, 16.0][trial])
        theirs = vllm_lens_steered_stream(version, (mlp_out, before_mlp), torch.as_tensor(vector), scale,
                                          norm_match).numpy()
        ours = ours_steered_stream(mode, (mlp_out, before_mlp), vector, scale)
        largest = np.abs(theirs).max(axis=-1, keepdims=True)
        assert (np.abs(ours - theirs) / largest).max() <= 1e-6, mode
        clean = (mlp_out + before_mlp).numpy()
        if norm_match:  # the added part has the norm scale * |mlp_out| or scale * |stream| per token
            reference = mlp_out if mode == "mlp_out" else mlp_out + before_mlp
            np.testing.assert_allclose(np.linalg.norm(ours - clean, axis=-1),
                                       scale * reference.norm(dim=-1).numpy(), rtol=1e-4)


# --- injection windows --------------------------------------------------------------------------

def test_lindsey_window_starts_at_the_merged_token_before_trial_1():
    """Llama-3's tokenizer merges '.\\n\\n' into one token; the window starts on it. Checked
    against Meta's tokenizer (llama-models)."""
    import pathlib

    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from jax_introspect.experiment import protocols
    from jax_introspect.tokenizer import from_tiktoken_model, llama3_tokenizer_model_path
    tokenizer = from_tiktoken_model(llama3_tokenizer_model_path())
    meta = MetaTokenizer(pathlib.Path(llama3_tokenizer_model_path()))
    lindsey = protocols.protocol("lindsey_injected_thought")
    prompt = tokenizer.chat_prompt(lindsey["messages"])
    ids = meta.encode(prompt, bos=False, eos=False, allowed_special="all")
    start = protocols.window_start(tokenizer, prompt, lindsey["window"], lindsey["anchor"])
    assert meta.decode([ids[start]]) == ".\n\n"
    assert meta.decode([ids[start + 1]]) == "Trial"
    assert protocols.window_start(tokenizer, prompt, "all_positions") == 0


def test_missing_anchor_is_refused():
    from jax_introspect.experiment import protocols
    from jax_introspect.tokenizer import from_tiktoken_model, llama3_tokenizer_model_path
    tokenizer = from_tiktoken_model(llama3_tokenizer_model_path())
    with pytest.raises(protocols.ProtocolError, match="not found"):
        protocols.window_start(tokenizer, "Ok, let's get started. Question 1:", "anchor", "Trial 1")
    with pytest.raises(protocols.ProtocolError, match="unknown injection window"):
        protocols.window_start(tokenizer, "x", "sometimes")


def test_empty_or_duplicate_word_lists_are_refused(tiny):
    from jax_introspect.experiment import vectors
    lm, _ = tiny
    with pytest.raises(vectors.VectorError, match="empty"):
        vectors.concept_vectors(lm, [], ["a"])
    with pytest.raises(vectors.VectorError, match="empty"):
        vectors.concept_vectors(lm, ["a"], [])
    with pytest.raises(vectors.VectorError, match="repeats"):
        vectors.concept_vectors(lm, ["Dust", "Snow", "Dust"], ["a"])
