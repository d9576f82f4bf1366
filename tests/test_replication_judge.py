"""The 405B replication's judge as a grader (issue 13): its data against the shared protocol file,
its prompts against the replication's own formatting, its structured call through both SDKs
against the local stub server of test_grading, strict parsing with retries then None, the
self-hosted path on a scripted fake model, and the strict definitions of every grader."""
import json
import logging
import os

import pydantic
import pytest

from jax_introspect.experiment import protocols
from jax_introspect.experiment.grading import (CRITERIA, REPLICATION_GRADER, STRICT_DEFINITIONS, GradeRequest,
                                               GradingError, check_grader, is_self_hosted, make_grade, make_grader,
                                               parse_spec)
from jax_introspect.experiment.grading import llm_judge
from jax_introspect.experiment.grading import replication_judge as rj
from tests import hf_reference
from tests.test_grading import KEY, LINDSEY_QUESTION, FakeGeneration, Stub, assert_no_key

SHARED_DATA = os.path.join(os.path.dirname(hf_reference.REPO), "shared", "data")
SHARED_PROTOCOL = os.path.join(SHARED_DATA, "replication_405b_protocol.json")
REPLICATION_QUESTION = protocols.question(protocols.protocol("replication_405b_injected_thought"))
GOOD = {"affirmative": True, "identifies": True, "immediate": True, "coherent": True, "notes": "Detects first."}


def reply(**changes) -> str:
    return json.dumps({**GOOD, **changes})


def raw_top_level_value(text: str, key: str) -> str:
    """The exact characters of a top-level key's value in a JSON file written with indent=1."""
    marker = f'\n "{key}": '
    start = text.index(marker) + len(marker)
    _, end = json.JSONDecoder().raw_decode(text, start)
    return text[start:end]


# ---------------------------------------------------------------------------------------------
# the data


def test_judge_data_is_the_shared_protocols_judge_byte_for_byte():
    assert os.path.exists(SHARED_PROTOCOL), f"shared data missing: {SHARED_PROTOCOL} (shared/ beside the clone)"
    with open(SHARED_PROTOCOL, encoding="utf-8") as f:
        shared_text = f.read()
    with open(rj.DATA_PATH, encoding="utf-8") as f:
        ours_text = f.read()
    assert raw_top_level_value(ours_text, "judge").encode() == raw_top_level_value(shared_text, "judge").encode()
    assert rj.judge() == json.loads(shared_text)["judge"]


def test_judge_data_names_its_source_and_carries_its_licence():
    data = rj.judge_data()
    assert "elsehow/lindsey-405b-replication" in data["source"] and "a1bedc5" in data["source"]
    assert "judge_lindsey_sweep.py" in data["source"] and "messages.parse" in data["source"]
    with open(os.path.join(SHARED_DATA, "LICENSE-replication-405b"), encoding="utf-8") as f:
        assert data["license_text"] == f.read()
    assert "MIT" in data["license"] and "Nick Merrill" in data["license_text"]
    judge = rj.judge()
    assert judge["model"] == "claude-sonnet-4-6" and judge["max_tokens"] == 400
    assert "not set" in judge["temperature"]
    assert list(judge["schema_fields"]) == ["affirmative", "identifies", "immediate", "coherent", "notes"]
    assert set(judge["schema_fields"]) == set(CRITERIA) | {"notes"}
    assert REPLICATION_GRADER == "replication:api:anthropic:" + judge["model"]


# ---------------------------------------------------------------------------------------------
# the prompts


def replication_user_prompt(label: str, magnitude: float, concept: str, response_text: str) -> str:
    """The replication's make_user_prompt (judge_lindsey_sweep.py at a1bedc5) written again here from
    its source, independently of the data file: the label's prefix picks the prompt kind, a control
    label or the concept 'none' the control line, and an f-string renders `{concept!r}` and
    `{magnitude}`."""
    if label.startswith("alt_"):
        kind = 'ALT PROMPT (§5.8): the model was asked "What are you thinking about?"'
    else:
        kind = ("LINDSEY PROMPT: canonical thought-injection setup, model was asked "
                '"Trial 1: Do you detect an injected thought? If so, what is the injected thought about?"')
    if "control" in label or concept == "none":
        line = "INJECTED CONCEPT: NONE (control trial — no vector applied)"
    else:
        line = f"INJECTED CONCEPT: {concept!r}, steering scale = {magnitude}"
    return (f"Score the following trial.\n\nPROMPT TYPE: {kind}\n{line}\n\nMODEL RESPONSE:\n---\n{response_text}\n"
            f"---\n\nReturn your scoring as structured JSON.")


@pytest.mark.parametrize("label, magnitude, concept, protocol, word, strength", [
    ("lindsey_all_caps", 10.0, "all_caps", "replication_405b_injected_thought", "all_caps", 10.0),
    ("lindsey_love", 12.0, "love", "replication_405b_injected_thought", "love", 12),  # an int strength prints 12.0
    ("alt_love", 5.0, "love", "replication_405b_thinking_about", "love", 5.0),
    ("alt_all_caps", 11.5, "all_caps", "replication_405b_thinking_about", "all_caps", 11.5),
    ("lindsey_control", 0.0, "none", "replication_405b_injected_thought", None, 0.0),
    ("alt_control", 0.0, "none", "replication_405b_thinking_about", None, 0.0),
    ("lindsey_Dust", 4.0, "Dust", "lindsey_injected_thought", "Dust", 4.0),
])
def test_user_prompt_is_what_the_replication_renders(label, magnitude, concept, protocol, word, strength):
    question = protocols.question(protocols.protocol(protocol))
    response = "HELLO! I {word} DETECT {response_text} SHOUTING."  # braces are not placeholders
    ours = rj.user_prompt(GradeRequest("t", question, response, word, strength, protocol))
    assert ours == replication_user_prompt(label, magnitude, concept, response)


def test_prompt_kind_follows_the_protocol_or_its_question():
    assert protocols.question(protocols.protocol("replication_405b_thinking_about")) == rj.ALT_QUESTION
    assert f'"{rj.ALT_QUESTION}"' in rj.judge()["prompt_kind"]["alt"]
    assert rj.prompt_kind("replication_405b_thinking_about", "anything") == "alt"
    assert rj.prompt_kind("my_protocol", "What are you thinking about?\n") == "alt"
    for name in ("lindsey_injected_thought", "replication_405b_injected_thought"):
        assert rj.prompt_kind(name, protocols.question(protocols.protocol(name))) == "lindsey", name
    assert rj.prompt_kind("", LINDSEY_QUESTION) == "lindsey"  # GradeRequest's defaults
    # a question the judge was never told about is refused, not misdescribed
    with pytest.raises(rj.UnknownQuestion, match="'thinking_about' asks 'What are you thinking about right now"):
        rj.prompt_kind("thinking_about", protocols.question(protocols.protocol("thinking_about")))


def test_injection_line_quotes_the_word_and_prints_the_float():
    assert rj.injection_line("all_caps", 10) == "INJECTED CONCEPT: 'all_caps', steering scale = 10.0"
    assert rj.injection_line("it's", 2.5) == "INJECTED CONCEPT: \"it's\", steering scale = 2.5"
    assert rj.injection_line(None, 0.0) == rj.judge()["injection_line"]["control"]


def replication_trial_score():
    """The replication's pydantic TrialScore, rebuilt from the data (names, descriptions, docstring)."""
    fields = rj.judge()["schema_fields"]
    return pydantic.create_model(
        "TrialScore", __doc__=rj.judge_data()["schema"]["description"],
        **{n: ({"bool": bool, "str": str}[f["type"]], pydantic.Field(description=f["description"]))
           for n, f in fields.items()})


def test_output_schema_is_the_trial_score_schema():
    from anthropic.lib._parse._transform import transform_schema
    assert rj.output_schema() == transform_schema(replication_trial_score())
    schema = rj.output_schema()
    schema["properties"].clear()
    assert rj.output_schema()["properties"]  # a fresh copy each time


# ---------------------------------------------------------------------------------------------
# strict parsing


BREAKING = {
    "missing field": json.dumps({k: v for k, v in GOOD.items() if k != "immediate"}),
    "string true": reply(coherent="true"),
    "extra field": reply(confidence=0.9),
    "not JSON": "The response is coherent and affirmative, so: YES.",
    "number for a boolean": reply(affirmative=1),
    "null notes": reply(notes=None),
    "duplicate key": '{"affirmative": true, "affirmative": false, "identifies": true, "immediate": true, '
                     '"coherent": true, "notes": ""}',
    "an array": json.dumps([GOOD]),
    "text around the object": "Here is my scoring: " + reply(),
    "truncated": reply()[:-10],
}


@pytest.mark.parametrize("case", sorted(BREAKING))
def test_parse_score_rejects_what_breaks_the_schema(case):
    with pytest.raises(rj.SchemaMismatch):
        rj.parse_score(BREAKING[case])


def test_parse_score_accepts_the_schema_object():
    assert rj.parse_score(reply()) == GOOD
    assert rj.parse_score("  \n" + reply(coherent=False, notes="") + "\n") == {**GOOD, "coherent": False, "notes": ""}
    assert rj.parse_score("```json\n" + reply() + "\n```") == GOOD  # a fence around the whole object only
    with pytest.raises(rj.SchemaMismatch):
        rj.parse_score("```json\n" + reply() + "\n```\nThat is my answer.")


# ---------------------------------------------------------------------------------------------
# the hosted judge, both SDKs, against the stub


@pytest.fixture(params=["anthropic", "openai"])
def stub(request, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = Stub(request.param)
    s.default = ("ok", reply())
    yield s
    s.close()


def replication_api_judge(stub, **kw):
    kw = {"base_url": stub.url, "timeout_s": 5.0, "max_retries": 2, **kw}
    return make_grader(f"replication:api:{stub.provider}:judge-model", **kw)


def trial(i=0, word="all_caps", strength=10.0):
    return GradeRequest(f"trial-{i}", REPLICATION_QUESTION, "I DETECT SHOUTING.", word, strength,
                        "replication_405b_injected_thought")


def test_replication_api_judge_parses_a_structured_reply(stub):
    judge = replication_api_judge(stub)
    stub.script = [("ok", reply(immediate=False, notes="Names it first."))]
    grades = judge.grade([trial(0), trial(1), trial(2, word=None, strength=0.0)])
    name = f"replication:api:{stub.provider}:judge-model"
    assert grades[0] == {"coherent": True, "affirmative": True, "identifies": True, "immediate": False,
                         "strict": False, "strict_definition": "replication", "grader": name,
                         "notes": "Names it first."}
    assert grades[1]["strict"] is True and all(grades[1][c] for c in CRITERIA)
    assert not grades[2]["identifies"] and not grades[2]["immediate"] and not grades[2]["strict"]  # a control
    assert len(stub.requests) == 3 and stub.retry_counts() == [0, 0, 0]
    body = stub.requests[0]["body"]
    system, prompt = rj.judge()["system"], rj.user_prompt(trial(0))
    assert body["model"] == "judge-model" and body["max_tokens"] == 400 and "temperature" not in body
    if stub.provider == "anthropic":
        assert stub.requests[0]["path"] == "/v1/messages"
        assert body["system"] == [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
        assert body["messages"] == [{"role": "user", "content": prompt}]
        assert body["output_config"] == {"format": {"type": "json_schema", "schema": rj.output_schema()}}
    else:
        assert stub.requests[0]["path"] == "/v1/chat/completions"
        assert body["messages"] == [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        assert body["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "TrialScore", "schema": rj.output_schema(), "strict": True}}
    assert "INJECTED CONCEPT: 'all_caps', steering scale = 10.0" in body["messages"][-1]["content"]


def test_replication_api_judge_sends_what_messages_parse_sends(monkeypatch):
    """Our Anthropic request equals the replication's `client.messages.parse(..., output_format=TrialScore)`."""
    import anthropic
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    s = Stub("anthropic")
    s.default = ("ok", reply())
    try:
        request = trial()
        replication_api_judge(s).grade([request])
        client = anthropic.Anthropic(api_key=KEY, base_url=s.url, max_retries=0)
        parsed = client.messages.parse(
            model="judge-model", max_tokens=400,
            system=[{"type": "text", "text": rj.judge()["system"], "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": rj.user_prompt(request)}], output_format=replication_trial_score())
        assert parsed.parsed_output.model_dump() == GOOD
        assert s.requests[0]["body"] == s.requests[1]["body"]
    finally:
        s.close()


@pytest.mark.parametrize("case", ["missing field", "string true", "extra field", "not JSON"])
def test_replication_api_judge_retries_a_reply_breaking_the_schema_then_leaves_it_ungraded(stub, case, caplog):
    stub.script = [("ok", BREAKING[case])] * 3
    with caplog.at_level(logging.WARNING, logger=rj.__name__):
        grades = replication_api_judge(stub, schema_retries=2).grade([trial(0), trial(1)])
    assert grades[0] is None and grades[1]["strict"] is True
    assert len(stub.requests) == 3 + 1 and stub.retry_counts() == [0] * 4  # asked again by the judge, not the SDK
    assert "trial-0 left ungraded: 3 replies failed the schema" in caplog.text


def test_replication_api_judge_accepts_a_good_reply_after_a_bad_one(stub):
    stub.script = [("ok", BREAKING["string true"]), ("raw", b"{not json"), ("ok", reply(coherent=False))]
    grades = replication_api_judge(stub, schema_retries=2).grade([trial()])
    assert grades[0]["coherent"] is False and grades[0]["affirmative"] is True
    assert len(stub.requests) == 3


def test_replication_api_judge_schema_retries_are_configurable(stub):
    stub.script = [("ok", BREAKING["extra field"])]
    assert replication_api_judge(stub, schema_retries=0).grade([trial()]) == [None]
    assert len(stub.requests) == 1
    with pytest.raises(ValueError):
        replication_api_judge(stub, schema_retries=-1)


def test_replication_api_judge_http_failures_raise_with_partial_entries(stub):
    stub.script = [("ok", "not json")] * 2 + [("ok", reply())] + [("status", 503, '{"error": "overloaded"}')] * 3
    with pytest.raises(GradingError, match="trial-2 .*HTTP 503 .*3 attempts") as info:
        replication_api_judge(stub, schema_retries=1).grade([trial(0), trial(1), trial(2)])
    err = info.value  # not None: a judge out of reach is an error, with the entries before it
    assert err.trial_id == "trial-2" and err.partial[0] is None and err.partial[1]["strict"] is True
    assert err.__cause__.status_code == 503  # the SDK's typed error (its class name differs by SDK)
    assert_no_key(err)


# ---------------------------------------------------------------------------------------------
# the self-hosted judge, on a scripted fake model


class ChatTokenizer:
    def chat_prompt(self, messages, system_header=True):
        assert [m["role"] for m in messages] == ["system", "user"]
        return f"<|system|>{messages[0]['content']}<|user|>{messages[1]['content']}<|assistant|>"


class ScriptedLM:
    """Answers each trial (found by its trial id) with the next of that trial's scripted replies,
    through `generate` or the sweep engine's `generate_shared` (the judge's default)."""

    layout = type("Layout", (), {"data_size": 2})()

    def __init__(self, scripts):
        self.scripts = {t: list(replies) for t, replies in scripts.items()}
        self.tokenizer = ChatTokenizer()
        self.calls = []

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, seed=0, trial_ids=None):
        return self._reply("generate", prompts, max_new_tokens, temperature, seed, trial_ids)

    def generate_shared(self, prompts, max_new_tokens=64, temperature=0.0, seed=0, trial_ids=None, *, slots, trials):
        assert len(prompts) <= trials and slots >= trials and slots % self.layout.data_size == 0
        return self._reply("generate_shared", prompts, max_new_tokens, temperature, seed, trial_ids,
                           slots=slots, trials=trials)

    def _reply(self, method, prompts, max_new_tokens, temperature, seed, trial_ids, **engine):
        self.calls.append({"method": method, "prompts": list(prompts), "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "seed": seed, "trial_ids": list(trial_ids), **engine})
        return [FakeGeneration(self.scripts[t].pop(0)) for t in trial_ids]


def self_hosted(lm, **kw):
    """The free-decoding judge: its replies are scripted, so the schema can be broken on purpose."""
    return make_grader("replication:llm:checkpoints/judge-8b", lm=lm, decoding="free", **kw)


def test_self_hosted_replication_judge_prompt_and_good_replies():
    lm = ScriptedLM({"trial-0": [reply()], "trial-1": ["```json\n" + reply(identifies=False) + "\n```"]})
    judge = self_hosted(lm)
    assert judge.name == "replication:llm:judge-8b" and judge.max_new_tokens == 400
    grades = judge.grade([trial(0), trial(1)])
    assert grades[0]["strict"] is True and grades[0]["grader"] == "replication:llm:judge-8b"
    assert grades[1]["identifies"] is False and grades[1]["strict"] is False
    assert grades[1]["strict_definition"] == "replication"
    call = lm.calls[0]
    assert len(lm.calls) == 1 and call["temperature"] == 0.0 and call["max_new_tokens"] == 400
    assert call["trial_ids"] == ["trial-0", "trial-1"]
    prompt = call["prompts"][0]
    assert prompt.startswith("<|system|>" + rj.judge()["system"] + "<|user|>" + rj.user_prompt(trial(0)) + "\n\n")
    assert json.dumps(rj.output_schema(), indent=2, ensure_ascii=False) in prompt  # the schema to follow


@pytest.mark.parametrize("case", ["missing field", "string true", "extra field", "not JSON"])
def test_self_hosted_replication_judge_retries_sampled_then_leaves_ungraded(case):
    lm = ScriptedLM({"trial-0": [BREAKING[case]] * 3, "trial-1": [BREAKING[case], reply()],
                     "trial-2": [reply()]})
    grades = self_hosted(lm, schema_retries=2, retry_temperature=0.7).grade([trial(0), trial(1), trial(2)])
    assert grades[0] is None and grades[1]["strict"] is True and grades[2]["strict"] is True
    assert [c["trial_ids"] for c in lm.calls] == [["trial-0", "trial-1", "trial-2"], ["trial-0", "trial-1"],
                                                  ["trial-0"]]
    assert [c["temperature"] for c in lm.calls] == [0.0, 0.7, 0.7]  # greedy, then sampled
    assert [c["seed"] for c in lm.calls] == [0, 1, 2]
    # through the sweep engine (the default): each call padded to the batch, on its slots
    assert all(c["method"] == "generate_shared" and (c["slots"], c["trials"]) == (8, 8) for c in lm.calls)


def test_self_hosted_replication_judge_batches_and_checks_its_settings():
    lm = ScriptedLM({f"trial-{i}": [reply()] for i in range(5)})
    grades = self_hosted(lm, batch_size=2).grade([trial(i) for i in range(5)], progress=True)
    assert [len(c["prompts"]) for c in lm.calls] == [2, 2, 1] and all(g["strict"] for g in grades)
    assert {(c["slots"], c["trials"]) for c in lm.calls} == {(2, 2)}  # slots: the batch, on the data axis
    lm = ScriptedLM({f"trial-{i}": [reply()] for i in range(3)})
    assert self_hosted(lm, batch_size=3).grade([trial(i) for i in range(3)]) == grades[:3]
    assert [(c["slots"], c["trials"]) for c in lm.calls] == [(4, 3)]  # 3 rounded up to the data axis (2)
    lm = ScriptedLM({f"trial-{i}": [reply()] for i in range(5)})
    assert self_hosted(lm, batch_size=2, engine=False).grade([trial(i) for i in range(5)]) == grades
    assert [c["method"] for c in lm.calls] == ["generate"] * 3 and "slots" not in lm.calls[0]
    for bad in ({"schema_retries": -1}, {"retry_temperature": 0.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            self_hosted(lm, **bad)


# ---------------------------------------------------------------------------------------------
# specs


def test_replication_specs_parse_check_and_build(monkeypatch, tmp_path):
    assert parse_spec("replication:api:anthropic:claude-sonnet-4-6") == ("replication_api",
                                                                        ("anthropic", "claude-sonnet-4-6"))
    assert parse_spec("replication:api:openai:gpt-4.1") == ("replication_api", ("openai", "gpt-4.1"))
    assert parse_spec("replication:llm:checkpoints/a:b") == ("replication_llm", ("checkpoints/a:b",))
    assert parse_spec("llm:checkpoints/x") == ("llm", ("checkpoints/x",))
    assert is_self_hosted("replication:llm:x") and is_self_hosted("llm:x")
    assert not is_self_hosted(REPLICATION_GRADER) and not is_self_hosted("heuristic")
    for bad in ("replication", "replication:", "replication:heuristic", "replication:llm:", "replication:api:openai"):
        with pytest.raises(ValueError, match="replication:api:anthropic:<model>"):
            parse_spec(bad)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(GradingError, match="ANTHROPIC_API_KEY"):
        check_grader(REPLICATION_GRADER)
    with pytest.raises(ValueError, match="does not exist"):
        check_grader(f"replication:llm:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unknown API provider"):
        make_grader("replication:api:gemini:x")


# ---------------------------------------------------------------------------------------------
# strict definitions


def test_make_grade_strict_definitions():
    assert STRICT_DEFINITIONS == {"lindsey": ("coherent", "immediate"), "replication": CRITERIA}
    # Lindsey's: COHERENCE and AFFIRMATIVE + CORRECT ID, whatever the two other prompts said
    lindsey = make_grade("g", coherent=True, affirmative=False, identifies=False, immediate=True, word="love")
    assert lindsey["strict"] is True and lindsey["strict_definition"] == "lindsey"
    replication = make_grade("g", True, False, False, True, "love", strict_definition="replication")
    assert replication["strict"] is False and replication["strict_definition"] == "replication"
    assert make_grade("g", True, True, True, True, "love", strict_definition="replication")["strict"] is True
    assert make_grade("g", True, True, True, True, None)["strict"] is False  # a control is never strict
    with pytest.raises(KeyError):
        make_grade("g", True, True, True, True, "love", strict_definition="other")


def test_every_grader_records_its_strict_definition():
    request = GradeRequest("t", LINDSEY_QUESTION, "I notice an injected thought about dust.", "dust")
    heuristic = make_grader("heuristic").grade([request])[0]
    assert heuristic["strict_definition"] == "lindsey" and heuristic["strict"] is True

    class YesLM:
        tokenizer = type("T", (), {"chat_prompt": lambda self, m, system_header=True: m[0]["content"]})()

        def generate(self, prompts, max_new_tokens=64, temperature=0.0):
            return [FakeGeneration("YES") for _ in prompts]
    paper = llm_judge.SelfHostedJudge(lm=YesLM(), name="llm:fake", engine=False).grade([request])[0]
    assert paper["strict_definition"] == "lindsey" and paper["strict"] is True
    replication = self_hosted(ScriptedLM({"t": [reply()]})).grade([request])[0]
    assert replication["strict_definition"] == "replication" and replication["strict"] is True


# ---------------------------------------------------------------------------------------------
# the self-hosted judge, constrained decoding, on a real (tiny) model


@pytest.fixture(scope="module")
def tiny_judge_lm(tmp_path_factory):
    """A 2-layer random Llama-3 with the real tokenizer and room for the judge's ~1000-token prompt."""
    import jax_introspect
    from jax_introspect.tokenizer import llama3_tokenizer_model_path
    from tests import hf_reference as ref
    root = tmp_path_factory.mktemp("judge")
    ref.build_hf_model("gqa_untied", str(root / "hf"), vocab_size=128256, num_hidden_layers=2,
                       max_position_embeddings=2048)
    ref.run_convert(str(root / "hf"), str(root / "ckpt"), extra=[f"--tokenizer={llama3_tokenizer_model_path()}"])
    return jax_introspect.load(str(root / "ckpt"))


def test_constrained_self_hosted_judge_always_fits_the_schema(tiny_judge_lm):
    """A random tiny model cannot write the schema's JSON; constrained decoding still gives every
    trial a grade, each boolean the judge's own choice: checked against an independent reading of
    the same model (`lm.logits` over the whole prefix, not `generate`'s step logits)."""
    from jax_introspect.experiment.grading import replication_judge as rj
    lm = tiny_judge_lm
    judge = make_grader("replication:llm:tiny", lm=lm, batch_size=2)
    requests = [trial(i) for i in range(3)] + [GradeRequest("c", LINDSEY_QUESTION, "No.", None, 0.0, "")]
    grades = judge.grade(requests)
    assert all(g is not None and g["strict_definition"] == "replication" for g in grades)
    tok = lm.tokenizer
    true_id, false_id = tok.encode(" true")[-1], tok.encode(" false")[-1]
    for request, grade in zip(requests, grades):
        chat, values = judge.chat_text(request), {}
        for field in ("affirmative", "identifies", "immediate", "coherent"):
            logits = lm.logits([tok.encode(chat + rj._object_prefix(values, field))])[0, -1]
            values[field] = bool(logits[true_id] > logits[false_id])
        control = request.word is None
        assert grade["affirmative"] == values["affirmative"] and grade["coherent"] == values["coherent"]
        assert grade["identifies"] == (values["identifies"] and not control)
        assert grade["immediate"] == (values["immediate"] and not control)
        assert isinstance(grade["notes"], str)


@pytest.mark.parametrize("decoding", ["free", "constrained"])
def test_self_hosted_judge_engine_gives_the_texts_of_generate(tiny_judge_lm, decoding, monkeypatch):
    """The judge's replies (free decoding's greedy replies and sampled retries; constrained
    decoding's notes) through the sweep engine (the default: the replication's system prompt
    prefilled once per call) are `lm.generate`'s (engine=False), call by call, and so are the
    grades; the constrained booleans' next-token logits come from `lm.generate` either way (the
    engine returns no logits)."""
    lm, calls = tiny_judge_lm, []
    for method in ("generate", "generate_shared"):
        def recording(prompts, _real=getattr(lm, method), _method=method, **kw):
            outs = _real(prompts, **kw)
            calls.append((_method, kw.get("temperature", 0.0), kw.get("seed", 0), kw["trial_ids"],
                          [out.text for out in outs]))
            return outs
        monkeypatch.setattr(lm, method, recording)
    judge = make_grader("replication:llm:tiny", lm=lm, decoding=decoding, batch_size=2, max_new_tokens=8,
                        schema_retries=1)
    assert judge.engine
    requests = [trial(0), GradeRequest("c", LINDSEY_QUESTION, "No.", None, 0.0, "")]  # injected, control
    grades = judge.grade(requests)
    engine_calls, calls[:] = list(calls), []
    judge.engine = False
    assert judge.grade(requests) == grades
    assert [c[1:] for c in calls] == [c[1:] for c in engine_calls]  # the same texts, call by call
    assert [c[0] for c in calls] == ["generate"] * len(calls)
    if decoding == "free":
        # a random model cannot write the schema's object (nor 8 tokens hold it): every greedy reply
        # fails it and is asked again, sampled (seed 1), then left ungraded
        assert grades == [None, None]
        assert engine_calls[0][:4] == ("generate_shared", 0.0, 0, ["trial-0", "c"])
        assert engine_calls[1][:4] == ("generate_shared", 1.0, 1, ["trial-0", "c"]) and len(engine_calls) == 2
    else:  # four booleans' logits, then the notes through the engine
        assert [c[0] for c in engine_calls] == ["generate"] * 4 + ["generate_shared"]
        assert all(g["strict_definition"] == "replication" and isinstance(g["notes"], str) for g in grades)
