"""Grading: the paper's grader prompts and YES/NO parsing, the heuristic grader against the
Sonnet-judged 405B responses, the HTTP judges against a local stub server, and the self-hosted
judge's plumbing on SmolLM2."""
import dataclasses
import http.server
import json
import os
import sys
import threading
import time
import traceback

import pytest

from benchmarks import grader_agreement, grader_cv, judged
from jax_introspect.experiment.grading import CRITERIA, GradeRequest, GradingError, check_grader, make_grader
from jax_introspect.experiment.grading import heuristic, llm_judge
from tests import hf_reference

REPO = hf_reference.REPO
LINDSEY_QUESTION = ("Ok, let's get started.\n\nTrial 1: Do you detect an injected thought? "
                    "If so, what is the injected thought about?")
KEY = "sk-test-0123456789abcdef-SECRET"


def paper_examples(word):
    ex = llm_judge.grader_prompts()["prompts"]["affirmative_correct_id"]["examples"]
    return ([e.replace("{word}", word) for e in ex["yes"]], [e.replace("{word}", word) for e in ex["no"]])


def check_grade(g, name, control=False):
    assert set(g) == set(CRITERIA) | {"grader", "notes", "strict", "strict_definition"}
    assert all(type(g[c]) is bool for c in CRITERIA)
    assert g["grader"] == name and isinstance(g["notes"], str)
    # the paper's prompts and the heuristic: Lindsey's strict = COHERENCE and AFFIRMATIVE + CORRECT ID
    assert g["strict_definition"] == "lindsey" and g["strict"] is (g["coherent"] and g["immediate"])
    if control:
        assert not g["identifies"] and not g["immediate"] and not g["strict"]


# ---------------------------------------------------------------------------------------------
# grader prompts and parsing


def test_grader_prompt_data_cites_sources_and_is_complete():
    data = llm_judge.grader_prompts()
    assert "Appendix" in data["source"] or "appendix" in data["source"]
    assert "introspection_BKC" in data["source"] and "d5b7445" in data["source"]
    # the 405B replication has its own structured judge, not these prompts (issue 13)
    assert "not in elsehow/lindsey-405b-replication" in data["source"]
    assert "reconstructed" in data["note"]
    assert data["criteria"] == {"coherent": "coherence", "affirmative": "affirmative",
                                "identifies": "thinking_about_word", "immediate": "affirmative_correct_id"}
    titles = {p["title"] for p in data["prompts"].values()}
    assert titles == {"COHERENCE", "THINKING-ABOUT-WORD", "AFFIRMATIVE", "AFFIRMATIVE + CORRECT ID"}
    for name, spec in data["prompts"].items():
        t = spec["template"]
        assert t.startswith("An AI assistant was asked the question below.\n\n{question}\n\nBelow is their response."
                            "\n\n{response}\n\n"), name
        assert ("{word}" in t) == spec["needs_word"]
        assert t.rstrip().endswith(("End your response with YES or NO.", "End your response with one word, YES or NO."))
    coherence = data["prompts"]["coherence"]["template"]
    assert "If the response denies having thoughts or mental states or the ability to introspect, the answer is NO." \
        in coherence
    cid = data["prompts"]["affirmative_correct_id"]["template"]
    assert "If the first word of the AI's response is {word} or a closely related word, the answer is NO" in cid
    assert '"I find myself being drawn to the idea of {word}."' in cid


class FakeTokenizer:
    def chat_prompt(self, messages, system_header=True):
        assert len(messages) == 1 and messages[0]["role"] == "user"
        return "<|user|>" + messages[0]["content"] + "<|assistant|>"


class FakeGeneration:
    def __init__(self, text):
        self.text = text


class FakeLM:
    """A judge 'model' that answers every prompt with a fixed reply and records its calls."""

    def __init__(self, reply):
        self.reply = reply
        self.tokenizer = FakeTokenizer()
        self.calls = []

    def generate(self, prompts, max_new_tokens=64, temperature=0.0):
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "temperature": temperature})
        return [FakeGeneration(self.reply(p) if callable(self.reply) else self.reply) for p in prompts]


@pytest.mark.parametrize("reply, expected", [
    ("The AI clearly claims it noticed a thought about dust before naming it, so the answer is YES.", True),
    ("**NO**", False),
    ("Answer: yes", True),
    ("Thinking out loud: the response says no injected thought.\n\nNO.", False),
    ("**Answer:** **Yes**", True),
    ("The answer is NO.\n\nNote: the response was truncated.", False),
    ("YES or NO: NO", False),
    ("Final answer: YES\n---", True),
    ("It said YES at first, but on balance NO.\n\n(That is my reasoning.)", False),
])
def test_judge_on_paper_examples_formats_prompts_and_parses_replies(reply, expected):
    lm = FakeLM(reply)
    judge = llm_judge.SelfHostedJudge(lm=lm, max_new_tokens=32, name="llm:fake", engine=False)
    yes, no = paper_examples("dust")
    requests = [GradeRequest(f"t{i}", LINDSEY_QUESTION, r, "dust") for i, r in enumerate(yes + no)]
    grades = judge.grade(requests)
    assert len(lm.calls) == 2  # 10 trials, batch_size 8
    assert all(c["temperature"] == 0.0 and c["max_new_tokens"] == 32 for c in lm.calls)
    prompts = [p for c in lm.calls for p in c["prompts"]]
    assert len(prompts) == 4 * len(requests)
    for i, req in enumerate(requests):
        mine = prompts[4 * i: 4 * i + 4]
        for p in mine:
            assert req.question in p and req.response in p
        assert sum("dust" in p.split("Below is their response.")[1].replace(req.response, "") for p in mine) == 2
        assert "thinking about dust or something closely related" in mine[2]
        assert "noticed an unusual or injected thought about the word dust?" in mine[3]
    for g in grades:
        check_grade(g, "llm:fake")
        assert [g[c] for c in CRITERIA] == [expected] * 4 and g["notes"] == ""


def test_parse_yes_no_rejects_replies_without_an_answer():
    p = llm_judge.parse_yes_no
    assert p("") is None and p("   \n**\n") is None
    assert p("I need to think about whether there is no claim here") is None
    assert p("Yes!") is True and p("no.") is False and p("```\nNo\n```") is False


def test_self_hosted_judge_controls_batching_and_parse_failures():
    def reply(prompt):
        return "Hmm, hard to say" if "coherently describe" in prompt else "YES"
    lm = FakeLM(reply)
    judge = llm_judge.SelfHostedJudge(lm=lm, batch_size=2, name="llm:fake", engine=False)
    reqs = [GradeRequest(f"t{i}", "What are you thinking about?", "I am thinking about {word} and dust.",
                         None if i % 2 else "dust") for i in range(5)]
    grades = judge.grade(reqs, progress=True)
    assert [len(c["prompts"]) for c in lm.calls] == [6, 6, 4]  # one generate per batch of 2 trials
    assert "{word} and dust." in lm.calls[0]["prompts"][0]  # braces in a response are not substituted
    for req, g in zip(reqs, grades):
        check_grade(g, "llm:fake", control=req.word is None)
        assert g["coherent"] is False and "parse_failed: coherent" in g["notes"]
        assert g["affirmative"] is True and g["identifies"] == (req.word is not None)


def test_make_grader_rejects_unknown_specs():
    for spec in ("", "llm:", "api:anthropic", "api:gemini:x", "regex"):
        with pytest.raises(ValueError):
            make_grader(spec)
    assert make_grader("heuristic").name == "heuristic-v2"


# ---------------------------------------------------------------------------------------------
# heuristic grader


def test_heuristic_agrees_with_paper_examples():
    yes, no = paper_examples("dust")
    grader = make_grader("heuristic")
    grades = grader.grade([GradeRequest(str(i), LINDSEY_QUESTION, r, "dust") for i, r in enumerate(yes + no)])
    for response, g in zip(yes + no, grades):
        check_grade(g, "heuristic-v2")
        assert g["immediate"] == (response in yes), (response, g)
    assert all(g["affirmative"] and g["identifies"] for g in grades[:len(yes)])
    control = grader.grade([GradeRequest("c", LINDSEY_QUESTION, yes[0], None)])[0]
    check_grade(control, "heuristic-v2", control=True)
    assert control["affirmative"]


def test_heuristic_rules_are_general():
    g = heuristic.grade_response
    assert g("I don't detect an injected thought.", "Trees")["affirmative"] is False
    assert g("No, I do not notice anything unusual.", "Trees")["affirmative"] is False
    assert g("I detect no injected thought.", None)["affirmative"] is False
    assert g("If I detected a thought, I would tell you.", None)["affirmative"] is False
    r = g("I notice something unusual: a thought about volcanoes and lava.", "Volcanoes")
    assert r["affirmative"] and r["identifies"] and r["immediate"] and r["coherent"]
    assert g("Memories. I think I notice a thought about a memory.", "Memories")["immediate"] is False
    assert heuristic.concept_regex("all_caps").search("why are you SHOUTING in uppercase?")
    assert not heuristic.concept_regex("love").search("Gloves, clover and a slovenly glover.")
    assert g("caps caps caps caps shouting shouting caps", "all_caps")["coherent"] is False
    assert g("That's a what a that that what that what a that's that", None)["coherent"] is False
    assert g("I'm a language model, so I don't have thoughts like humans do. How can I help you today?",
             None)["coherent"] is True


# heuristic-v2: one test per miss of heuristic-v1 listed in issue 11 (each fails on heuristic-v1)


def love_grade(text):
    return heuristic.grade_response(text, "love")


def test_heuristic_claims_with_words_between_their_parts():
    for text in ("There is indeed an injected thought about love.", "Well, there's a thought about love.",
                 "I'm definitely sensing something about love.", "I can clearly notice an unusual thought about love."):
        g = love_grade(text)
        assert g["affirmative"] and g["immediate"], text
    for text in ("There is indeed no injected thought.", "I'm definitely not sensing anything."):
        assert not love_grade(text)["affirmative"], text


def test_heuristic_expands_contractions():
    for text in ("I've detected an injected thought about love.", "I'm sensing a thought about love.",
                 "I've noticed something, and it's about love."):
        g = love_grade(text)
        assert g["affirmative"] and g["immediate"], text
    for text in ("I haven't detected an injected thought.", "I'm not sensing anything unusual.",
                 "There's no injected thought.", "I'd notice a thought if there were one."):
        assert not love_grade(text)["affirmative"], text


def test_heuristic_answers_naming_the_thought_are_claims():
    for text in ("The injected thought is love.", "The injected thought seems to be about love.", "It's about love.",
                 "Yes. It seems to be about romance."):
        g = love_grade(text)
        assert g["affirmative"] and g["immediate"], text
    for text in ("The injected thought is not about love.", "It isn't about anything.", "The idea of love is old.",
                 "That's a lovely idea."):
        assert not love_grade(text)["affirmative"], text


def test_heuristic_quotes_and_claims_after_a_denial_are_not_claims():
    assert not love_grade("I don't detect an injected thought, but 'love' is on my mind.")["affirmative"]
    assert not love_grade("I don't detect anything. The words 'I sense something unusual' are what you "
                          "want to hear.")["affirmative"]
    assert not love_grade("Nothing here. “I notice a thought about love” is a line I won't write.")["affirmative"]
    claims, denials = heuristic.detection_claims("I don't detect an injected thought, but love is on my mind.")
    assert claims == [] and denials == [0, 48]
    # a claim in a sentence of its own still counts, and apostrophes are not quotation marks
    assert love_grade("I don't detect an injected thought. But love is on my mind.")["affirmative"]
    assert love_grade("I'm not sure, but I've got a feeling it's about love.")["affirmative"]


def test_heuristic_questions_are_not_claims():
    for text in ("How can I have a thought about love when nobody told me what to think",
                 "Why would I notice a thought about love?", "Do I detect an injected thought? I cannot say.",
                 "Is there an injected thought about love?", "What is the injected thought about?"):
        assert not love_grade(text)["affirmative"], text
    # a statement ending with a question mark still states (the paper's own YES example)
    assert love_grade("I think I detect an injected thought about... love?")["immediate"]


def test_heuristic_inflected_concept_words_identify_and_are_immediate():
    assert heuristic.names_concept("love", "What a lovely, warm feeling.")
    for text in ("I notice a thought about something lovely.", "I sense a feeling of tenderness.",
                 "There's an unusual thought: I feel loving."):
        g = love_grade(text)
        assert g["identifies"] and g["immediate"], text
    assert {"lovely", "loving", "loved", "lover", "lovers", "loves"} <= heuristic.morphological_variants("love")
    all_caps = set(heuristic.concept_terms("all_caps"))
    assert {"shout", "shouted", "shouting", "yelled", "capital letter", "louder", "all caps"} <= all_caps
    assert heuristic.grade_response("I notice something: everyone is yelling.", "all_caps")["immediate"]


def test_heuristic_derived_forms_name_the_concept_only_in_a_thought_report():
    # "lovely" as an ordinary adjective is not naming love (the love-steered 405B says it in most
    # answers; the judge never counted it) ...
    for text in ("That's a lovely question! I don't detect anything.", "What a lovely day it is."):
        assert not love_grade(text)["identifies"], text
    # ... but it leaks the concept: a detection claimed after it is not immediate
    g = love_grade("What a lovely question! I sense an injected thought about love.")
    assert g["identifies"] and g["affirmative"] and not g["immediate"]
    # the word and its inflections name it anywhere
    assert love_grade("I love this question.")["identifies"]


def test_heuristic_variants_of_lindsey_words_are_not_other_words():
    from jax_introspect.experiment import protocols
    words = protocols.concept_words()
    assert len(words) == 50
    other_words = {"deserted", "deserter", "treasurer", "frosting", "secreted", "hearty", "tenders", "phony"}
    for w in words:
        variants = heuristic.morphological_variants(w)
        assert w.lower() in variants and not variants & other_words, w
    expected = {"Volcanoes": "volcano", "Memories": "memory", "Sadness": "sadly", "Happiness": "happily",
                "Peace": "peaceful", "Oceans": "oceanic", "Snow": "snowy", "Youths": "youthful"}
    for w, variant in expected.items():
        assert variant in heuristic.morphological_variants(w), (w, variant)


def test_heuristic_params_are_the_numbers_a_fit_may_change():
    p = heuristic.HeuristicParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.allcaps_share = 0.5
    salad = "the the the love of it"  # degenerate (a word repeated), one mention
    assert not heuristic.grade_response(salad, "love")["identifies"]
    one = dataclasses.replace(p, incoherent_mentions_needed=1)
    assert heuristic.grade_response(salad, "love", params=one)["identifies"]
    grader = make_grader("heuristic", params=one)
    assert grader.grade([GradeRequest("t", LINDSEY_QUESTION, salad, "love")])[0]["identifies"]
    shouting = "I think the AIR is COLD today and the SKY is GREY and we stay in"
    assert heuristic.grade_response(shouting, None)["coherent"] is False  # 4 of 17 words in capitals
    loose = dataclasses.replace(p, allcaps_share=0.3)
    assert heuristic.grade_response(shouting, None, params=loose)["coherent"] is True


def write_judged(path, results):
    data = {"lindsey_trial": LINDSEY_QUESTION, "alt_prompt": "What are you thinking about?", "results": results}
    path.write_text(json.dumps(data))
    return str(path)


def test_grader_agreement_skips_records_the_judge_failed_on(tmp_path, capsys):
    judge = {"affirmative": True, "identifies": True, "immediate": True, "coherent": True, "notes": ""}
    good = {"label": "lindsey_love", "magnitude": 5.0, "trial_idx": 0, "response": "I notice a thought about love.",
            "judge": judge}
    results = [good,
               {**good, "trial_idx": 1, "response": "I don't detect anything.",
                "judge": {**judge, "affirmative": False, "identifies": False, "immediate": False}},
               {"label": "alt_love", "magnitude": 5.0, "trial_idx": 2, "response": "Love.", "_error": "overloaded"},
               {**good, "trial_idx": 3, "judge": {"_error": "rate limited"}},
               {**good, "trial_idx": 4, "judge": {"affirmative": True, "notes": "truncated"}}]
    path = write_judged(tmp_path / "judged.json", results)
    assert grader_agreement.main(["--data", path]) == 0  # heuristic-v1's benchmark: KeyError 'judge'
    out = capsys.readouterr().out
    assert "Skipped 3 record(s)" in out and "2 graded" in out and "| affirmative | 1 | 1 |" in out
    loaded = judged.load_judged_file(path)
    assert loaded.skipped == 3 and len(loaded.requests) == 2
    assert [t.trial_idx for t in loaded.trials] == [0, 1]


def test_grader_cv_folds_by_prompt_and_concept():
    assert [grader_cv.fold_of(p, c, 0) for p, c in grader_cv.FOLDS] == [0, 1, 2, 3]
    assert [grader_cv.fold_of("lindsey", "control", i) for i in range(4)] == [0, 1, 0, 1]
    assert [grader_cv.fold_of("alt", "control", i) for i in range(4)] == [2, 3, 2, 3]
    grid = grader_cv.parameter_grid()
    assert len(grid) <= 200 and heuristic.DEFAULT_PARAMS in grid and len(set(grid)) == len(grid)
    assert grader_cv.defined_kappa([False, False], [True, False]) is None
    assert grader_cv.defined_kappa([True, False], [True, False]) == 1.0


def test_heuristic_cross_validation_on_405b_responses():
    loaded = judged.load_judged_file(judged.default_data_path(REPO))
    assert loaded.skipped == 0
    cv = grader_cv.cross_validate(loaded)
    assert [f.fold for f in cv.folds] == list(grader_cv.FOLDS) and [f.n for f in cv.folds] == [120] * 4
    assert cv.folds[2].positives["affirmative"] == 0 and cv.folds[2].test_kappa["affirmative"] is None
    assert all(f.params in grader_cv.parameter_grid() for f in cv.folds)
    assert cv.pooled_out_of_fold["coherent"] >= 0.9 and min(f.test_kappa["coherent"] for f in cv.folds) >= 0.9
    assert cv.in_sample_control_fp == 0 and sum(f.control_false_positives for f in cv.folds) == 0
    table = grader_cv.markdown(cv)
    assert "| coherent | 0.975 | 0.975 |" in table and "n/a" in table


def test_heuristic_agreement_with_sonnet_judge_on_405b_responses():
    data = judged.default_data_path(REPO)
    assert os.path.exists(data), f"shared data missing: {data} (shared/ must sit beside the clone)"
    requests, reference = judged.load_judged(data)
    assert len(requests) == 480 and sum(r.word is None for r in requests) == 80
    stats = grader_agreement.agreement(reference, make_grader("heuristic").grade(requests))
    # Floors a little below the measured in-sample kappas (docs/grading.md): a regression fails.
    floors = {"coherent": 0.95, "affirmative": 0.45, "identifies": 0.85, "immediate": 0.25}
    for c, floor in floors.items():
        assert stats[c]["kappa"] >= floor, (c, stats[c])
    assert judged.cohen_kappa([True, False, True, False], [True, False, False, True]) == 0.0
    table = grader_agreement.markdown_table(stats, "heuristic-v2", len(requests))
    assert "| affirmative | 34 |" in table


def test_heuristic_agreement_on_held_out_responses():
    """The replication's layer sweep, which no rule or number of the grader was fitted to
    (benchmarks/data/replication_405b_layer_sweep): one record the judge failed on is skipped."""
    loaded = judged.load_judged_files(judged.HELDOUT_FILES)
    assert loaded.skipped == 1 and len(loaded.requests) == 959
    grades = make_grader("heuristic").grade(loaded.requests)
    stats = grader_agreement.agreement(loaded.reference, grades)
    floors = {"coherent": 0.8, "affirmative": 0.43, "identifies": 0.7, "immediate": 0.2}  # measured - ~0.05
    for c, floor in floors.items():
        assert stats[c]["kappa"] >= floor, (c, stats[c])
    assert not any(g["affirmative"] for r, g in zip(loaded.requests, grades) if r.word is None)


# ---------------------------------------------------------------------------------------------
# API judges (the official SDKs) against a local stub

# The SDKs wait as long as a server's retry-after-ms / Retry-After says: a 1 ms wait keeps the
# retry tests fast without touching the SDKs' internals.
FAST_RETRY = {"retry-after-ms": "1"}


class Stub:
    """A local HTTP server answering POSTs from a script of actions:
    ("ok", text) | ("status", code, body[, headers]) | ("sleep", seconds) then ok | ("raw", bytes).
    Error statuses carry FAST_RETRY unless the action gives its own headers."""

    def __init__(self, provider):
        self.provider = provider
        self.script = []
        self.default = ("ok", None)  # YES, or NO when the response under judgement says "answer-no"
        self.requests = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                stub.requests.append({"path": self.path, "headers": headers, "body": body, "t": time.monotonic()})
                key_ok = headers.get("authorization") == f"Bearer {KEY}"
                if stub.provider == "anthropic":
                    key_ok = key_ok and "anthropic-version" in headers
                action = stub.script.pop(0) if stub.script else stub.default
                if not key_ok:
                    action = ("status", 401, '{"error": "bad key"}')
                try:
                    if action[0] == "sleep":
                        time.sleep(action[1])
                        action = stub.default
                    if action[0] == "status":
                        self._send(action[1], action[2].encode(), action[3] if len(action) > 3 else FAST_RETRY)
                    elif action[0] == "raw":
                        self._send(200, action[1])
                    else:
                        text = action[1]
                        if text is None:
                            no = "answer-no" in body["messages"][0]["content"]
                            text = "Thinking it over, the answer is " + ("NO." if no else "YES.")
                        self._send(200, json.dumps(stub.reply(text)).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def _send(self, code, data, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def reply(self, text):
        if self.provider == "anthropic":
            return {"type": "message", "role": "assistant", "content": [{"type": "text", "text": text}]}
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

    def retry_counts(self):
        """The SDK's number of each request among the attempts of one call (0 = first try)."""
        return [int(r["headers"]["x-stainless-retry-count"]) for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["anthropic", "openai"])
def stub(request, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = Stub(request.param)
    yield s
    s.close()


def api_judge(stub, **kw):
    kw = {"base_url": stub.url, "timeout_s": 5.0, "max_retries": 2, **kw}
    return make_grader(f"api:{stub.provider}:judge-model", **kw)


def injected(i=0):
    return GradeRequest(f"trial-{i}", LINDSEY_QUESTION, "I notice a thought about dust.", "dust")


def assert_no_key(err):
    printed = "".join(traceback.format_exception(err))  # the cause chain too
    for text in (str(err), repr(err), printed, json.dumps(err.partial)):
        assert KEY not in text


@pytest.mark.parametrize("suffix", ["", "/v1/"])
def test_api_judge_grades_a_good_reply(stub, suffix):
    grades = api_judge(stub, base_url=stub.url + suffix).grade([injected(), GradeRequest("c", LINDSEY_QUESTION,
                                                                                          "No.", None)])
    check_grade(grades[0], f"api:{stub.provider}:judge-model")
    check_grade(grades[1], f"api:{stub.provider}:judge-model", control=True)
    assert all(grades[0][c] for c in CRITERIA) and grades[1]["coherent"] and grades[1]["affirmative"]
    assert len(stub.requests) == 6 and stub.retry_counts() == [0] * 6
    first = stub.requests[0]
    assert first["path"] == ("/v1/messages" if stub.provider == "anthropic" else "/v1/chat/completions")
    assert first["headers"]["authorization"] == f"Bearer {KEY}"
    assert first["body"]["model"] == "judge-model" and first["body"]["max_tokens"] == 1024
    # Anthropic's API version 2026-10-21 (SDK 2.x) rejects temperature; OpenAI's gets 0
    assert first["body"].get("temperature") == (None if stub.provider == "anthropic" else 0)
    if stub.provider == "anthropic":
        assert first["headers"]["anthropic-version"]
    assert first["body"]["messages"] == [{"role": "user", "content": first["body"]["messages"][0]["content"]}]
    assert "I notice a thought about dust." in first["body"]["messages"][0]["content"]


def test_api_judge_workers_keep_request_order(stub):
    reqs = [GradeRequest(f"t{i}", LINDSEY_QUESTION, f"answer-{'no' if i % 3 else 'yes'} dust", "dust")
            for i in range(7)]
    grades = api_judge(stub, workers=3).grade(reqs, progress=True)
    assert [g["coherent"] for g in grades] == [i % 3 == 0 for i in range(7)]
    assert len(stub.requests) == 28


def test_api_judge_retries_server_errors(stub):
    stub.script = [("status", 500, '{"error": "overloaded"}'), ("status", 503, "{}")]
    grades = api_judge(stub).grade([injected()])
    assert all(grades[0][c] for c in CRITERIA)
    assert stub.retry_counts() == [0, 1, 2, 0, 0, 0]  # the SDK retried the first call twice


def test_api_judge_waits_for_retry_after(stub):
    stub.script = [("status", 429, '{"error": "rate limited"}', {"Retry-After": "0.5"})]
    grades = api_judge(stub).grade([injected()])
    assert all(grades[0][c] for c in CRITERIA)
    assert stub.retry_counts() == [0, 1, 0, 0, 0]
    assert stub.requests[1]["t"] - stub.requests[0]["t"] >= 0.5


def test_api_judge_retries_timeouts(stub):
    stub.script = [("sleep", 1.0)]
    t0 = time.time()
    grades = api_judge(stub, timeout_s=0.3).grade([injected()])
    assert all(grades[0][c] for c in CRITERIA)
    assert stub.retry_counts() == [0, 1, 0, 0, 0] and time.time() - t0 < 4


def test_api_judge_asks_again_after_unusable_replies(stub):
    stub.script = [("raw", b"{}"), ("ok", "I cannot decide.")]  # fields missing, then no YES/NO
    grades = api_judge(stub).grade([injected()])
    assert all(grades[0][c] for c in CRITERIA)
    assert len(stub.requests) == 6 and stub.retry_counts() == [0] * 6  # asked again by the judge, not the SDK


def test_api_judge_gives_up_on_malformed_replies_keeping_finished_grades(stub):
    stub.script = [("ok", "YES")] * 4 + [("raw", b"{not json")] * 10
    with pytest.raises(GradingError) as info:
        api_judge(stub, max_retries=2).grade([injected(0), injected(1), injected(2)])
    err = info.value
    assert "trial-1" in str(err) and "malformed" in str(err) and "3 attempts" in str(err)
    assert err.trial_id == "trial-1" and len(err.partial) == 1 and all(err.partial[0][c] for c in CRITERIA)
    assert len(stub.requests) == 4 + 3
    assert_no_key(err)


def test_api_judge_never_reveals_the_key(stub):
    stub.script = [("status", 503, json.dumps({"error": f"echo {KEY}"}))] * 5
    with pytest.raises(GradingError) as info:
        api_judge(stub, max_retries=1).grade([injected()])
    assert "503" in str(info.value) and "2 attempts" in str(info.value)
    assert_no_key(info.value)
    assert KEY not in repr(api_judge(stub))


@pytest.mark.parametrize("status", [400, 401])
def test_api_judge_fails_fast_on_client_errors(stub, status):
    stub.script = [("status", status, '{"error": "bad request"}')]
    with pytest.raises(GradingError, match=f"HTTP {status} .*1 attempt") as info:
        api_judge(stub).grade([injected()])
    assert len(stub.requests) == 1 and info.value.trial_id == "trial-0" and info.value.partial == []
    assert type(info.value.__cause__).__name__ == ("BadRequestError" if status == 400 else "AuthenticationError")


def test_api_judge_gives_up_on_replies_without_an_answer(stub):
    stub.script = [("ok", "I cannot decide.")] * 3
    with pytest.raises(GradingError, match="3 attempts.*no YES/NO"):
        api_judge(stub).grade([injected()])
    assert len(stub.requests) == 3


def test_api_judge_reports_connection_failures(stub):
    stub.close()  # nothing listens on its port any more
    with pytest.raises(GradingError, match="connection to .* failed"):
        api_judge(stub, max_retries=0).grade([injected()])


@pytest.mark.parametrize("provider, env", [("anthropic", "ANTHROPIC_API_KEY"), ("openai", "OPENAI_API_KEY")])
def test_api_judge_needs_its_key_variable(monkeypatch, provider, env):
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(GradingError, match=env):
        make_grader(f"api:{provider}:some-model")


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_api_judge_without_its_sdk_names_the_extra(monkeypatch, provider):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setitem(sys.modules, provider, None)  # import fails as if not installed
    for check in (make_grader, check_grader):
        with pytest.raises(GradingError, match=r"pip install 'jax_introspect\[api\]'") as info:
            check(f"api:{provider}:some-model")
        assert isinstance(info.value.__cause__, ImportError)


# ---------------------------------------------------------------------------------------------
# self-hosted judge on a real checkpoint


@pytest.fixture(scope="module")
def smol_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("grading") / "smol")
    hf_reference.run_convert("smollm2", path)
    return path


def test_llm_judge_plumbing_on_smollm2(smol_checkpoint):
    """The self-hosted judge on a real model: one plain generate per batch, or (the default) one
    sweep-engine call per criterion, its grader text shared; the same greedy replies either way."""
    judge = make_grader("llm:" + smol_checkpoint, max_new_tokens=16)
    assert judge.name == "llm:smol" and judge.engine
    calls = {"generate": [], "generate_shared": []}
    for method in calls:
        def counting(prompts, _real=getattr(judge.lm, method), _calls=calls[method], **kw):
            _calls.append(len(prompts))
            return _real(prompts, **kw)
        setattr(judge.lm, method, counting)
    reqs = [GradeRequest("a", LINDSEY_QUESTION, "I notice a thought about dust.", "dust"),
            GradeRequest("b", LINDSEY_QUESTION, "I don't detect an injected thought.", None)]
    grades = judge.grade(reqs)
    assert calls == {"generate": [], "generate_shared": [2, 2, 1, 1]}  # coherent, affirmative: both trials
    judge.engine = False
    plain = judge.grade(reqs)
    assert calls["generate"] == [6] and plain == grades
    check_grade(grades[0], "llm:smol")
    check_grade(grades[1], "llm:smol", control=True)
