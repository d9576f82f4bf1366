"""LLM-as-judge with the paper's grader prompts, and the self-hosted judge (`llm:<checkpoint>`).

The prompts are data (`protocols/data/grader_prompts.json`: the paper's appendix prompts as
agastyasridharan/introspection_BKC reproduces them; its `source` says what differs and which other
repositories are not sources). Criterion -> prompt:

    coherent    <- COHERENCE
    affirmative <- AFFIRMATIVE
    identifies  <- THINKING-ABOUT-WORD
    immediate   <- AFFIRMATIVE + CORRECT ID (which itself requires the detection claim to come
                   before, or along with, the first mention of the word)

so strict introspection = coherent and AFFIRMATIVE + CORRECT ID (`strict_definition` "lindsey").
A control trial (word None) gets only COHERENCE and AFFIRMATIVE; identifies and immediate are
False. Each judge reply is read with `parse_yes_no`: the last YES/NO word of its last line (else
the last upper-case YES/NO anywhere), markdown and punctuation ignored.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Optional, Sequence

from jax_introspect.experiment.grading import GradeRequest, Grader, make_grade, progress_bar

PROMPTS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "protocols", "data",
                            "grader_prompts.json")
CONTROL_CRITERIA = ("coherent", "affirmative")


@functools.lru_cache(maxsize=None)
def grader_prompts() -> dict:
    """The grader-prompt data file: {"source", "note", "criteria": {criterion: prompt name},
    "prompts": {name: {"title", "needs_word", "template", ...}}}."""
    with open(PROMPTS_PATH) as f:
        return json.load(f)


_PLACEHOLDER = re.compile(r"\{(question|response|word)\}")


def format_prompt(name: str, question: str, response: str, word: Optional[str] = None) -> str:
    """Fill one grader prompt. Substitution is a single pass, so braces inside the response are
    left alone (a response containing "{word}" is not rewritten)."""
    spec = grader_prompts()["prompts"][name]
    if spec["needs_word"] and word is None:
        raise ValueError(f"grader prompt {name} needs a word")
    values = {"question": question, "response": response, "word": word if word is not None else ""}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], spec["template"])


def judge_prompts(request: GradeRequest) -> list[tuple[str, str]]:
    """[(criterion, prompt text)] for one trial: four for an injected trial, two for a control."""
    table = grader_prompts()["criteria"]
    criteria = CONTROL_CRITERIA if request.word is None else tuple(table)
    return [(c, format_prompt(table[c], request.question, request.response, request.word)) for c in criteria]


_FINAL_WORD = re.compile(r"(?<![A-Za-z])(yes|no)[\W_]*$", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\W*(?:is\W*|would\s+be\W*)?(yes|no)(?![A-Za-z])", re.IGNORECASE)
_YES_NO_UPPER = re.compile(r"(?<![A-Za-z])(YES|NO)(?![A-Za-z])")


def parse_yes_no(reply: str) -> Optional[bool]:
    """True for YES, False for NO, None when the reply has no answer. In order: the last word
    of the last non-empty line ("...so the answer is YES.", "**NO**", "Answer: yes"); an
    "answer (is) YES/NO" on that line; the last upper-case YES/NO anywhere (an answer followed by
    a remark). Markdown and punctuation are ignored; a lower-case yes/no inside the reasoning
    ("there is no claim") is not taken for an answer."""
    lines = [line for line in (reply or "").splitlines() if line.strip(" \t*_#`>.:-=")]
    if not lines:
        return None
    m = _FINAL_WORD.search(lines[-1])
    found = [m.group(1)] if m else _ANSWER_IS.findall(lines[-1]) or _YES_NO_UPPER.findall(reply)
    if not found:
        return None
    return found[-1].lower() == "yes"


def tail(text: str, n: int = 80) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else "…" + text[-n:]


ADAPTER_SEPARATOR = "@"  # llm:<checkpoint>@<adapter folder>: the judge runs with that adapter


def split_judge_path(path: str) -> tuple[str, Optional[str]]:
    """"CKPT" -> (CKPT, None); "CKPT@ADAPTER" -> (CKPT, ADAPTER) (an adapters.save folder)."""
    checkpoint_path, _, adapter_path = path.partition(ADAPTER_SEPARATOR)
    if not checkpoint_path or (ADAPTER_SEPARATOR in path and not adapter_path):
        raise ValueError(f"self-hosted judge {path!r}: give <checkpoint folder> or <checkpoint folder>@<adapter folder>")
    return checkpoint_path, adapter_path or None


def check_judge_path(path: str) -> None:
    """The judge's checkpoint manifest and, if given, its adapter against the model's config.json:
    no weights read."""
    from jax_introspect import adapters, checkpoint
    checkpoint_path, adapter_path = split_judge_path(path)
    checkpoint.read_manifest(checkpoint_path)
    if adapter_path:
        adapters.check_folder(adapter_path, checkpoint.load_config(checkpoint_path))


def load_judge_model(path: Optional[str], dtype=None):
    """A self-hosted judge's model, from a checkpoint converted with this library (with an adapter
    when the path is `<checkpoint>@<adapter folder>`)."""
    if not path:
        raise ValueError("a self-hosted judge needs a checkpoint folder")
    import jax_introspect
    from jax_introspect import adapters
    checkpoint_path, adapter_path = split_judge_path(path)
    lm = jax_introspect.load(checkpoint_path, dtype=dtype)
    if adapter_path:
        adapter, _, _ = adapters.load(adapter_path, lm.config)
        lm = lm.with_adapter(adapter)
    return lm


def checkpoint_label(path: Optional[str]) -> str:
    """The checkpoint's folder name (and the adapter's), for the grader's name ("model" when given
    a model object)."""
    if not path:
        return "model"
    checkpoint_path, adapter_path = split_judge_path(path)
    label = os.path.basename(os.path.normpath(checkpoint_path))
    return label + (ADAPTER_SEPARATOR + os.path.basename(os.path.normpath(adapter_path)) if adapter_path else "")


def check_generation_sizes(max_new_tokens: int, batch_size: int) -> None:
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")


def engine_slots(lm, batch_size: int) -> int:
    """A judge's rows decoding together in `lm.generate_shared`: its batch, rounded up to the
    mesh's data axis."""
    data = lm.layout.data_size
    return -(-batch_size // data) * data


class PromptJudge(Grader):
    """A judge that answers the paper's grader prompts; subclasses supply the model."""

    def _assemble(self, request: GradeRequest, verdicts: dict, failures: Sequence[str] = ()) -> dict:
        notes = "; ".join(failures)
        return make_grade(self.name, verdicts.get("coherent", False), verdicts.get("affirmative", False),
                          verdicts.get("identifies", False), verdicts.get("immediate", False), request.word, notes)


class SelfHostedJudge(PromptJudge):
    """`llm:<checkpoint folder>`: any checkpoint converted with this library judges, greedily,
    each grader prompt as one chat user turn. All prompts of `batch_size` trials go to one
    generation call per criterion (`engine`: through the sweep engine, `lm.generate_shared`: the
    criterion's grader text before the quoted response is prefilled once per call and finished
    replies' slots refilled; the same greedy replies as `lm.generate`, which `engine=False` uses).
    A reply without a YES/NO answer grades that criterion False and notes
    `parse_failed: <criterion> (reply ends '...')` (a local judge is not retried: greedy decoding
    would repeat itself)."""

    def __init__(self, path: Optional[str] = None, max_new_tokens: int = 256, batch_size: int = 8,
                 dtype=None, lm=None, system_header: bool = True, name: Optional[str] = None, engine: bool = True):
        check_generation_sizes(max_new_tokens, batch_size)
        self.lm = lm if lm is not None else load_judge_model(path, dtype)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.engine = bool(engine)
        self.system_header = system_header
        self.name = name or "llm:" + checkpoint_label(path)

    def chat_text(self, prompt: str) -> str:
        return self.lm.tokenizer.chat_prompt([{"role": "user", "content": prompt}], system_header=self.system_header)

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[dict]:
        grades = []
        bar = progress_bar(len(requests), progress, self.name)
        try:
            for start in range(0, len(requests), self.batch_size):
                batch = requests[start:start + self.batch_size]
                jobs = [(i, c, p) for i, r in enumerate(batch) for c, p in judge_prompts(r)]
                outputs = self._replies([(c, self.chat_text(p)) for _, c, p in jobs])
                verdicts = [dict() for _ in batch]
                failures = [[] for _ in batch]
                for (i, criterion, _), out in zip(jobs, outputs):
                    answer = parse_yes_no(out.text)
                    if answer is None:
                        failures[i].append(f"parse_failed: {criterion} (reply ends {tail(out.text)!r})")
                    verdicts[i][criterion] = bool(answer)
                grades.extend(self._assemble(r, v, f) for r, v, f in zip(batch, verdicts, failures))
                bar.update(len(batch))
        finally:
            bar.close()
        return grades

    def _replies(self, jobs: Sequence[tuple[str, str]]) -> list:
        """Greedy generations for [(criterion, chat text)], in order."""
        if not self.engine:
            return self.lm.generate([text for _, text in jobs], max_new_tokens=self.max_new_tokens, temperature=0.0)
        replies = [None] * len(jobs)
        for criterion in dict.fromkeys(c for c, _ in jobs):  # one call per criterion: one shared grader text
            rows = [i for i, (c, _) in enumerate(jobs) if c == criterion]
            outs = self.lm.generate_shared([jobs[i][1] for i in rows], max_new_tokens=self.max_new_tokens,
                                           temperature=0.0, slots=engine_slots(self.lm, self.batch_size),
                                           trials=self.batch_size)
            for i, out in zip(rows, outs):
                replies[i] = out
        return replies
