"""The sweep engine (`engine.py`, `LanguageModel.generate_shared`) against plain batched generation
(`LanguageModel.generate`, itself checked against HF transformers in test_injection.py): the same
trials give the same tokens, trial by trial, greedy and sampled, float32, while the engine
prefills the shared prefix once, each cell once, and refills finished slots."""
from collections import Counter

import jax
import numpy as np
import pytest

import jax_introspect
from jax_introspect import engine, inject
from tests import hf_reference as ref

PREFIX = 30  # tokens every prompt shares


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Briefly trained so greedy decoding has clear winners (see test_injection.py).
    root = tmp_path_factory.mktemp("engine")
    ref.build_hf_model("gqa_untied", str(root / "hf"), train_steps=150)
    ref.run_convert(str(root / "hf"), str(root / "ckpt"))
    return jax_introspect.load(str(root / "ckpt"))


def _trials(lm, n=21, start_at_prefix=True, one_prompt=False):
    """n trials: one shared prefix, three suffixes (3, 7, 11 tokens; `one_prompt`: the 7-token one
    for every trial), three layers, controls among them, four vectors, windows with and without an
    end, all three norm modes; cells repeat."""
    rs = np.random.RandomState(0)
    common = ref.bigram_batch(rs, 1, PREFIX, 256)[0].tolist()
    vectors = rs.standard_normal((4, lm.config.d_model)).astype(np.float32)
    prompts, layer, strength, start, end, norm = [], [], [], [], [], []
    for i in range(n):
        kind = 1 if one_prompt else i % 3
        suffix = ref.bigram_batch(np.random.RandomState(100 + kind), 1, 3 + kind * 4, 256)[0].tolist()
        prompts.append(common + suffix)
        layer.append(i % 3)
        strength.append(0.0 if i % 5 == 0 else [1.0, 2.0, 4.0][i % 3])
        start.append(PREFIX + i % 2 if start_at_prefix else 0)
        end.append(None if i % 4 else start[-1] + 3)
        norm.append(["raw", "raw", "mlp_out", "residual"][i % 4])
    strength = [s * {"raw": 1.0, "mlp_out": 0.25, "residual": 0.08}[m] for s, m in zip(strength, norm)]
    injection = inject.make(layer, strength, vectors[np.arange(n) % 4], start=start, end=end, norm_match=norm)
    return prompts, injection, [f"trial/{i}" for i in range(n)]


def _eos_for_ragged_ends(lm, prompts, injection, ids, **sampling):
    """Make the generated token that ends rows at the most different steps the EOS (an EOS only
    cuts a row short, so one probe without one tells where each candidate would end them): slots
    then finish at different steps and refill."""
    probe = [g.token_ids for g in lm.generate(prompts, max_new_tokens=16, injection=injection, trial_ids=ids,
                                              **sampling)]

    def ends(tokens):
        return [next((i + 1 for i, t in enumerate(row) if t in tokens), len(row)) for row in probe]
    frequent = [t for t, _ in Counter(t for row in probe for t in row).most_common(8)]
    eos = max(([a] for a in frequent), key=lambda e: len(set(ends(e))))
    if len(set(ends(eos))) < 3:  # greedy rows of this small model cycle through few tokens: try pairs
        eos = max(([a, b] for a in frequent for b in frequent if a < b), key=lambda e: len(set(ends(e))))
    lm._eos = lambda: np.asarray(eos, np.int32)
    return ends(eos)


@pytest.mark.parametrize("start_at_prefix", [True, False], ids=["prefix_shared", "all_positions"])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (1.0, 0.9)])
def test_engine_texts_equal_plain_generation_trial_by_trial(tiny, start_at_prefix, temperature, top_p):
    lm = jax_introspect.lm.LanguageModel(tiny.config, tiny.params, None, layout=tiny.layout)
    prompts, injection, ids = _trials(lm, start_at_prefix=start_at_prefix)
    ends = _eos_for_ragged_ends(lm, prompts, injection, ids, temperature=temperature, top_p=top_p, seed=3)
    assert len(set(ends)) >= 3  # rows end at different steps
    plain = lm.generate(prompts, max_new_tokens=16, injection=injection, temperature=temperature, top_p=top_p,
                        seed=3, trial_ids=ids)
    assert [len(g.token_ids) for g in plain] == ends
    shared = lm.generate_shared(prompts, max_new_tokens=16, injection=injection, temperature=temperature,
                                top_p=top_p, seed=3, trial_ids=ids, slots=4, trials=24, refill_min=1)
    for i, (a, b) in enumerate(zip(plain, shared)):
        assert (a.token_ids, a.finished, a.text) == (b.token_ids, b.finished, b.text), f"trial {i}"


@pytest.mark.parametrize("one_prompt", [True, False], ids=["depth_shared", "prompts_differ"])
@pytest.mark.parametrize("start_at_prefix", [True, False], ids=["prefix_shared", "all_positions"])
@pytest.mark.parametrize("prefill_block", [0, 2])
def test_depth_sharing_and_smaller_prefill_blocks_give_the_same_texts(tiny, one_prompt, start_at_prefix,
                                                                     prefill_block):
    """One prompt for every trial (a sweep's call): cells ordered by injection layer, each prefill
    block starting at its lowest layer from the clean prompt's forward; cells prefilled fewer at a
    time than the slots (prefill_block 2 of 4). Sampled; the same texts as plain generation, trial
    by trial (the three layers 0, 1, 2 of the tiny model: blocks skip 0, 1 and 2 layers, or all).
    Prompts that differ: the same program (share_depth asked for), every layer computed."""
    prompts, injection, ids = _trials(tiny, start_at_prefix=start_at_prefix, one_prompt=one_prompt)
    _check_depth_shared(tiny, prompts, injection, ids, prefill_block, one_prompt)


def test_depth_sharing_without_controls(tiny):
    """A call of injected trials only (no clean cell): the clean forward is there all the same."""
    prompts, injection, ids = _trials(tiny, one_prompt=True)
    injected = [i for i in range(len(prompts)) if float(injection.strength[i])]
    injection = jax.tree.map(lambda x: np.asarray(x)[injected], injection)
    _check_depth_shared(tiny, [prompts[i] for i in injected], injection, [ids[i] for i in injected], 2, True)


def _check_depth_shared(tiny, prompts, injection, ids, prefill_block, one_prompt):
    work = engine.plan_work(prompts, injection, pad_id=0, slots=4, trials=24, share_depth=True)
    assert work.share_depth and work.depth_shared == one_prompt
    layer = [int(work.cell_injection.layer[c]) if float(work.cell_injection.strength[c]) else 99
             for c in range(work.n_cells)]  # 99: the clean cell
    if one_prompt:  # cells by first injected layer, the clean cell (if any) last; each starts at its layer
        assert layer == sorted(layer) and len(set(layer) - {99}) == 3
        assert work.cell_resume[:work.n_cells].tolist() == [engine.RESUME_NONE if x == 99 else x for x in layer]
    else:  # no layer skipped
        assert not work.cell_resume.any()
    assert (work.cell_resume[work.n_cells:] == (engine.RESUME_NONE if one_prompt else 0)).all()  # padding cells
    plain = tiny.generate(prompts, max_new_tokens=10, injection=injection, temperature=1.0, top_p=0.9, seed=5,
                          trial_ids=ids)
    shared = tiny.generate_shared(prompts, max_new_tokens=10, injection=injection, temperature=1.0, top_p=0.9,
                                  seed=5, trial_ids=ids, slots=4, trials=24, prefill_block=prefill_block,
                                  share_depth=True)
    for i, (a, b) in enumerate(zip(plain, shared)):
        assert (a.token_ids, a.finished) == (b.token_ids, b.finished), f"trial {i}"


def test_the_work_is_planned_once_per_prefix_and_cell(tiny):
    prompts, injection, _ = _trials(tiny)
    work = engine.plan_work(prompts, injection, pad_id=0, slots=4, trials=24)
    assert work.prefix.shape == (1, PREFIX) and work.prefix[0].tolist() == prompts[0][:PREFIX]
    # Distinct (prompt, injection) among the 21 trials, every control (strength 0) one cell per prompt.
    keys = {(tuple(p), "clean") if float(injection.strength[i]) == 0 else
            (tuple(p), int(injection.layer[i]), float(injection.strength[i]), injection.vector[i].tobytes(),
             int(injection.start[i]), int(injection.end[i]), int(injection.norm_match[i]))
            for i, p in enumerate(prompts)}
    assert work.n_cells == len(keys) < len(prompts)
    assert work.cell_tokens.shape[0] % 4 == 0 and work.cell_tokens.shape[1] % engine.SUFFIX_BUCKET == 0
    assert work.trial_cell.shape == (24,) and work.n_trials == 21
    for i, p in enumerate(prompts):  # each trial's cell holds its prompt after the prefix and its injection
        c = work.trial_cell[i]
        assert work.cell_tokens[c][work.cell_valid[c]].tolist() == p[PREFIX:]
        assert work.cell_length[c] == len(p)
        if float(injection.strength[i]):
            assert float(work.cell_injection.strength[c]) == float(injection.strength[i])
            np.testing.assert_array_equal(work.cell_injection.vector[c], injection.vector[i])
    # The prefix stops at the earliest injection start (never inside a window), and leaves a token.
    early = inject.make(0, 1.0, np.ones(tiny.config.d_model, np.float32), start=[12] + [40] * 20)
    assert engine.shared_prefix_length(prompts, early.start) == 12
    assert engine.shared_prefix_length([[1, 2, 3], [1, 2, 3]], inject.none(2, 4).start) == 0  # start 0: nothing shared
    clean_late = inject.make(0, 0.0, np.zeros(4, np.float32), start=3, batch=2)
    assert engine.shared_prefix_length([[1, 2, 3], [1, 2, 3]], clean_late.start) == 2
    # call_shape (what a TPU plan compiles) is the shape plan_work gives.
    assert engine.call_shape(prompts, injection.start) == (work.prefix.shape[1], work.cell_tokens.shape[1])


def test_the_default_prefill_block_is_the_fewest_cells_holding_1024_tokens():
    # (slots, suffix width, data axis) -> the smallest divisor of slots, a multiple of the data axis,
    # with block x width >= 1024; slots when none is.
    cases = {(32, 192, 1): 8, (32, 32, 1): 32, (32, 1024, 1): 1, (32, 600, 2): 2, (24, 200, 1): 6,
             (24, 200, 4): 8, (4, 32, 1): 4, (6, 100, 1): 6}
    assert {case: engine.prefill_block(*case) for case in cases} == cases


def test_one_compile_per_call_shape_whatever_the_injections(tiny):
    """Calls of one padded size with other trials, strengths, cells and seeds share one program."""
    prompts, injection, ids = _trials(tiny)
    before = engine.run._cache_size()
    texts = []
    for seed, scale in ((0, 1.0), (1, 2.0), (2, 0.5)):
        n = 21 - 3 * seed
        rows = inject.make(np.asarray(injection.layer)[:n], np.asarray(injection.strength)[:n] * scale,
                           np.asarray(injection.vector)[:n], start=np.asarray(injection.start)[:n])
        texts.append([g.token_ids for g in tiny.generate_shared(
            prompts[:n], max_new_tokens=6, injection=rows, temperature=1.0, seed=seed, trial_ids=ids[:n], slots=4,
            trials=24)])
    assert engine.run._cache_size() - before == 1
    assert texts[0] != texts[1][:len(texts[0])]


def test_bad_calls_are_refused_before_compute(tiny):
    prompts, injection, _ = _trials(tiny, n=6)
    with pytest.raises(ValueError, match="multiple of the mesh"):
        tiny.generate_shared(prompts, injection=injection, slots=0)
    with pytest.raises(ValueError, match="prefill_block=3 must divide slots=4"):
        tiny.generate_shared(prompts, injection=injection, slots=4, prefill_block=3)
    with pytest.raises(ValueError, match="do not fit"):
        tiny.generate_shared(prompts, injection=injection, slots=2, trials=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny.generate_shared(prompts, max_new_tokens=0, injection=injection)
    with pytest.raises(inject.InjectionError, match="rows"):
        tiny.generate_shared(prompts[:5], injection=injection)

