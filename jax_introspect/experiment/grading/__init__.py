"""Grading trial responses on the paper's four criteria (see docs/grading.md).

    grader = make_grader("heuristic")                      # offline keyword/regex approximation
    grader = make_grader("llm:checkpoints/llama-70b")      # self-hosted judge, the paper's grader prompts
    grader = make_grader("api:anthropic:claude-sonnet-4-6")  # hosted judge (key from ANTHROPIC_API_KEY)
    grades = grader.grade([GradeRequest(trial_id, question, response, word)], progress=True)

Each grade is {"coherent", "affirmative", "identifies", "immediate": bool, "grader": name, "notes": str};
for a control trial (word None) identifies and immediate are False. Strict introspection (all four,
`jax_introspect.experiment.results.strict`) is left to the caller.

Homes: `llm_judge` holds the paper's grader prompts, their formatting, YES/NO parsing and the
self-hosted judge; `api_judge` the HTTP judges; `heuristic` the offline grader.
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


class GradingError(RuntimeError):
    """A grade could not be obtained. `partial` holds the grades of the requests completed before
    the failure, in request order (partial[i] grades requests[i]), so a caller can save them;
    `trial_id` names the request that failed."""

    def __init__(self, message: str, partial: Optional[list] = None, trial_id: Optional[str] = None):
        super().__init__(message)
        self.partial = list(partial or [])
        self.trial_id = trial_id


class Grader:
    """Base class: subclasses set `name` and implement `grade`."""

    name: str = "grader"

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[dict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def make_grade(name: str, coherent: bool, affirmative: bool, identifies: bool, immediate: bool,
               word: Optional[str], notes: str = "") -> dict:
    """A grade dict in the record schema; a control trial never identifies."""
    control = word is None
    return {"coherent": bool(coherent), "affirmative": bool(affirmative),
            "identifies": bool(identifies) and not control, "immediate": bool(immediate) and not control,
            "grader": name, "notes": notes}


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


GRADER_SPECS = "'heuristic', 'llm:<checkpoint folder>', 'api:anthropic:<model>' or 'api:openai:<model>'"


def parse_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """A grader spec -> (kind, args): ("heuristic", ()), ("llm", (folder,)), ("api", (provider, model)).
    Pure: nothing is loaded or contacted."""
    if spec == "heuristic":
        return "heuristic", ()
    kind, _, rest = str(spec).partition(":")
    if kind == "llm" and rest:
        return "llm", (rest,)
    if kind == "api":
        provider, _, model = rest.partition(":")
        if provider and model:
            return "api", (provider, model)
    raise ValueError(f"unknown grader spec {spec!r}; use {GRADER_SPECS}")


def check_grader(spec: str) -> None:
    """Everything about a grader that can be checked before any model is loaded: the spec, a
    self-hosted judge's checkpoint (its manifest only), an API provider, its SDK and its key. Raises
    ValueError / GradingError naming the fix."""
    kind, args = parse_spec(spec)
    if kind == "llm":
        from jax_introspect import checkpoint
        checkpoint.read_manifest(args[0])
    elif kind == "api":
        from jax_introspect.experiment.grading.api_judge import check_provider
        check_provider(args[0])


def make_grader(spec: str, **kwargs) -> Grader:
    """"heuristic" | "llm:<checkpoint folder>" | "api:anthropic:<model>" | "api:openai:<model>".

    kwargs go to the grader: heuristic (related_terms), llm (max_new_tokens, batch_size, dtype, lm),
    api (base_url, timeout_s, max_retries, max_tokens, workers)."""
    kind, args = parse_spec(spec)
    if kind == "heuristic":
        from jax_introspect.experiment.grading.heuristic import HeuristicGrader
        return HeuristicGrader(**kwargs)
    if kind == "llm":
        from jax_introspect.experiment.grading.llm_judge import SelfHostedJudge
        return SelfHostedJudge(args[0], **kwargs)
    from jax_introspect.experiment.grading.api_judge import ApiJudge
    return ApiJudge(*args, **kwargs)


__all__ = ["CRITERIA", "GradeRequest", "Grader", "GradingError", "check_grader", "make_grade", "make_grader",
           "parse_spec"]
