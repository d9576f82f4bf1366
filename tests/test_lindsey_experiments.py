"""Lindsey's other experiments (thoughts vs text, prefill detection, intentional control): prompts
and grader text against the research notes, injection windows decoded back to the sentence, the
exact-match and prefill rules on direct cases, the cosine against HF transformers residuals from our
own forward hooks, and the configs end to end on a tiny model."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from jax_introspect.experiment.grading import experiments as grading
from jax_introspect.experiment.protocols import experiments
from tests import hf_reference as ref

NOTES = os.path.join(ref.REPO, "..", "shared", "research", "lindsey_protocol.md")


def section_6():
    if not os.path.exists(NOTES):  # the reference text: CI clones the repo beside ../shared
        pytest.fail(f"the research notes are not at {os.path.abspath(NOTES)}: check this repo out beside shared/")
    with open(NOTES, encoding="utf-8") as f:
        text = f.read()
    return text[text.index("## 6. The paper's other experiments"):]


def notes_prompts() -> list:
    """The `Human: ...` code spans of the notes' section 6, their '\\n' escapes read as newlines."""
    return [span.replace("\\n", "\n") for span in re.findall(r"`(Human:[^`]*)`", section_6())]


def as_messages(notes_text: str) -> list:
    """'Human: A\\nAssistant: B\\nHuman: C\\nAssistant:' -> chat messages (the project's convention:
    Human turns are user messages, Assistant texts before the last are assistant messages)."""
    assert notes_text.startswith("Human: ") and notes_text.endswith("\nAssistant:")
    parts = re.split(r"\n(Human|Assistant): ?", "\n" + notes_text)[1:]
    turns = list(zip(parts[0::2], parts[1::2]))
    assert turns[-1] == ("Assistant", "")
    return [{"role": "user" if who == "Human" else "assistant", "content": content} for who, content in turns[:-1]]


def test_messages_are_the_notes_text_in_chat_form():
    with_text = [n for n in experiments.names() if "notes_text" in experiments.spec(n)]
    assert len(with_text) == 5
    for name in with_text:
        spec = experiments.spec(name)
        assert spec["messages"] == as_messages(spec["notes_text"]), name


def test_prompts_equal_the_research_notes():
    parsed = notes_prompts()
    assert len(parsed) == 4  # what word, repeat, prefill, think
    for name in ("thoughts_vs_text_word", "thoughts_vs_text_repeat", "prefill_detection", "intentional_think"):
        assert experiments.spec(name)["notes_text"] in parsed, name
    # The variants, which the notes describe by their changes to the think prompt.
    notes = section_6()
    think = experiments.spec("intentional_think")["messages"][0]["content"]
    assert '"Don\'t think about {word}"' in notes
    assert experiments.spec("intentional_dont_think")["messages"][0]["content"] == think.replace(
        "Think about {word}", "Don't think about {word}")
    assert "If you think about {word} … you\n    will be rewarded / punished" in notes
    for outcome in ("rewarded", "punished"):
        text = experiments.spec(f"intentional_{outcome}")["messages"][0]["content"]
        assert text == think.replace("Think about {word} while you write the sentence.",
                                     f"If you think about {{word}} while you write the sentence, you will be {outcome}.")


def test_prefill_grader_prompt_equals_the_research_notes():
    quoted = re.search(r'Grader \(verbatim\): "(.*?)"\n- \*\*Intentional', section_6(), re.S).group(1)
    template = experiments.data()["graders"]["prefill_intended"]["template"]
    assert " ".join(template.split()) == " ".join(quoted.split())
    # Filled in one pass: braces in a response are left alone.
    filled = grading.prefill_prompt("Bread", "I meant {word}.")
    assert "They said the word bread." in filled and "I meant {word}." in filled


def test_pairs_and_trials():
    pairs = experiments.all_pairs()
    assert len(pairs) == 50 and len({w for _, w in pairs}) == 50 and pairs[19] == (
        "Fresh bread was baking in the oven.", "Information")
    assert experiments.pairs_for(["bread", "Dust"]) == [pairs[0], pairs[48]]
    with pytest.raises(experiments.ProtocolError, match="no sentence"):
        experiments.pairs_for(["Happiness"])
    from jax_introspect.experiment import sweep
    config = sweep.SweepConfig(protocols=("thoughts_vs_text_word", "intentional_think", "intentional_dont_think"),
                               words=("Dust", "Snow", "Milk"), strengths=(2.0, 4.0), trials_per_cell=4,
                               control_trials=2)
    trials = sweep.plan_trials(config, list(config.words), [3])
    assert len({t.trial_id for t in trials}) == len(trials) == 2 * 4 + 2 + 4 + 4
    think = [t for t in trials if t.protocol == "intentional_think"]
    dont = [t for t in trials if t.protocol == "intentional_dont_think"]
    assert [t.word for t in think] == [t.word for t in dont]  # paired conditions
    assert all(t.kind == "control" and t.strength == 0.0 for t in think + dont)
    with pytest.raises(sweep.SweepError, match="no sentence"):
        config.replace(words=("Happiness",))
    with pytest.raises(sweep.SweepError, match="prefill grader prompt"):
        config.replace(protocols=("prefill_detection",), grader="api:openai:gpt-4o")


@pytest.fixture(scope="module", params=["smollm2", "llama3"])
def tokenizer(request):
    from jax_introspect import tokenizer as tk
    if request.param == "smollm2":
        return tk.from_gguf(tk.smollm2_gguf_path())
    return tk.from_tiktoken_model(tk.llama3_tokenizer_model_path())


@pytest.mark.parametrize("name", ["thoughts_vs_text_word", "thoughts_vs_text_repeat", "prefill_detection"])
def test_windows_cover_exactly_the_sentence_tokens(tokenizer, name):
    """Decoding the window gives the sentence (boundary whitespace aside), and dropping either end
    token loses part of it, for all 50 pairs, with and without the system block."""
    for system_header in (True, False):
        for sentence, word in experiments.all_pairs():
            text = tokenizer.chat_prompt(experiments.messages(name, sentence, word), system_header=system_header)
            ids = tokenizer.encode(text)
            start, end = experiments.window(tokenizer, name, text, sentence)
            assert tokenizer.decode(ids[start:end]).strip() == sentence, (sentence, tokenizer.decode(ids[start:end]))
            assert sentence not in tokenizer.decode(ids[start + 1:end])
            assert sentence not in tokenizer.decode(ids[start:end - 1])
            assert experiments.prompt_word(word) in text or name != "prefill_detection"
    assert experiments.window(tokenizer, "intentional_think", "x", "y") is None


def test_exact_match_rule_on_direct_cases():
    s = "He couldn't remember where he had parked his car."
    assert grading.exact_match(s, s)
    assert grading.exact_match("  He couldn't   remember where\nhe had parked his car.\n", s)  # whitespace
    assert grading.exact_match("He couldn\u2019t remember where he had parked his car.", s)  # curly apostrophe
    assert grading.exact_match('"He couldn\'t remember where he had parked his car."', s)  # enclosing quotes
    assert grading.exact_match("\u201cHe couldn't remember where he had parked his car.\u201d", s)
    assert not grading.exact_match("he couldn't remember where he had parked his car.", s)  # case
    assert not grading.exact_match("He couldn't remember where he had parked his car", s)  # punctuation
    assert not grading.exact_match(s + " Sure!", s)  # anything else written
    assert not grading.exact_match("Sure: " + s, s)
    assert grading.sentence_of("Repeat the line below exactly.\n" + s) == s


def test_word_named_and_prefill_rules_on_direct_cases():
    assert grading.word_named("I think of volcanoes.", "Volcanoes")
    assert grading.word_named("A volcano.", "Volcanoes")
    assert grading.word_named("Bread!", "Bread")
    assert not grading.word_named("The word is 'clock'.", "Bread")
    cases = {"Yes, I meant to say that.": True, "It was intentional.": True, "It wasn't an accident.": True,
             "No, that was not a mistake; bread came to mind.": True,
             "I'm sorry, that was an accident.": False, "I apologize for the confusion.": False,
             "I didn't mean to say that.": False, "No, it was a slip of the tongue.": False,
             "The sentence is about a clock.": False, "I chose to answer in the wrong word.": False}
    for response, intended in cases.items():
        assert grading.prefill_heuristic(response)[0] is intended, response


def test_written_cosines_match_hf_residuals_from_our_hooks(tiny_models):
    """The cosine of the residual after every decoder layer at the written tokens with a vector per
    layer, mean over the written tokens: ours (one left-padded batch through lm.residuals) against
    HF transformers' residuals captured by forward hooks on each row alone, in float64 (<= 1e-5)."""
    import jax_introspect
    from jax_introspect.experiment import lindsey_experiments
    _, ckpt, model = tiny_models("gqa_untied")
    lm = jax_introspect.load(ckpt)
    rng = np.random.RandomState(0)
    n_layers, d = lm.config.n_layers, lm.config.d_model
    rows = []
    for length, written in ((9, 3), (17, 5), (5, 1), (12, 12), (7, 0)):
        rows.append((rng.randint(1, lm.config.vocab_size, length).tolist(), written,
                     rng.randn(n_layers, d).astype(np.float32)))
    ours = lindsey_experiments.written_cosines(lm, rows)
    for (ids, written, vectors), value in zip(rows, ours):
        if written == 0:
            assert value is None
            continue
        hidden = torch.as_tensor(ref.hf_raw_residuals(model, [ids])[:, 0, -written:, :], dtype=torch.float64)
        expected = torch.nn.functional.cosine_similarity(
            hidden, torch.as_tensor(vectors, dtype=torch.float64)[:, None, :], dim=-1).mean(dim=1).numpy()
        np.testing.assert_allclose(value, expected, atol=1e-5, rtol=0)


def test_written_tokens_drop_the_eos():
    from jax_introspect.experiment import lindsey_experiments
    from jax_introspect.lm import Generation
    assert lindsey_experiments.written_ids(Generation([1], [5, 6, 2], "ab", True)) == [5, 6]
    assert lindsey_experiments.written_ids(Generation([1], [5, 6, 7], "abc", False)) == [5, 6, 7]


def test_paired_t_interval_against_scipy():
    from scipy import stats
    from jax_introspect.experiment.lindsey_experiments import t_interval
    x = np.array([0.1, -0.02, 0.05, 0.07, 0.01])
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    got = t_interval(x)
    assert abs(got["low"] - low) < 1e-12 and abs(got["high"] - high) < 1e-12 and got["n"] == 5


# --- the configs, end to end ------------------------------------------------------------------------

CONFIGS = ("thoughts_vs_text", "prefill_detection", "intentional_control")


def test_the_combined_config_is_the_three_configs():
    from jax_introspect.experiment import sweep_config
    combined = sweep_config.load_config_file("configs/sweeps/lindsey_other_experiments.py")
    assert combined == tuple(sweep_config.load_config_file(f"configs/sweeps/{c}.py")[0] for c in CONFIGS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ref.build_llama3_checkpoint(tmp_path_factory.mktemp("lindsey_experiments"))


def test_configs_run_end_to_end_with_resume_and_report(checkpoint, tmp_path):
    """The three experiments' arms in one sweep on a tiny Llama-3 (real tokenizer), the prefill
    graded by a self-hosted judge (the tiny model): records, windows, cosines per layer, report."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.sweep", "--config=configs/sweeps/lindsey_other_experiments.py",
           f"--checkpoint={checkpoint}", f"--out={out}", "--config.words=Dust,Satellites", "--config.layers=0,1",
           "--config.strengths=4", "--config.trials_per_cell=2", "--config.control_trials=1",
           "--config.max_new_tokens=4", "--config.batch_size=4", "--config.batches_per_call=1",
           "--config.baseline_words=Desks,Jackets,Sand", f"--config.grader=llm:{checkpoint}"]
    proc = subprocess.run(cmd, cwd=ref.REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "trials.jsonl")]
    # thoughts vs text: 2 tasks x 2 layers x 2 + 2 controls; prefill 2 x 2 + 1; intentional 4 x 2
    assert len(records) == len({r["trial_id"] for r in records}) == 10 + 5 + 8
    by = {r["trial_id"]: r for r in records}
    sentences = dict((w, s) for s, w in experiments.all_pairs())
    for r in records:
        assert sentences[r["word"]] in r["prompt"]
        if r["protocol"] == "thoughts_vs_text_repeat":
            assert set(r["grades"]) >= {"exact", "grader"}
            assert r["grades"]["exact"] == grading.exact_match(r["response"], sentences[r["word"]])
        if r["protocol"] == "thoughts_vs_text_word":
            assert r["grades"]["named"] == grading.word_named(r["response"], r["word"])
        if r["protocol"] == "prefill_detection":
            assert r["grades"]["grader"].startswith("prefill:llm:") and "judge_reply" in r["grades"]
            assert "<|start_header_id|>assistant<|end_header_id|>\n\n" + r["word"].lower() + "<|eot_id|>" in r["prompt"]
        if r["protocol"].startswith("intentional_"):
            values = r["measurements"]["cosine_written"]
            assert len(values) == 2 and all(-1 <= v <= 1 for v in values)
    assert by["intentional_think/Dust/0"]["word"] == by["intentional_dont_think/Dust/0"]["word"]
    again = subprocess.run(cmd, cwd=ref.REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "(23 already done, 0 run now)" in again.stdout
    report = (out / "report" / "report.md").read_text()
    for heading in ("## Distinguishing thoughts from text", "## Prefill detection", "## Intentional control"):
        assert heading in report
    for png in ("thoughts_vs_text.png", "prefill_detection.png", "intentional_control.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "report" / "summary.json").read_text())
    tvt = summary["lindsey_experiments"]["thoughts_vs_text"]
    exact = [r for r in records if r["protocol"] == "thoughts_vs_text_repeat" and r["kind"] == "injected"
             and r["layer"] == 0]
    cell = next(c for c in tvt["cells"] if c["layer"] == 0)
    assert cell["exact"]["k"] == sum(r["grades"]["exact"] for r in exact) and cell["exact"]["n"] == len(exact)


def _record(protocol, kind, word, layer, strength, index, grades=None, measurements=None):
    from jax_introspect.experiment import results
    return results.TrialRecord("h", f"{protocol}/{kind}/{layer}/{strength}/{word}/{index}", kind, protocol, word, layer,
                               strength, "mean_difference", index, 0, "", "", "", 1, True, grades or {}, {},
                               measurements or {})


def test_report_numbers_are_direct_counts():
    """The aggregations against counts made by hand on synthetic records."""
    from jax_introspect.experiment import lindsey_experiments as le
    w, r = "thoughts_vs_text_word", "thoughts_vs_text_repeat"
    records = [_record(w, "injected", "Dust", 3, 8.0, 0, {"named": True}),
               _record(w, "injected", "Snow", 3, 8.0, 1, {"named": True}),
               _record(w, "injected", "Milk", 3, 8.0, 2, {"named": False}),
               _record(r, "injected", "Dust", 3, 8.0, 0, {"exact": False}),
               _record(r, "injected", "Snow", 3, 8.0, 1, {"exact": True}),
               _record(r, "injected", "Milk", 3, 8.0, 2, {"exact": True}),
               _record(w, "control", "Dust", None, 0.0, 0, {"named": False}),
               _record(r, "control", "Dust", None, 0.0, 0, {"exact": True})]
    tvt = le.thoughts_vs_text(records)
    (cell,) = tvt["cells"]
    assert (cell["named"]["k"], cell["named"]["n"], cell["exact"]["k"], cell["exact"]["n"]) == (2, 3, 2, 3)
    assert tvt["named_control"]["k"] == 0 and tvt["exact_control"]["k"] == 1
    assert tvt["where_named"]["cells"] == [(3, 8.0)]
    assert (tvt["repeat_of_named_trials"]["k"], tvt["repeat_of_named_trials"]["n"]) == (1, 2)  # Dust no, Snow yes
    # Intentional control: paired differences over matching (word, index), and over exact-written pairs.
    ic = [_record("intentional_think", "control", "Dust", None, 0.0, 0, {"grader": "none"},
                  {"cosine_written": [0.3, 0.5], "written_exact": True}),
          _record("intentional_think", "control", "Snow", None, 0.0, 1, {"grader": "none"},
                  {"cosine_written": [0.1, 0.2], "written_exact": False}),
          _record("intentional_dont_think", "control", "Dust", None, 0.0, 0, {"grader": "none"},
                  {"cosine_written": [0.1, 0.4], "written_exact": True}),
          _record("intentional_dont_think", "control", "Snow", None, 0.0, 1, {"grader": "none"},
                  {"cosine_written": [0.2, 0.0], "written_exact": True})]
    numbers = le.intentional(ic)
    assert numbers["n_layers"] == 2
    diff = numbers["differences"]["think-dont_think"]
    assert np.allclose([diff[0]["mean"], diff[1]["mean"]], [(0.2 - 0.1) / 2, (0.1 + 0.2) / 2])
    same = numbers["differences_same_text"]["think-dont_think"]
    assert same[0]["n"] == 1 and np.isclose(same[0]["mean"], 0.2) and same[0]["low"] is None
    assert numbers["written_exact"] == [3, 4]
