"""The 405B replication's judged files as a grading benchmark, shared by `grader_agreement` and `grader_cv`.

A judged file's trials are read by the experiment side's loader (`jax_introspect.experiment.runs`),
under this benchmark's stricter rule of "judged": a record the judge failed on (an `_error`, or a
`judge` without the four booleans) is skipped and counted. Each trial becomes a grading request
(question, response, concept word; word None for controls), the judge's four booleans and its place
in the design (prompt "lindsey" | "alt", concept, trial index). Cohen's kappa scores a grader
against the judge.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from jax_introspect.experiment import runs
from jax_introspect.experiment.grading import CRITERIA, GradeRequest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_FILE = "replication_405b_layer84_canonical.judged.json"
# Held out: the same replication's layer sweep (960 responses, Lindsey's prompt, layers 70/84/90/100),
# judged by the same Sonnet rubric. No rule or parameter of the heuristic grader is fitted to them
# (benchmarks/data/replication_405b_layer_sweep/README.md).
HELDOUT_DIR = os.path.join(REPO, "benchmarks", "data", "replication_405b_layer_sweep")
HELDOUT_FILES = tuple(os.path.join(HELDOUT_DIR, f"layer{layer}.judged.json") for layer in (70, 84, 90, 100))


def default_data_path(repo: str = REPO) -> str:
    """shared/data sits beside the repository clone (<repo>/../shared/data)."""
    return os.path.join(os.path.dirname(repo), "shared", "data", DATA_FILE)


@dataclasses.dataclass(frozen=True)
class Trial:
    prompt: str  # "lindsey" | "alt"
    concept: str  # "love" | "all_caps" | "control"
    trial_idx: int


@dataclasses.dataclass(frozen=True)
class JudgedFile:
    requests: list[GradeRequest]
    reference: list[dict]  # the judge's four booleans per request
    trials: list[Trial]
    skipped: int  # records without a usable judgement


def judged_booleans(record: dict) -> Optional[dict]:
    """The judge's four booleans of a record, or None when the judge failed on it (an `_error`,
    or a `judge` missing one of them)."""
    judge = record.get("judge")
    if "_error" in record or not isinstance(judge, dict) or "_error" in judge:
        return None
    if not all(isinstance(judge.get(c), bool) for c in CRITERIA):
        return None
    return {c: judge[c] for c in CRITERIA}


def _fully_judged(record: dict) -> bool:
    return judged_booleans(record) is not None


def load_judged_file(path: Optional[str] = None) -> JudgedFile:
    """Requests, the judge's grades and trial metadata of a judged replication file."""
    run = runs.load_replication(path or default_data_path(), judged=_fully_judged)
    rows = run.rows
    return JudgedFile(
        requests=[GradeRequest(trial_id=r.trial_id, question=r.question, response=r.response, word=r.word)
                  for r in rows],
        reference=[dict(r.grades) for r in rows],
        trials=[Trial(runs.replication_prompt(r.protocol), r.word or "control", r.trial_index) for r in rows],
        skipped=run.metadata["n_ungraded"])


def load_judged_files(paths: Sequence[str]) -> JudgedFile:
    """Several judged files as one."""
    files = [load_judged_file(p) for p in paths]
    return JudgedFile(*(sum((getattr(f, field) for f in files), []) for field in ("requests", "reference", "trials")),
                      skipped=sum(f.skipped for f in files))


def load_judged(path: Optional[str] = None) -> tuple[list[GradeRequest], list[dict]]:
    """(requests, Sonnet's grades) for the judged replication file (records the judge failed on
    left out; `load_judged_file` counts them)."""
    judged = load_judged_file(path)
    return judged.requests, judged.reference


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)
