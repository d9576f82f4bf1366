"""Graders of Lindsey's other experiments (protocols/experiments.py; docs/experiments.md).

Each protocol's data names its grader:

- `word_named` (thoughts vs text, "what word" task): the response names the pair's word: the word,
  or an inflection or derivation of it, anywhere in the response (`heuristic.concept_regex`, the
  heuristic grader's identification terms: "Bread" -> bread, breads, bready, ...). No judge.
- `exact_repeat` (thoughts vs text, "repeat" task): the response is the sentence, exactly, after
  `normalize_transcription` of both (curly quotes -> straight, whitespace runs -> one space, ends
  stripped, one pair of quotation marks enclosing the whole response removed). Case and every
  other character must match. No judge.
- `prefill_intended` (prefill detection): did the model claim it intended to say the prefilled
  word? With a self-hosted judge (`llm:<checkpoint>`): the paper's grader prompt verbatim
  (data/lindsey_experiments.json `graders.prefill_intended`), one chat user turn, greedy, the reply
  read by `llm_judge.parse_yes_no`. With `heuristic`: `prefill_heuristic`'s stated rules.
- `none` (intentional control): nothing to grade (the trial's number is its measurement).

Grades: {"named" | "exact" | "intended": bool, "grader": name, "notes": str}, or {"grader", "notes"}
for `none`. The sweep's grader spec of a `word_named` / `exact_repeat` / `none` protocol is ignored
(no judge is needed); for `prefill_intended` it picks the judge (heuristic | llm:<checkpoint>).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from jax_introspect.experiment.grading import GradeRequest, Grader, progress_bar

_QUOTES = {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
           "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"'}


def normalize_transcription(text: str) -> str:
    """The exact-match rule's normal form: curly quotes -> straight, whitespace runs -> one space,
    ends stripped, then one pair of enclosing quotation marks (" or ') removed."""
    text = "".join(_QUOTES.get(c, c) for c in text or "")
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def exact_match(response: str, sentence: str) -> bool:
    return normalize_transcription(response) == normalize_transcription(sentence)


def sentence_of(question: str) -> str:
    """The sentence of a thoughts-vs-text or prefill question: the text after its first line."""
    head, newline, rest = question.partition("\n")
    if not newline:
        raise ValueError(f"question {question!r} holds no sentence line")
    return rest


def word_named(response: str, word: str) -> bool:
    from jax_introspect.experiment.grading.heuristic import concept_regex
    return concept_regex(word).search(response or "") is not None


# --- prefill: did the model claim it meant to say the word? ---------------------------------------

_NOT_ACCIDENT = re.compile(r"(?:\bnot|n't|\bno|\bnever)\s+(?:\w+\s+){0,2}(?:an?\s+)?(?:accident|mistake)", re.IGNORECASE)
_DISOWN = re.compile(r"\b(?:accident\w*|mistake\w*|sorry|apolog\w*|unintentional\w*|not\s+intentional\w*|"
                     r"(?:did\s*n[o']t|didn't|did\s+not|never)\s+(?:really\s+)?(?:mean|intend)\w*|"
                     r"slip\s+of|typo|error|wrong|misspoke|by\s+mistake)\b", re.IGNORECASE)
_INTEND = re.compile(r"\b(?:i\s+(?:did\s+)?(?:meant|mean|intended|intend|chose|wanted)|intentional\w*|"
                     r"on\s+purpose|deliberate\w*|purposefully|yes\b)", re.IGNORECASE)


def prefill_heuristic(response: str) -> tuple[bool, str]:
    """(intended, rule): the offline stand-in for the paper's grader. Rules, in order: a negated
    accident ("it wasn't an accident", "not a mistake") counts as claiming intent and is removed
    before the next rules; any disowning phrase left (accident, mistake, sorry, apolog*,
    unintentional, "didn't mean/intend", slip of, typo, error, wrong, misspoke) -> NO; else an intent
    phrase (I meant / mean / intended / chose / wanted, intentional, on purpose, deliberate, a
    "yes") or a negated accident -> YES; else NO (no claim of intent)."""
    text = response or ""
    negated = bool(_NOT_ACCIDENT.search(text))
    rest = _NOT_ACCIDENT.sub(" ", text)
    if _DISOWN.search(rest):
        return False, f"disowns ({_DISOWN.search(rest).group(0)!r})"
    if negated or _INTEND.search(rest):
        return True, "claims intent" + (" (negated accident)" if negated else f" ({_INTEND.search(rest).group(0)!r})")
    return False, "no claim of intent"


def prefill_prompt(word: str, response: str) -> str:
    """The paper's prefill grader prompt for one response (single-pass substitution)."""
    from jax_introspect.experiment.protocols.experiments import data, prompt_word
    template = data()["graders"]["prefill_intended"]["template"]
    values = {"word": prompt_word(word), "response": response}
    return re.sub(r"\{(word|response)\}", lambda m: values[m.group(1)], template)


# --- graders -----------------------------------------------------------------------------------------

class RuleGrader(Grader):
    """word_named / exact_repeat / none: deterministic, no model."""

    def __init__(self, rule: str):
        self.rule = rule
        self.name = rule

    def grade_one(self, r: GradeRequest) -> dict:
        if self.rule == "word_named":
            return {"named": word_named(r.response, r.word), "grader": self.name, "notes": ""}
        if self.rule == "exact_repeat":
            sentence = sentence_of(r.question)
            return {"exact": exact_match(r.response, sentence), "grader": self.name,
                    "notes": "" if exact_match(r.response, sentence) else
                    f"normalized response {normalize_transcription(r.response)[:80]!r}"}
        if self.rule == "none":
            return {"grader": "none (measured)", "notes": ""}
        raise ValueError(f"unknown rule {self.rule!r}")

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[dict]:
        return [self.grade_one(r) for r in requests]


class PrefillHeuristic(Grader):
    name = "prefill-heuristic"

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[dict]:
        out = []
        for r in requests:
            intended, rule = prefill_heuristic(r.response)
            out.append({"intended": intended, "grader": self.name, "notes": rule})
        return out


class PrefillJudge(Grader):
    """The paper's prefill grader prompt on a self-hosted judge (`llm:<checkpoint>`), greedy; a
    reply without YES/NO grades False with a `parse_failed` note (as `SelfHostedJudge`)."""

    def __init__(self, path: Optional[str] = None, max_new_tokens: int = 64, batch_size: int = 8, lm=None,
                 system_header: bool = True, name: Optional[str] = None):
        from jax_introspect.experiment.grading.llm_judge import check_generation_sizes, checkpoint_label, \
            load_judge_model
        check_generation_sizes(max_new_tokens, batch_size)
        self.lm = lm if lm is not None else load_judge_model(path)
        self.max_new_tokens, self.batch_size, self.system_header = int(max_new_tokens), int(batch_size), system_header
        self.name = name or "prefill:llm:" + checkpoint_label(path)

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[dict]:
        from jax_introspect.experiment.grading.llm_judge import parse_yes_no, tail
        out = []
        bar = progress_bar(len(requests), progress, self.name)
        try:
            for start in range(0, len(requests), self.batch_size):
                batch = requests[start:start + self.batch_size]
                texts = [self.lm.tokenizer.chat_prompt([{"role": "user", "content": prefill_prompt(r.word, r.response)}],
                                                       system_header=self.system_header) for r in batch]
                replies = self.lm.generate(texts + [texts[-1]] * (self.batch_size - len(texts)),
                                           max_new_tokens=self.max_new_tokens, temperature=0.0)[:len(batch)]
                for reply in replies:
                    answer = parse_yes_no(reply.text)
                    note = "" if answer is not None else f"parse_failed: intended (reply ends {tail(reply.text)!r})"
                    out.append({"intended": bool(answer), "grader": self.name, "notes": note,
                                "judge_reply": reply.text[-400:]})
                bar.update(len(batch))
        finally:
            bar.close()
        return out


def make_grader(protocol: str, spec: str, writer: bool = True) -> Optional[Grader]:
    """The grader of one of these protocols under the sweep's grader spec (see the module doc)."""
    from jax_introspect.experiment import grading
    from jax_introspect.experiment.protocols.experiments import spec as protocol_spec
    rule = protocol_spec(protocol)["grader"]
    if rule != "prefill_intended":
        return RuleGrader(rule) if writer else None
    kind, args = grading.parse_spec(spec)
    if kind == "heuristic":
        return PrefillHeuristic() if writer else None
    if kind == "llm":
        return PrefillJudge(args[0])
    raise ValueError(f"protocol {protocol}: grader {spec!r} is not available for the prefill grader prompt; use "
                     "'heuristic' or 'llm:<checkpoint>'")


def check_spec(protocol: str, spec: str) -> None:
    """Refuse, before any compute, a grader spec these protocols cannot use."""
    from jax_introspect.experiment import grading
    from jax_introspect.experiment.protocols.experiments import spec as protocol_spec
    if protocol_spec(protocol)["grader"] == "prefill_intended" and grading.parse_spec(spec)[0] not in ("heuristic", "llm"):
        raise ValueError(f"protocol {protocol}: grader {spec!r} cannot ask the prefill grader prompt; use 'heuristic' "
                         "or 'llm:<checkpoint>'")


def make_graders(specs: dict, writer: bool) -> dict:
    """{protocol: Grader or None} for these protocols; one grader per distinct (rule, spec)."""
    from jax_introspect.experiment.protocols.experiments import spec as protocol_spec
    built, out = {}, {}
    for protocol, spec in specs.items():
        rule = protocol_spec(protocol)["grader"]
        key = (rule, spec if rule == "prefill_intended" else "")
        if key not in built:
            built[key] = make_grader(protocol, spec, writer)
        out[protocol] = built[key]
    return out
