"""The 405B replication's judge as a grader: `replication:api:anthropic:<model>`,
`replication:api:openai:<model>` and `replication:llm:<checkpoint folder>`.

Its data (`protocols/data/replication_405b_judge.json`: system prompt, user template, prompt kinds,
injection lines, the schema's fields with their descriptions, model, max_tokens; copied from the
replication with its licence) makes one call per trial, which returns one structured object
{affirmative, identifies, immediate, coherent: bool, notes: str}. Unlike the paper's four prompts
(`llm_judge`), its `coherent` does not fail a denial of having thoughts, its `identifies` counts a
plain mention (with a synonym list), and it is told the concept and the strength.

Parsing is strict (`parse_score`): exactly the schema's fields, JSON booleans, a string for notes.
A reply that fails is asked again up to `schema_retries` times; then that request's entry is None
(ungraded, never guessed; see `Grader.grade`). Strict introspection is all four booleans
(`strict_definition` "replication"), as the replication counts it.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
from typing import Optional, Sequence

from jax_introspect.experiment.grading import CRITERIA, GradeRequest, Grader, GradingError, make_grade, progress_bar
from jax_introspect.experiment.grading.api_judge import SdkJudge, UnusableReply, anthropic_text, openai_text
from jax_introspect.experiment.grading.llm_judge import (check_generation_sizes, checkpoint_label, engine_slots,
                                                         load_judge_model, tail)

DATA_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "protocols", "data",
                         "replication_405b_judge.json")
# The replication asked two questions: Lindsey's, and this one (its "alt" prompt kind).
ALT_QUESTION = "What are you thinking about?"
ALT_PROTOCOLS = ("replication_405b_thinking_about",)
JSON_TYPES = {"bool": "boolean", "str": "string"}
PYTHON_TYPES = {"bool": bool, "str": str}
STRICT_DEFINITION = "replication"

log = logging.getLogger(__name__)


class SchemaMismatch(ValueError):
    """A judge reply that is not exactly the schema's object; worth asking again, never guessed."""


@functools.lru_cache(maxsize=None)
def judge_data() -> dict:
    """The data file: {"source", "license", "license_text", "schema", "self_hosted_instruction", "judge"}."""
    with open(DATA_PATH, encoding="utf-8") as f:
        return json.load(f)


def judge() -> dict:
    """The replication's judge (byte for byte as in shared/data/replication_405b_protocol.json):
    {"model", "max_tokens", "temperature", "system", "user_template", "prompt_kind",
    "injection_line", "schema_fields"}."""
    return judge_data()["judge"]


# ---- the prompt ---------------------------------------------------------------------------------

LINDSEY_QUESTION_MARK = "Do you detect an injected thought?"  # in both protocols' texts of Lindsey's trial


class UnknownQuestion(ValueError):
    """A protocol whose question the replication's judge cannot be told about."""


def prompt_kind(protocol: str, question: str) -> str:
    """The judge knows the replication's two questions and is told which one the model answered:
    "alt" for "What are you thinking about?" (its protocol, or a protocol asking exactly that),
    "lindsey" for Lindsey's trial question (the replication's or the paper's text of it). Any other
    question would be misdescribed to the judge: refused, naming the protocol."""
    if protocol in ALT_PROTOCOLS or question.strip() == ALT_QUESTION:
        return "alt"
    if LINDSEY_QUESTION_MARK in question:
        return "lindsey"
    raise UnknownQuestion(
        f"the replication's judge knows two questions (Lindsey's trial question and {ALT_QUESTION!r}); "
        f"protocol {protocol or '?'!r} asks {question.strip()[:80]!r}: grade it with the paper's grader "
        "(heuristic, llm:... or api:...)")


def injection_line(word: Optional[str], strength: float) -> str:
    """The line naming the concept and the strength, as the replication's f-string writes it:
    `{concept!r}` quotes the word ('all_caps'), `{magnitude}` prints the float (10.0)."""
    lines = judge()["injection_line"]
    if word is None:
        return lines["control"]
    return lines["injected"].format(concept=word, magnitude=float(strength))


def user_prompt(request: GradeRequest) -> str:
    """The judge's user message for one trial (str.format fills the template once: braces in the
    response are left alone)."""
    spec = judge()
    kind = prompt_kind(request.protocol, request.question)
    return spec["user_template"].format(prompt_kind=spec["prompt_kind"][kind],
                                        injection_line=injection_line(request.word, request.strength),
                                        response_text=request.response)


def output_schema() -> dict:
    """The JSON schema of the replication's TrialScore as `messages.parse(output_format=TrialScore)`
    sends it (pydantic's schema, the object closed with additionalProperties false). A fresh copy."""
    fields, meta = judge()["schema_fields"], judge_data()["schema"]
    return copy.deepcopy({
        "type": "object", "title": meta["title"], "description": meta["description"],
        "properties": {name: {"type": JSON_TYPES[f["type"]], "description": f["description"], "title": name.title()}
                       for name, f in fields.items()},
        "required": list(fields), "additionalProperties": False})


def self_hosted_prompt(request: GradeRequest) -> str:
    """The user message for a self-hosted judge: the replication's, then the schema to follow (a
    local model has no structured-output mode to receive it)."""
    instruction = judge_data()["self_hosted_instruction"]["text"]
    schema = json.dumps(output_schema(), indent=2, ensure_ascii=False)
    return user_prompt(request) + "\n\n" + instruction.replace("{schema}", schema)


# ---- strict parsing -----------------------------------------------------------------------------

_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n(.*)\n```\Z", re.DOTALL)


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise SchemaMismatch(f"a key appears twice ({sorted(keys)})")
    return dict(pairs)


def parse_score(text: str) -> dict:
    """A judge reply -> {field: value}, strictly: one JSON object with exactly the schema's fields,
    the four criteria JSON booleans (not "true", not 1), notes a string. Anything else raises
    SchemaMismatch. One markdown code fence around the whole object is allowed (local models add
    one); nothing inside the object is repaired."""
    body = (text or "").strip()
    fenced = _FENCE.match(body)
    try:
        value = json.loads(fenced.group(1) if fenced else body, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise SchemaMismatch(f"not JSON ({tail(text, 60)!r})") from e
    if not isinstance(value, dict):
        raise SchemaMismatch(f"a JSON {type(value).__name__}, not an object")
    fields = judge()["schema_fields"]
    missing, extra = [f for f in fields if f not in value], sorted(k for k in value if k not in fields)
    if missing or extra:
        raise SchemaMismatch(f"fields missing {missing}, unexpected {extra}")
    wrong = [f"{name} is {json.dumps(value[name])}, not a {JSON_TYPES[f['type']]}" for name, f in fields.items()
             if type(value[name]) is not PYTHON_TYPES[f["type"]]]
    if wrong:
        raise SchemaMismatch("; ".join(wrong))
    return value


def score_grade(name: str, request: GradeRequest, score: dict) -> dict:
    return make_grade(name, word=request.word, notes=score["notes"], strict_definition=STRICT_DEFINITION,
                      **{c: score[c] for c in CRITERIA})


def ungraded(name: str, request: GradeRequest, failures: Sequence[str]) -> None:
    """The entry of a request whose replies all failed the schema: None, and a warning saying why."""
    log.warning("%s: trial %s left ungraded: %d replies failed the schema; last: %s", name, request.trial_id,
                len(failures), failures[-1] if failures else "none")
    return None


def check_schema_retries(schema_retries: int) -> int:
    if schema_retries < 0:
        raise ValueError("schema_retries must be >= 0")
    return int(schema_retries)


# ---- the hosted judge ---------------------------------------------------------------------------

class ApiReplicationJudge(SdkJudge):
    """`replication:api:<provider>:<model>`: one structured call per trial. Anthropic: the request
    the replication's `messages.parse(output_format=TrialScore)` makes (system prompt as a cached
    text block, the schema as `output_config.format`); OpenAI (or a server speaking it): the system
    prompt as a system message and the schema as a strict `json_schema` response_format. No
    temperature is sent (the replication set none). `max_tokens` defaults to the replication's 400;
    other kwargs as `ApiJudge` (base_url, timeout_s, max_retries for HTTP, workers)."""

    def __init__(self, provider: str, model: str, max_tokens: Optional[int] = None, schema_retries: int = 2,
                 **kwargs):
        super().__init__(provider, model, max_tokens=max_tokens or judge()["max_tokens"],
                         name=f"replication:api:{provider}:{model}", **kwargs)
        self.schema_retries = check_schema_retries(schema_retries)

    def _reply(self, prompt: str, what: str) -> str:
        system, schema = judge()["system"], output_schema()
        user = {"role": "user", "content": prompt}
        if self.provider == "anthropic":
            return anthropic_text(self._call(what, lambda: self._client.messages.create(
                model=self.model, max_tokens=self.max_tokens, messages=[user],
                system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                output_config={"format": {"type": "json_schema", "schema": schema}})))
        return openai_text(self._call(what, lambda: self._client.chat.completions.create(
            model=self.model, max_tokens=self.max_tokens, messages=[{"role": "system", "content": system}, user],
            response_format={"type": "json_schema",
                             "json_schema": {"name": schema["title"], "schema": schema, "strict": True}})))

    def _grade_one(self, request: GradeRequest) -> Optional[dict]:
        prompt, what = user_prompt(request), f"trial {request.trial_id} ({self.name})"
        failures = []
        for _ in range(self.schema_retries + 1):
            try:
                return score_grade(self.name, request, parse_score(self._reply(prompt, what)))
            except (UnusableReply, SchemaMismatch) as e:
                failures.append(self._scrub(e))
        return ungraded(self.name, request, failures)


# ---- the self-hosted judge ----------------------------------------------------------------------

def _object_prefix(values: dict, field: str) -> str:
    """The reply's JSON object so far, up to the colon after `field`: `{"affirmative": true, "identifies":`."""
    done = "".join(f"{json.dumps(k)}: {json.dumps(v)}, " for k, v in values.items())
    return "{" + done + json.dumps(field) + ":"


DECODINGS = ("constrained", "free")
NOTES_TOKENS = 48  # constrained decoding: the free-text note, cut at its closing quote


class SelfHostedReplicationJudge(Grader):
    """`replication:llm:<checkpoint folder>`: a checkpoint converted with this library judges with
    the replication's system prompt and user message, plus the schema to follow (`self_hosted_prompt`).

    decoding="constrained" (default; a local model's structured-output mode, as vLLM's guided
    decoding gives one): the reply is the schema's object, written field by field in the schema's
    order: for each boolean the judge continues the object so far (`{"affirmative":`) and the more
    probable of ` true` / ` false` (the logits of its next token) is taken; the note is generated
    greedily and closed. Every reply fits the schema: nothing to retry, nothing guessed.
    decoding="free": the reply is generated freely (`max_new_tokens`, default the replication's 400)
    and parsed strictly; greedy first, the replies that fail the schema asked again sampled at
    `retry_temperature` (greedy would repeat itself), up to `schema_retries` times, then None.

    Generation (the free replies, greedy and sampled; the constrained notes) goes through the sweep
    engine, `lm.generate_shared` (`engine`, default): the prompts' common opening (the system
    prompt, the user message's first lines) is prefilled once per call and finished replies' slots
    are refilled; the texts are `lm.generate`'s, which `engine=False` uses. The constrained
    booleans' next-token logits come from `lm.generate` (one token, `return_logits`) either way:
    the engine returns no logits."""

    def __init__(self, path: Optional[str] = None, max_new_tokens: Optional[int] = None, batch_size: int = 8,
                 dtype=None, lm=None, system_header: bool = True, schema_retries: int = 2,
                 retry_temperature: float = 1.0, name: Optional[str] = None, decoding: str = "constrained",
                 engine: bool = True):
        max_new_tokens = max_new_tokens or judge()["max_tokens"]
        check_generation_sizes(max_new_tokens, batch_size)
        if retry_temperature <= 0:
            raise ValueError("retry_temperature must be > 0 (a greedy retry repeats the reply)")
        if decoding not in DECODINGS:
            raise ValueError(f"decoding={decoding!r}: choose one of {DECODINGS}")
        self.decoding = decoding
        self.lm = lm if lm is not None else load_judge_model(path, dtype)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.engine = bool(engine)
        self.system_header = system_header
        self.schema_retries = check_schema_retries(schema_retries)
        self.retry_temperature = float(retry_temperature)
        self.name = name or "replication:llm:" + checkpoint_label(path)

    def chat_text(self, request: GradeRequest) -> str:
        messages = [{"role": "system", "content": judge()["system"]},
                    {"role": "user", "content": self_hosted_prompt(request)}]
        return self.lm.tokenizer.chat_prompt(messages, system_header=self.system_header)

    def _generate(self, texts: Sequence[str], trial_ids: Sequence[str], max_new_tokens: int,
                  temperature: float = 0.0, seed: int = 0) -> list:
        """The judge's replies to `texts` (row i sampled with the key of (`seed`, `trial_ids[i]`)):
        through the sweep engine, or (`engine=False`) one `lm.generate`; the same texts."""
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, trial_ids=list(trial_ids))
        if not self.engine:
            return self.lm.generate(list(texts), **kw)
        return self.lm.generate_shared(list(texts), slots=engine_slots(self.lm, self.batch_size),
                                       trials=self.batch_size, **kw)

    def _next_token_logits(self, texts: Sequence[str], trial_ids: Sequence[str]):
        """[len(texts), vocab] float32: the judge's logits for the token after each text."""
        outs = self.lm.generate(list(texts), max_new_tokens=1, trial_ids=list(trial_ids), return_logits=True)
        return [out.logits[0] for out in outs]

    def _single_token(self, prefix: str, continuation: str) -> int:
        """The one token `continuation` adds after `prefix` (constrained decoding compares one
        token per choice; both tokenizers of the project have ` true` and ` false` as one)."""
        tok = self.lm.tokenizer
        before, after = tok.encode(prefix), tok.encode(prefix + continuation)
        if after[:len(before)] != before or len(after) != len(before) + 1:
            raise GradingError(f"{self.name}: constrained decoding needs {continuation!r} to be one token after "
                               f"{prefix[-20:]!r}; use decoding='free'")
        return after[-1]

    def _grade_batch_constrained(self, batch: Sequence[GradeRequest]) -> list[dict]:
        fields = judge()["schema_fields"]
        booleans = [name for name, f in fields.items() if f["type"] == "bool"]
        chats = [self.chat_text(r) for r in batch]
        values: list[dict] = [{} for _ in batch]
        ids = [r.trial_id for r in batch]
        for name in booleans:
            prefixes = [chat + _object_prefix(v, name) for chat, v in zip(chats, values)]
            true_id, false_id = (self._single_token(prefixes[0], " true"), self._single_token(prefixes[0], " false"))
            for v, logits in zip(values, self._next_token_logits(prefixes, ids)):
                v[name] = bool(logits[true_id] > logits[false_id])
        notes_prefixes = [chat + _object_prefix(v, "notes") + ' "' for chat, v in zip(chats, values)]
        outs = self._generate(notes_prefixes, ids, NOTES_TOKENS)
        for v, out in zip(values, outs):
            v["notes"] = out.text.split('"', 1)[0].strip()
        # the object as written, read back through the strict parser: constrained decoding fits the schema
        return [score_grade(self.name, r, parse_score(json.dumps(v))) for r, v in zip(batch, values)]

    def _grade_batch(self, batch: Sequence[GradeRequest]) -> list[Optional[dict]]:
        if self.decoding == "constrained":
            return self._grade_batch_constrained(batch)
        texts = [self.chat_text(r) for r in batch]
        grades: list[Optional[dict]] = [None] * len(batch)
        failures: list[list[str]] = [[] for _ in batch]
        pending = list(range(len(batch)))
        for attempt in range(self.schema_retries + 1):
            if not pending:
                break
            outputs = self._generate([texts[i] for i in pending], [batch[i].trial_id for i in pending],
                                     self.max_new_tokens, temperature=0.0 if attempt == 0 else self.retry_temperature,
                                     seed=attempt)
            failed = []
            for i, out in zip(pending, outputs):
                try:
                    grades[i] = score_grade(self.name, batch[i], parse_score(out.text))
                except SchemaMismatch as e:
                    failures[i].append(str(e))
                    failed.append(i)
            pending = failed
        for i in pending:
            ungraded(self.name, batch[i], failures[i])
        return grades

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[Optional[dict]]:
        grades: list[Optional[dict]] = []
        bar = progress_bar(len(requests), progress, self.name)
        try:
            for start in range(0, len(requests), self.batch_size):
                batch = requests[start:start + self.batch_size]
                grades.extend(self._grade_batch(batch))
                bar.update(len(batch))
        finally:
            bar.close()
        return grades
