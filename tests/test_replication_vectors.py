"""The 405B replication's own vectors in our sweeps (issue 13): its exact contrast sentences and
recipe, checked against an independent transformers implementation on SmolLM2; the doubled BOS
of its vLLM run; its `.pt` vector files injected by a sweep; controls per layer; one grader per
protocol; responses a judge leaves ungraded."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from jax_introspect.experiment import protocols, sweep, sweep_config, vectors
from tests import hf_reference as ref
from tests.test_reliability_sweep import one_line_error
from tests.test_sweep import read_jsonl, run

SHARED_DATA = os.path.join(os.path.dirname(ref.REPO), "shared", "data")
PROTOCOL_405B = os.path.join(SHARED_DATA, "replication_405b_protocol.json")
# The replication's own love vector (layer 84 of the 405B), copied unchanged: tests/data/replication_405b/README.md
REAL_PT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "replication_405b", "vector_love_layer84.pt")
INJECTED, ALT = "replication_405b_injected_thought", "replication_405b_thinking_about"


def _quickstart(**changes):
    from configs.sweeps import quickstart
    return quickstart.get_config().replace(**changes)


# --- the sentences and the doubled BOS ------------------------------------------------------------

def test_contrast_sentences_are_the_replications():
    with open(PROTOCOL_405B) as f:
        theirs = json.load(f)["contrast_pairs"]
    ours = protocols.contrast_pairs()
    assert {k: [list(p) for p in v] for k, v in ours.items()} == theirs
    assert [len(v) for v in ours.values()] == [10, 10]


def test_doubled_bos_gives_the_replications_173_prompt_tokens():
    """Its logs count 173 tokens for Lindsey's prompt and 42 for the alternative one; the Llama-3.1
    template (one BOS, the default date system block) gives 172 and 41: vLLM added a second BOS."""
    from jax_introspect.tokenizer import from_tiktoken_model, llama3_tokenizer_model_path
    tokenizer = from_tiktoken_model(llama3_tokenizer_model_path())
    bos = tokenizer.bos_id
    counts = {}
    for double in (False, True):
        prefix = sweep.prompt_prefix(tokenizer, double)
        for name in (INJECTED, ALT):
            info = sweep.prompt_info(tokenizer, name, system_header=True, prefix=prefix)
            counts[name, double] = len(info.ids)
            assert info.ids[:2] == [bos, bos if double else tokenizer.token_to_id("<|start_header_id|>")]
            assert info.start == 0 and info.text.startswith(prefix + "<|begin_of_text|><|start_header_id|>system")
    print("replication prompts, tokens (single BOS, doubled):", counts)
    assert counts == {(INJECTED, False): 172, (ALT, False): 41, (INJECTED, True): 173, (ALT, True): 42}


def test_doubled_bos_needs_a_bos_token():
    from jax_introspect.tokenizer import from_gguf, smollm2_gguf_path
    assert sweep.prompt_prefix(from_gguf(smollm2_gguf_path()), False) == ""
    with pytest.raises(sweep.SweepError, match="no BOS"):
        sweep.prompt_prefix(from_gguf(smollm2_gguf_path()), True)


# --- our extraction against an independent transformers implementation (SmolLM2) ------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    import jax_introspect
    ckpt = str(tmp_path_factory.mktemp("replication_smollm2") / "ckpt")
    ref.run_convert("smollm2", ckpt)
    return jax_introspect.load(ckpt), ref.load_hf_smollm2()


def hf_replication_vectors(model, tokenizer, pairs, double_bos):
    """The replication's `build_vector`, written again with transformers: `chat_wrap` (the chat
    template, one user turn, the generation prompt), the ids with one more BOS in front as vLLM
    makes them when `double_bos`, the output of every decoder layer (forward hooks) at the last
    token, mean(positive) - mean(negative), unit norm. [concepts, layers, d_model]."""
    def last_token(text):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        ids = ([tokenizer.bos_token_id] if double_bos else []) + tokenizer.encode(chat, add_special_tokens=False)
        outputs = []
        hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in model.model.layers]
        try:
            with torch.no_grad():
                model(torch.tensor([ids]))
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack([o[0, -1].float() for o in outputs]), ids  # [layers, d_model]

    out = []
    for concept_pairs in pairs.values():
        pos = torch.stack([last_token(p)[0] for p, _ in concept_pairs]).mean(0)
        neg = torch.stack([last_token(n)[0] for _, n in concept_pairs]).mean(0)
        raw = pos - neg
        out.append((raw / raw.norm(dim=-1, keepdim=True)).numpy())
    return np.stack(out), last_token


@pytest.mark.parametrize("double_bos", [False, True])
def test_contrast_vectors_equal_an_independent_hf_implementation(smollm2, double_bos):
    lm, (model, hf_tokenizer) = smollm2
    pairs = protocols.contrast_pairs()
    # SmolLM2's BOS is <|im_start|> (its tokenizer adds none, so vLLM would not double it there):
    # the doubled case puts one more in front on both sides, as vLLM does on Llama-3.
    prefix = hf_tokenizer.bos_token if double_bos else ""
    ours = vectors.contrast_vectors(lm, pairs, prefix=prefix)
    theirs, last_token = hf_replication_vectors(model, hf_tokenizer, pairs, double_bos)
    sentence = pairs["love"][0][0]
    our_ids = lm.tokenizer.encode(prefix + lm.tokenizer.chat_prompt([{"role": "user", "content": sentence}]))
    assert our_ids == last_token(sentence)[1]
    assert our_ids[:2] == ([1, 1] if double_bos else [1, 9690])  # the doubled BOS is there, or not
    assert ours.names == list(pairs) and ours.vectors.shape == theirs.shape == (2, 30, 576)
    np.testing.assert_allclose(np.linalg.norm(ours.vectors, axis=-1), 1.0, rtol=1e-5)
    cosine = (ours.vectors.astype(np.float64) * theirs).sum(-1)  # both unit: [concepts, layers]
    per_layer = cosine.min(axis=0)
    print(f"SmolLM2 replication recipe (double_bos={double_bos}): cosine vs transformers, min over concepts "
          f"per layer: {np.array2string(per_layer, precision=7, max_line_width=200)}; min {per_layer.min():.7f} "
          f"at layer {per_layer.argmin()} (1 - cosine <= {max((1 - per_layer).max(), 0):.1e})")
    assert per_layer.min() >= 0.9999
    assert set(ours.metadata["raw_norm"]) == set(pairs) and len(ours.metadata["pos_neg_cosine"]["love"]) == 30


# --- vector files: the replication's .pt and our .npz ---------------------------------------------

D_MODEL, N_LAYERS = 64, 2  # the tiny Llama-3 of tests/test_sweep.py


def save_pt(path, concept, layer, width=D_MODEL, seed=0):
    """A vector file in the replication's format (its lindsey_full_sweep.build_vector)."""
    raw = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    torch.save({"direction": raw / raw.norm(), "concept": concept, "layer": layer, "model_path": "/tiny",
                "n_pairs": 10, "raw_norm": float(raw.norm()), "pos_neg_cosine": 0.9}, str(path))
    return str(path)


def test_vector_files_give_every_word_at_every_layer(tmp_path):
    love = save_pt(tmp_path / "love.pt", "love", 1, seed=1)
    caps = save_pt(tmp_path / "caps.pt", "all_caps", 1, seed=2)
    ours = vectors.ConceptVectors(names=["love", "all_caps", "Dust"],
                                  vectors=np.random.RandomState(0).randn(3, N_LAYERS, D_MODEL).astype(np.float32),
                                  metadata={})
    ours.save(str(tmp_path / "ours.npz"))
    got = vectors.vectors_from_files([love, caps], ["love", "all_caps"], [1], D_MODEL)
    np.testing.assert_array_equal(got.vector("love", 1), vectors.read_pt_vectors(love)[0]["vector"])
    assert got.layers == [1] and got.metadata["sources"]["love/L1"]["raw_norm"] > 0
    with pytest.raises(vectors.VectorError, match="no vector at layer 0"):
        got.vector("love", 0)
    # an .npz may hold more words and layers than the sweep uses; a .pt file is for one use
    both = vectors.vectors_from_files([str(tmp_path / "ours.npz")], ["love", "all_caps"], [0, 1], D_MODEL)
    np.testing.assert_array_equal(both.vector("all_caps", 0), ours.vectors[1, 0])
    both.save(str(tmp_path / "again.npz"))
    assert vectors.ConceptVectors.load(str(tmp_path / "again.npz")).layers == [0, 1]


@pytest.mark.parametrize("files,words,layers,message", [
    ([("love", 0)], ["love"], [1], r"layer 0 is not one of the sweep's layers \[1\]"),
    ([("love", 1)], ["love", "all_caps"], [1], r"no vector for 'all_caps' at layer 1"),
    ([("love", 1)], ["love"], [0, 1], r"no vector for 'love' at layer 0"),
    ([("hate", 1)], ["love"], [1], r"'hate' is not among the sweep's words"),
    ([("love", 1, 128)], ["love"], [1], r"has shape \(128,\), but this model's d_model is 64"),
    ([("love", 1), ("love", 1)], ["love"], [1], "a second vector for 'love' at layer 1"),
    ([("love", None)], ["love"], [1], "names no layer"),
])
def test_vector_files_that_do_not_fit_the_sweep_are_refused(tmp_path, files, words, layers, message):
    paths = []
    for i, (concept, layer, *width) in enumerate(files):
        path = str(tmp_path / f"v{i}.pt")
        if layer is None:
            torch.save({concept: torch.randn(D_MODEL)}, path)
        else:
            save_pt(path, concept, layer, *width)
        paths.append(path)
    with pytest.raises(vectors.VectorError, match=message):
        vectors.vectors_from_files(paths, words, layers, D_MODEL)


def test_the_replications_own_pt_file_reads_as_a_405b_vector():
    path = REAL_PT  # copied unchanged from the replication's repository (tests/data/replication_405b/README.md)
    (row,) = vectors.read_pt_vectors(str(path))
    assert (row["name"], row["layer"], row["n_pairs"], row["vector"].shape) == ("love", 84, 10, (16384,))
    assert abs(np.linalg.norm(row["vector"]) - 1) < 1e-5
    got = vectors.vectors_from_files([str(path)], ["love"], [84], 16384)  # Llama-3.1-405B: 126 layers x 16384
    np.testing.assert_array_equal(got.vector("love", 84), row["vector"])
    with pytest.raises(vectors.VectorError, match="d_model is 8192"):
        vectors.vectors_from_files([str(path)], ["love"], [84], 8192)  # a 70B
    with pytest.raises(vectors.VectorError, match="layer 84 is not one of the sweep's layers"):
        vectors.vectors_from_files([str(path)], ["love"], [70], 16384)


@pytest.mark.parametrize("changes,message", [
    (dict(vector_method="files"), "vector_method='files' needs vector_files"),
    (dict(vector_files=("a.pt",)), "vector_method is 'mean_difference'"),
    (dict(vector_method="files", vector_files=("a.txt",)), "expected one of"),
    (dict(vector_method="files", vector_files=("a.pt", "a.pt")), "vector_files repeat"),
    (dict(double_bos="yes"), "double_bos must be True or False"),
    (dict(controls_per_layer=1), "controls_per_layer must be True or False"),
])
def test_new_fields_are_checked_without_a_model(changes, message):
    with pytest.raises(sweep.SweepError, match=message):
        _quickstart(**changes)


# --- per-protocol graders ----------------------------------------------------------------------

TWO = ("lindsey_injected_thought", "thinking_about")


def test_one_grader_spec_or_one_per_protocol():
    assert sweep_config.grader_specs(_quickstart(protocols=TWO)) == dict.fromkeys(TWO, "heuristic")
    mixed = _quickstart(protocols=TWO, grader="thinking_about=api:openai:gpt-x, lindsey_injected_thought=heuristic")
    assert sweep_config.grader_specs(mixed) == {TWO[0]: "heuristic", TWO[1]: "api:openai:gpt-x"}
    # a known protocol the sweep does not run may keep its grader (a config's map survives --config.protocols)
    narrower = mixed.replace(protocols=TWO[:1])
    assert sweep_config.grader_specs(narrower) == {TWO[0]: "heuristic"}
    assert sweep_config.parse_field("grader", "a=b:c,d=e") == "a=b:c,d=e"  # one text field, checked when built


@pytest.mark.parametrize("grader,message", [
    ("lindsey_injected_thought=heuristic", r"no grader for protocols \['thinking_about'\]"),
    ("lindsey_injected_thought=heuristic,thinking_about=heuristic,nope=heuristic", "unknown protocol 'nope'"),
    ("lindsey_injected_thought=heuristic,lindsey_injected_thought=heuristic,thinking_about=heuristic",
     "given two graders"),
    ("lindsey_injected_thought=heuristic,thinking_about=api:foo", "unknown grader spec 'api:foo'"),
    ("lindsey_injected_thought=heuristic,thinking_about", "write PROTOCOL=SPEC"),
    ("heuristic,api:openai:x", "unknown grader spec"),
])
def test_bad_grader_maps_are_refused(grader, message):
    with pytest.raises(sweep.SweepError, match=message):
        _quickstart(protocols=TWO, grader=grader)


def test_replication_configs_plan_its_trials():
    from configs.sweeps import lindsey2025, quickstart, replication_405b_canonical, replication_405b_layers
    from jax_introspect.experiment import grading
    canonical, layers = replication_405b_canonical.get_config(), replication_405b_layers.get_config()
    for config in (canonical, layers):
        assert config.double_bos and set(sweep_config.grader_specs(config).values()) == {grading.REPLICATION_GRADER}
    trials = sweep.plan_trials(layers, list(layers.words), [70, 84, 90, 100])
    controls = [t for t in trials if t.kind == "control"]
    assert len(trials) == 4 * 5 * 2 * 20 + 160 and len(controls) == 160
    assert {t.layer for t in controls} == {70, 84, 90, 100} and all(t.strength == 0.0 for t in controls)
    assert controls[0].trial_id == f"{INJECTED}/control/L70/0" and controls[-1].trial_id == f"{INJECTED}/control/L100/39"
    canonical_controls = [t for t in sweep.plan_trials(canonical, list(canonical.words), [84]) if t.kind == "control"]
    assert len(canonical_controls) == 80 and canonical_controls[0].trial_id == f"{INJECTED}/control/0"
    for config in (quickstart.get_config(), lindsey2025.get_config()):  # existing ids and bindings unchanged
        plan = sweep.plan_trials(config, list(config.words), [3])
        assert [t.trial_id for t in plan if t.kind == "control"][:2] == ["lindsey_injected_thought/control/0",
                                                                          "lindsey_injected_thought/control/1"]
        assert not {"double_bos", "controls_per_layer", "vector_files"} & set(sweep_config.bound_values(config))
    assert sweep_config.bound_values(canonical)["double_bos"] is True
    assert sweep_config.bound_values(layers)["controls_per_layer"] is True


# --- sweeps on the tiny Llama-3 with the real tokenizer ---------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ref.build_llama3_checkpoint(tmp_path_factory.mktemp("replication_sweep"))


@pytest.fixture(scope="module")
def lm(checkpoint):
    import jax_introspect
    return jax_introspect.load(checkpoint)


def test_a_sweep_injects_the_replications_pt_vectors(lm, tmp_path):
    """A .pt vector file in the replication's format, injected norm-matched at all positions with
    the doubled BOS; the text of a trial is exactly what a direct injection of that file's
    direction gives; controls at each layer."""
    from jax_introspect import inject
    love, caps = save_pt(tmp_path / "love.pt", "love", 1, seed=1), save_pt(tmp_path / "caps.pt", "all_caps", 1, seed=2)
    config = _quickstart(protocols=(INJECTED,), words=("love", "all_caps"), vector_method="files",
                         vector_files=(love, caps), layers=(1,), strengths=(8.0,), trials_per_cell=2,
                         cell_per_word=True, control_trials=2, controls_per_layer=True, double_bos=True,
                         max_new_tokens=5, batch_size=4)
    out = tmp_path / "run"
    summary = sweep.run_sweep(lm, config, str(out), progress=False)
    assert summary["ran"] == 2 * 2 + 2 and summary["ungraded"] == 0
    records = {r["trial_id"]: r for r in read_jsonl(out / "trials.jsonl")}
    assert set(records) == {f"{INJECTED}/L1/s8/{w}/{i}" for w in ("love", "all_caps") for i in (0, 1)} | \
        {f"{INJECTED}/control/L1/{i}" for i in (0, 1)}
    assert records[f"{INJECTED}/control/L1/0"]["layer"] == 1 and records[f"{INJECTED}/control/L1/0"]["word"] is None
    bos = "<|begin_of_text|>"
    assert all(r["prompt"].startswith(bos + bos + "<|start_header_id|>") for r in records.values())
    saved = vectors.ConceptVectors.load(str(out / "vectors.npz"))  # the record of what was injected
    np.testing.assert_array_equal(saved.vector("love", 1), vectors.read_pt_vectors(love)[0]["vector"])

    record = records[f"{INJECTED}/L1/s8/love/1"]
    ids = lm.tokenizer.encode(record["prompt"])
    assert ids[:2] == [lm.tokenizer.bos_id] * 2
    injection = inject.make(1, 8.0, vectors.read_pt_vectors(love)[0]["vector"], start=0,
                            norm_match=protocols.protocol(INJECTED)["norm_match"], batch=1)
    direct = lm.generate([ids], max_new_tokens=5, temperature=1.0, top_p=1.0, seed=config.seed,
                         trial_ids=[record["trial_id"]], injection=injection)[0]
    assert direct.text == record["response"]
    assert np.abs(lm.logits([ids], injection=injection) - lm.logits([ids])).max() > 1e-3  # it did something

    # the folder is bound to the file's content, not its path
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(love, moved / "love.pt")
    again = sweep.run_sweep(lm, config.replace(vector_files=(str(moved / "love.pt"), caps)), str(out), progress=False)
    assert again["ran"] == 0


@pytest.fixture(scope="module")
def weightless(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replication_weightless") / "ckpt"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("params"))
    return str(folder)


def test_a_vector_file_of_another_width_is_refused_before_the_weights_load(weightless, tmp_path):
    wide = save_pt(tmp_path / "love.pt", "love", 1, width=128)
    proc = run([sys.executable, "-m", "launch.sweep", "--config=configs/sweeps/quickstart.py",
                f"--checkpoint={weightless}", f"--out={tmp_path / 'out'}", "--noreport", "--config.words=love",
                "--config.layers=1", "--config.vector_method=files", f"--config.vector_files={wide}"], check=False)
    one_line_error(proc, "vector_files:", "d_model is 64")
    assert not (tmp_path / "out" / "run.json").exists()


def test_each_protocol_has_its_grader_and_ungraded_responses_are_kept(lm, tmp_path, monkeypatch, capsys):
    """Two protocols, two graders; the second leaves two responses ungraded (None, as the
    replication's judge does with a reply that broke its schema): they are kept, said once, and
    the next run grades them without generating them again."""
    from jax_introspect.experiment import grading, results
    seen = []

    class Fake(grading.Grader):
        refusals = {"api:openai:judge": 2}  # None for the first requests of its first call

        def __init__(self, spec):
            self.name = spec

        def grade(self, requests, progress=False):
            seen.extend((self.name, r) for r in requests)
            refuse, Fake.refusals[self.name] = Fake.refusals.get(self.name, 0), 0
            return [None if i < refuse else grading.make_grade(self.name, True, False, False, False, r.word)
                    for i, r in enumerate(requests)]

    monkeypatch.setattr(grading, "make_grader", lambda spec, **kw: Fake(spec))
    config = _quickstart(protocols=TWO, grader=f"{TWO[0]}=heuristic,{TWO[1]}=api:openai:judge", words=("Dust",),
                         layers=(1,), strengths=(4.0,), trials_per_cell=2, control_trials=1, max_new_tokens=3,
                         batch_size=8, baseline_words=("Sand", "Desks"))
    out = str(tmp_path / "run")
    first = sweep.run_sweep(lm, config, out, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "left ungraded" in line]
    assert first["ungraded"] == 2 and len(warnings) == 1 and "re-run the same command" in warnings[0]
    graded = list(results.read_records(os.path.join(out, "trials.jsonl")))
    kept = list(results.read_records(os.path.join(out, "ungraded.jsonl")))
    assert len(graded) == 4 and len(kept) == 2 and {r.protocol for r in kept} == {TWO[1]}
    assert all(r.grades["grader"] == ("heuristic" if r.protocol == TWO[0] else "api:openai:judge") for r in graded)
    for name, request in seen:  # each request went to its protocol's grader, with strength and protocol
        assert name == ("heuristic" if request.protocol == TWO[0] else "api:openai:judge")
        assert request.strength == (4.0 if request.word else 0.0)

    second = sweep.run_sweep(lm, config, out, progress=False)
    assert second["ran"] == 0 and second["ungraded"] == 0
    final = list(results.read_records(os.path.join(out, "trials.jsonl")))
    assert sorted(r.trial_id for r in final) == sorted(r.trial_id for r in graded + kept)
    assert not os.path.exists(os.path.join(out, "ungraded.jsonl"))
    by_id = {r.trial_id: r for r in final}
    assert all(by_id[r.trial_id].response == r.response and by_id[r.trial_id].grades for r in kept)
