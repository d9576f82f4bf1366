"""The first-answer-token readout (p_yes / p_no, the logit lens) against HF transformers: a tiny
random Llama-3.1 with the real Llama-3 tokenizer, a small sweep, and each record's readout
recomputed in torch with the same injection (launch/gpu_reference.Injection hooks), float32."""
import json
import os

import numpy as np
import pytest
import torch

from launch import gpu_reference
from tests import hf_reference as ref

P_TOLERANCE = 1e-5  # absolute, on probabilities (float32 weights and compute)
# p_yes of a random 128k-vocabulary model is ~1e-4, so the absolute bound alone says little: also
# relative (measured: <= 5.5e-7), against the injection's effect on p_yes here (1e-3 to 3e-2 relative).
RELATIVE = 1e-5


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """A sweep (both engines) on the tiny checkpoint; returns (hf model, lm, plan, {engine: records}, folder)."""
    import jax_introspect
    from transformers import LlamaForCausalLM
    from configs.sweeps import quickstart
    from jax_introspect.experiment import sweep
    from jax_introspect.experiment import readout as readout_lib
    root = tmp_path_factory.mktemp("readout")
    checkpoint = ref.build_llama3_checkpoint(root)
    model = LlamaForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32).eval()
    lm = jax_introspect.load(checkpoint)
    config = quickstart.get_config().replace(
        words=["Dust", "Snow"], layers=[0, 1], strengths=[4.0, 16.0], trials_per_cell=2, control_trials=2,
        max_new_tokens=3, batch_size=4, batches_per_call=2, baseline_words=["Desks", "Sand"], readout_top_k=8)
    records = {}
    readout_lib._readout.clear_cache()
    for engine in ("shared", "plain"):
        out = str(root / engine)
        sweep.run_sweep(lm, config.replace(engine=engine), out, progress=False)
        with open(os.path.join(out, "trials.jsonl")) as f:
            records[engine] = [json.loads(line) for line in f]
    compiles = readout_lib._readout._cache_size()
    plan = sweep.plan_sweep(config, lm.config, lm.tokenizer, checkpoint, str(lm.dtype))
    return model, lm, plan, records, str(root / "shared"), compiles


def _hf_readout(model, ids, layer, vector, strength, start, lens_layer):
    """HF's last-position softmax and the lens at `lens_layer`: the layer's output captured by our
    own hook (registered after the injection's, so it includes it), through model.norm and lm_head."""
    captured = {}
    handles = []
    injection = gpu_reference.Injection(model, layer, vector, strength, start) if strength else None
    handles.append(model.model.layers[lens_layer].register_forward_hook(
        lambda m, i, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor([ids], dtype=torch.long)).logits[0, -1].float()
            lens = model.lm_head(model.model.norm(captured["h"][0, -1])).float()
    finally:
        for h in handles:
            h.remove()
        if injection is not None:
            injection.remove()
    return torch.softmax(logits, -1).numpy(), torch.softmax(lens, -1).numpy()


def test_token_sets_are_the_tokenizers_single_token_forms(sweep_run):
    from jax_introspect.experiment import readout as readout_lib
    _, lm, _, _, folder, _ = sweep_run
    with open(os.path.join(folder, "readout.json")) as f:
        stated = json.load(f)
    for name, forms in (("p_yes_tokens", readout_lib.YES_FORMS), ("p_no_tokens", readout_lib.NO_FORMS)):
        ids = stated[name]["ids"]
        assert ids and len(ids) == len(set(ids))
        for text, i in zip(stated[name]["forms"], ids):  # each stated form is that one token
            assert lm.tokenizer.encode(text) == [i]
        # and every one-token form is in the set (a direct count over the forms)
        expected = {lm.tokenizer.encode(l + f)[0] for f in forms for l in ("", " ") if len(lm.tokenizer.encode(l + f)) == 1}
        assert set(ids) == expected


def test_empty_token_set_is_refused_early():
    from jax_introspect.experiment import readout as readout_lib

    class SplitsEverything:
        def encode(self, text):
            return [ord(c) for c in text]
    with pytest.raises(readout_lib.ReadoutError, match="none of .* as one token.*readout=False"):
        readout_lib.answer_token_sets(SplitsEverything())


def test_p_yes_and_logit_lens_equal_hf_transformers(sweep_run):
    """Every record's p_yes / p_no equal HF's softmax at the last prompt position summed over the
    stated token sets (<= 1e-5 absolute and 1e-5 relative, float32); the lens' top-k ids equal HF's
    (where HF's top-k+1 probabilities are not near-ties) and their probabilities agree to 1e-5; the
    word's best probability and rank equal HF's."""
    from jax_introspect.experiment import vectors
    model, lm, plan, records, folder, _ = sweep_run
    with open(os.path.join(folder, "readout.json")) as f:
        stated = json.load(f)
    yes, no = stated["p_yes_tokens"]["ids"], stated["p_no_tokens"]["ids"]
    concept = vectors.ConceptVectors.load(os.path.join(folder, "vectors.npz"))
    info = plan.prompts["lindsey_injected_thought"]
    checked_word, moved = 0, 0
    clean_probs, _ = _hf_readout(model, info.ids, 0, None, 0.0, 0, 0)
    for r in records["shared"]:
        assert r["prompt"] == info.text
        injected = r["kind"] == "injected"
        vector = concept.vector(r["word"], r["layer"]) if injected else None
        for lens in r["readout"]["lens"]:
            probs, lens_probs = _hf_readout(model, info.ids, r["layer"] if injected else 0, vector,
                                            r["strength"], info.start, lens["layer"])
            for key, ids in (("p_yes", yes), ("p_no", no)):
                theirs = float(probs[ids].sum())
                ours = r["readout"][key]
                assert abs(ours - theirs) <= P_TOLERANCE and abs(ours - theirs) <= RELATIVE * theirs, (key, r["trial_id"])
            if injected:
                change = abs(float(probs[yes].sum()) / float(clean_probs[yes].sum()) - 1)
                moved += change > 10 * RELATIVE
            k = len(lens["top_ids"])
            order = np.argsort(-lens_probs)[:k + 1]
            log_gaps = -np.diff(np.log(lens_probs[order]))  # a random model's lens is flat: probabilities ~1e-5
            assert log_gaps.min() > 1e-5, "near-ties would make the top-k order ill-defined"
            assert lens["top_ids"] == order[:k].tolist()
            assert lens["top_tokens"] == [lm.tokenizer.decode([int(i)]) for i in order[:k]]
            np.testing.assert_allclose(lens["top_probs"], lens_probs[order[:k]], atol=P_TOLERANCE, rtol=RELATIVE)
            if injected:
                word_ids = lens["word_token_ids"]
                best = max(word_ids, key=lambda i: lens_probs[i])
                assert lens["word_token"] == best
                assert abs(lens["word_prob"] - lens_probs[best]) <= P_TOLERANCE
                assert lens["word_rank"] == 1 + int((lens_probs > lens_probs[best]).sum())
                checked_word += 1
        assert [l["layer"] for l in r["readout"]["lens"]] == ([r["layer"]] if injected else plan.layers)
    assert checked_word == 8
    assert moved == 8, "the injection must move p_yes well beyond the tolerance (else the check is vacuous)"


def _readouts(rows):
    return {r["trial_id"]: r["readout"] for r in rows}


ENGINES_RTOL = 1e-5  # float32: depth sharing's batch-1 clean forward moves probabilities by round-off (~6e-8)


def _assert_readouts_agree(ours, theirs, where="readouts"):
    """Ids, tokens, layers and ranks equal; every probability within ENGINES_RTOL of the other's."""
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            _assert_readouts_agree(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_readouts_agree(a, b, f"{where}[{i}]")
    elif isinstance(ours, float):
        assert isinstance(theirs, float) and abs(ours - theirs) <= ENGINES_RTOL * abs(theirs), (where, ours, theirs)
    else:
        assert ours == theirs, (where, ours, theirs)


def test_readout_is_the_same_for_both_engines_and_compiles_once(sweep_run):
    """The readout depends on the prompt and injection alone: the same record by record (float32:
    ids and ranks equal, probabilities within 1e-5 relative) for the sweep engine, which computes
    it in its cell prefill (no forward of its own; depth shared, the sweep's default), and plain
    batches, which run one; one compiled readout program for all calls of the plain path."""
    _, _, _, records, _, compiles = sweep_run
    _assert_readouts_agree(_readouts(records["shared"]), _readouts(records["plain"]))
    assert len(records["shared"]) == 2 * 2 * 2 + 2
    assert {r["timing"]["readout_forwards"] for r in records["shared"]} == {0}
    assert min(r["timing"]["readout_forwards"] for r in records["plain"]) >= 1
    assert compiles == 1


def test_controls_per_layer_share_the_clean_cell_with_each_layers_lens(sweep_run, tmp_path):
    """With controls_per_layer every control is the clean model: the engine prefills one clean cell
    for all of them, whose lens runs at the union of their layers; each control records its own
    layer's, equal to the plain path's forward at that layer."""
    from configs.sweeps import quickstart
    from jax_introspect.experiment import sweep
    _, lm, _, _, _, _ = sweep_run
    config = quickstart.get_config().replace(
        words=["Dust"], layers=[0, 1], strengths=[8.0], trials_per_cell=1, control_trials=2, controls_per_layer=True,
        max_new_tokens=2, batch_size=4, batches_per_call=2, baseline_words=["Desks", "Sand"], readout_top_k=8)
    records = {}
    for engine in ("shared", "plain"):
        sweep.run_sweep(lm, config.replace(engine=engine), str(tmp_path / engine), progress=False)
        with open(tmp_path / engine / "trials.jsonl") as f:
            records[engine] = [json.loads(line) for line in f]
    controls = [r for r in records["shared"] if r["kind"] != "injected"]
    assert sorted(r["layer"] for r in controls) == [0, 0, 1, 1]
    assert all([lens["layer"] for lens in r["readout"]["lens"]] == [r["layer"]] for r in controls)
    _assert_readouts_agree(_readouts(records["shared"]), _readouts(records["plain"]))


def test_k_largest_is_a_stable_descending_top_k():
    """`lens.k_largest` (the readout's top-k) against numpy's stable sort: the k largest, descending,
    equal values in index order, -inf entries last (a row with fewer finite values than k)."""
    import jax.numpy as jnp
    from jax_introspect import lens
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(3, 4, 60)), 1).astype(np.float32)  # rounding: ties
    x[0, 0, 5:] = -np.inf  # 5 finite values, k = 10
    x[1, 2, :] = 0.25  # all equal
    for k in (1, 3, 10):
        values, ids = map(np.asarray, lens.k_largest(jnp.asarray(x), k))
        order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        np.testing.assert_array_equal(ids, order)
        np.testing.assert_array_equal(values, np.take_along_axis(x, order, axis=-1))


def test_older_records_without_readout_still_read(tmp_path):
    from jax_introspect.experiment import results
    record = results.TrialRecord(config_hash="h", trial_id="t", kind="control", protocol="p", word=None, layer=None,
                                 strength=0.0, vector_method="m", trial_index=0, seed=0, prompt="", question="",
                                 response="", n_tokens=0, finished=True, grades={}, timing={})
    line = record.to_json()
    assert "readout" not in json.loads(line)  # written as before
    back = results.TrialRecord.from_dict(json.loads(line))
    assert back.readout is None and back == record


def test_report_section_counts_and_intervals(tmp_path):
    """summarize against direct counts and scipy's t interval over the words' means; the report
    writes the section and its plot."""
    from scipy import stats
    from jax_introspect.experiment import readout_report, report
    from jax_introspect.experiment.runs import Row, Run
    grades = {"coherent": True, "affirmative": False, "identifies": False, "immediate": False}

    def lens(layer, top, word_ids=None, rank=None):
        entry = {"layer": layer, "top_ids": top, "top_tokens": [str(t) for t in top], "top_probs": [0.1] * len(top)}
        if word_ids is not None:
            entry.update(word_token_ids=word_ids, word_token=word_ids[0], word_prob=0.01, word_rank=rank)
        return entry
    rows = []
    # (word, p_yes, word ids, rank): Dust twice (one value), Snow, Milk; top-3 lens
    for i, (word, p, ids, rank) in enumerate([("Dust", 0.2, [5], 2), ("Dust", 0.2, [5], 2), ("Snow", 0.5, [7], 9),
                                              ("Milk", 0.3, [9], 1)]):
        rows.append(Row(kind="injected", protocol="p", word=word, layer=3, strength=4.0, grades=grades,
                        trial_id=f"t{i}", readout={"p_yes": p, "p_no": 1 - p, "lens": [lens(3, [9, 1, 2], ids, rank)]}))
    for i in range(2):
        rows.append(Row(kind="control", protocol="p", word=None, layer=None, strength=0.0, grades=grades,
                        trial_id=f"c{i}", readout={"p_yes": 0.1, "p_no": 0.8, "lens": [lens(3, [7, 1, 2]), lens(5, [0, 1, 2])]}))
    section = readout_report.summarize(rows)
    cell = section["cells"][0]
    assert cell["p_yes"]["mean"] == pytest.approx((0.2 + 0.2 + 0.5 + 0.3) / 4)
    low, high = stats.t.interval(0.95, 2, loc=np.mean([0.2, 0.5, 0.3]), scale=stats.sem([0.2, 0.5, 0.3]))
    assert (cell["p_yes"]["low"], cell["p_yes"]["high"]) == pytest.approx((max(0, low), high))
    assert cell["p_yes"]["n_words"] == 3 and cell["p_yes"]["n_trials"] == 4
    assert cell["word_in_top_k"]["k"] == 3  # ranks 2, 2, 1 are within the top 3; 9 is not
    assert cell["control_word_in_top_k"]["k"] == 1  # only Snow's token 7 is in the controls' top 3 at layer 3
    assert section["controls"][0]["p_yes"]["mean"] == pytest.approx(0.1)
    run = Run(path=str(tmp_path / "r"), format="jax_introspect", rows=rows,
              metadata={"name": "r", "protocols": ["p"], "layers": [3], "strengths": [4.0], "words": []})
    path = report.write_report(run, str(tmp_path / "report"), inspect=False)  # a synthetic run: no trials.jsonl to export
    text = open(path).read()
    assert "Detection probability and logit lens" in text and "readout_p.png" in text
    assert os.path.exists(tmp_path / "report" / "readout_p.png")
