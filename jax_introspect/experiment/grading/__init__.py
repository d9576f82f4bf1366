"""Grading trial responses on the four criteria (see docs/grading.md).

    grader = make_grader("heuristic")                      # offline keyword/regex approximation
    grader = make_grader("llm:checkpoints/llama-70b")      # self-hosted judge, the paper's grader prompts
    grader = make_grader("api:anthropic:claude-sonnet-4-6")  # hosted judge (key from ANTHROPIC_API_KEY)
    grader = make_grader(REPLICATION_GRADER)               # the 405B replication's structured judge
    grades = grader.grade([GradeRequest(trial_id, question, response, word, strength, protocol)], progress=True)

Each grade is {"coherent", "affirmative", "identifies", "immediate", "strict": bool, "strict_definition": str,
"grader": name, "notes": str}; for a control trial (word None) identifies, immediate and strict are
False. `strict` is strict introspection under the grader's own definition (`STRICT_DEFINITIONS`).
A grader may return None for a request it could not grade (see `Grader.grade`).

Homes: `llm_judge` holds the paper's grader prompts, their formatting, YES/NO parsing and the
self-hosted judge; `api_judge` the HTTP judges; `replication_judge` the replication's judge (its
prompts, schema and strict parsing, hosted and self-hosted); `heuristic` the offline grader.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from jax_introspect.experiment.results import CRITERIA


@dataclasses.dataclass(frozen=True)
class GradeRequest:
    trial_id: str
    question: str  # the last user turn the model answered
    response: str
    word: Optional[str]  # the injected concept; None for control trials
    strength: float = 0.0  # the injection strength (0.0 for controls); the replication judge is told it
    protocol: str = ""  # the protocol's name; the replication judge picks its prompt kind by it


class GradingError(RuntimeError):
    """A grade could not be obtained. `partial` holds the grades of the requests completed before
    the failure, in request order (partial[i] grades requests[i]), so a caller can save them;
    `trial_id` names the request that failed."""

    def __init__(self, message: str, partial: Optional[list] = None, trial_id: Optional[str] = None):
        super().__init__(message)
        self.partial = list(partial or [])
        self.trial_id = trial_id


class Grader:
    """Base class: subclasses set `name` and implement `grade`.

    `grade(requests)` returns one entry per request, in request order: a grade dict (`make_grade`),
    or None when that request could not be graded: the judge's reply kept failing its schema after
    the retries. None means "keep the response ungraded (it can be graded again later); never guess
    a grade". A failure to reach the judge (HTTP, timeouts, connection) is not None: it raises
    GradingError, whose `.partial` holds the entries (grades or None) of the requests before it."""

    name: str = "grader"

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[Optional[dict]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# Strict introspection, per grader family: the criteria that must all hold.
# "lindsey": the paper's COHERENCE and AFFIRMATIVE + CORRECT ID (our `coherent` and `immediate`; the
#   latter already requires the detection claim and the right concept), for the paper's four prompts
#   and the heuristic that approximates them.
# "replication": all four booleans of the 405B replication's judge, as that replication counts them
#   (its `immediate` does not itself require `affirmative` or `identifies`).
STRICT_DEFINITIONS = {"lindsey": ("coherent", "immediate"), "replication": CRITERIA}


def make_grade(name: str, coherent: bool, affirmative: bool, identifies: bool, immediate: bool,
               word: Optional[str], notes: str = "", strict_definition: str = "lindsey") -> dict:
    """A grade dict in the record schema; a control trial never identifies. `strict` is strict
    introspection under `strict_definition` (a key of STRICT_DEFINITIONS), recorded beside it."""
    control = word is None
    grade = {"coherent": bool(coherent), "affirmative": bool(affirmative),
             "identifies": bool(identifies) and not control, "immediate": bool(immediate) and not control}
    grade["strict"] = all(grade[c] for c in STRICT_DEFINITIONS[strict_definition])
    grade.update(strict_definition=strict_definition, grader=name, notes=notes)
    return grade


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar (rate and ETA) counting requests, or a no-op."""
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit="trial", dynamic_ncols=True)
    return _NoBar()


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


GRADER_SPECS = ("'heuristic', 'llm:<checkpoint folder>[@<adapter folder>]', 'api:anthropic:<model>', 'api:openai:<model>', "
                "'replication:api:anthropic:<model>', 'replication:api:openai:<model>' or "
                "'replication:llm:<checkpoint folder>'")
# The replication's own judge, as it ran (its model is in protocols/data/replication_405b_judge.json;
# a test checks they agree): the default grader of replication configs.
REPLICATION_GRADER = "replication:api:anthropic:claude-sonnet-4-6"
SELF_HOSTED_KINDS = ("llm", "replication_llm")


def _parse_judge(rest: str) -> Optional[tuple[str, tuple[str, ...]]]:
    """"llm:<folder>" -> ("llm", (folder,)); "api:<provider>:<model>" -> ("api", (provider, model))."""
    kind, _, rest = rest.partition(":")
    if kind == "llm" and rest:
        return "llm", (rest,)
    if kind == "api":
        provider, _, model = rest.partition(":")
        if provider and model:
            return "api", (provider, model)
    return None


def parse_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """A grader spec -> (kind, args): ("heuristic", ()), ("llm", (folder,)), ("api", (provider, model)),
    ("replication_llm", (folder,)), ("replication_api", (provider, model)). Pure: nothing is loaded
    or contacted."""
    spec = str(spec)
    if spec == "heuristic":
        return "heuristic", ()
    family, _, rest = spec.partition(":")
    parsed = _parse_judge(rest) if family == "replication" else _parse_judge(spec)
    if parsed is None:
        raise ValueError(f"unknown grader spec {spec!r}; use {GRADER_SPECS}")
    kind, args = parsed
    return ("replication_" + kind if family == "replication" else kind), args


def is_self_hosted(spec: str) -> bool:
    """Whether the grader loads a model (`llm:` and `replication:llm:`): it runs where the model can."""
    return parse_spec(spec)[0] in SELF_HOSTED_KINDS


def check_grader(spec: str) -> None:
    """Everything about a grader that can be checked before any model is loaded: the spec, a
    self-hosted judge's checkpoint (its manifest only), an API provider, its SDK and its key. Raises
    ValueError / GradingError naming the fix."""
    kind, args = parse_spec(spec)
    if kind in SELF_HOSTED_KINDS:
        from jax_introspect.experiment.grading.llm_judge import check_judge_path
        check_judge_path(args[0])
    elif kind in ("api", "replication_api"):
        from jax_introspect.experiment.grading.api_judge import check_provider
        check_provider(args[0])


def make_grader(spec: str, **kwargs) -> Grader:
    """A grader from its spec (GRADER_SPECS).

    kwargs go to the grader: heuristic (related_terms, params), llm (max_new_tokens, batch_size,
    dtype, lm, engine), api (base_url, timeout_s, max_retries, max_tokens, workers); replication:api
    (those of api, plus schema_retries); replication:llm (those of llm, plus decoding, schema_retries,
    retry_temperature)."""
    kind, args = parse_spec(spec)
    if kind == "heuristic":
        from jax_introspect.experiment.grading.heuristic import HeuristicGrader
        return HeuristicGrader(**kwargs)
    if kind == "llm":
        from jax_introspect.experiment.grading.llm_judge import SelfHostedJudge
        return SelfHostedJudge(args[0], **kwargs)
    if kind == "api":
        from jax_introspect.experiment.grading.api_judge import ApiJudge
        return ApiJudge(*args, **kwargs)
    from jax_introspect.experiment.grading import replication_judge
    if kind == "replication_llm":
        return replication_judge.SelfHostedReplicationJudge(args[0], **kwargs)
    return replication_judge.ApiReplicationJudge(*args, **kwargs)


__all__ = ["CRITERIA", "GradeRequest", "Grader", "GradingError", "REPLICATION_GRADER", "STRICT_DEFINITIONS",
           "check_grader", "is_self_hosted", "make_grade", "make_grader", "parse_spec"]
