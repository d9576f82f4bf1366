"""Cross-validated agreement of the heuristic grader with the 405B replication's Sonnet judge.

    python -m benchmarks.grader_cv [--data=PATH]      (also: python -m benchmarks.grader_agreement --cv)

The heuristic's text rules are fixed (written from general English grammar and the patterns of
issue 11, not fitted to these responses); what may be fitted are the numbers in
`HeuristicParams`. Four folds, one per (prompt, concept): (lindsey, love), (lindsey, all_caps),
(alt, love), (alt, all_caps); the control trials of a prompt go to that prompt's two folds,
alternately by trial index (even: love, odd: all_caps). For each held-out fold, the parameter
combination of `PARAM_GRID` that maximises the mean kappa of the four criteria on the other three
folds (pooled) is chosen (ties: the defaults, else the first in grid order), then scored on the
held-out fold.

Kappa is undefined when the reference has one class only (a fold without a single Sonnet YES for
`immediate`, say): such a fold is reported as n/a and left out of that criterion's mean and
worst; the pooled out-of-fold kappa (every response graded with the parameters chosen without its
fold, one kappa over all of them) is always defined.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
from typing import Optional, Sequence

from benchmarks.judged import JudgedFile, cohen_kappa, load_judged_file
from jax_introspect.experiment.grading import CRITERIA
from jax_introspect.experiment.grading import heuristic

FOLDS = (("lindsey", "love"), ("lindsey", "all_caps"), ("alt", "love"), ("alt", "all_caps"))
# heuristic-v1's in-sample kappas (docs/grading.md before heuristic-v2), for comparison.
V1_IN_SAMPLE = {"coherent": 0.975, "affirmative": 0.646, "identifies": 0.879, "immediate": 0.436}
# 3 * 3 * 3 * 2 * 2 = 108 combinations around the defaults.
PARAM_GRID = {
    "top_content_share": (0.10, 0.12, 0.15),
    "min_distinct_ratio": (0.36, 0.42, 0.48),
    "allcaps_share": (0.04, 0.06, 0.10),
    "incoherent_mentions_needed": (1, 2),
    "incoherent_denial_overrides": (True, False),
}


def fold_of(prompt: str, concept: str, trial_idx: int) -> int:
    """The fold of a trial: its (prompt, concept), or for a control its prompt's love fold on an
    even trial index and all_caps fold on an odd one."""
    if concept == "control":
        concept = ("love", "all_caps")[trial_idx % 2]
    return FOLDS.index((prompt, concept))


def parameter_grid() -> list[heuristic.HeuristicParams]:
    names = list(PARAM_GRID)
    return [dataclasses.replace(heuristic.DEFAULT_PARAMS, **dict(zip(names, values)))
            for values in itertools.product(*PARAM_GRID.values())]


def defined_kappa(ref: Sequence[bool], ours: Sequence[bool]) -> Optional[float]:
    """Cohen's kappa, or None when the reference has a single class (undefined, or 0 whatever the
    grader does)."""
    if not ref or all(ref) or not any(ref):
        return None
    return cohen_kappa(ref, ours)


def criterion_kappas(reference: Sequence[dict], grades: Sequence[dict]) -> dict:
    """criterion -> kappa or None."""
    return {c: defined_kappa([bool(r[c]) for r in reference], [bool(g[c]) for g in grades]) for c in CRITERIA}


def mean_defined(values: Sequence[Optional[float]]) -> float:
    defined = [v for v in values if v is not None]
    return statistics.fmean(defined) if defined else float("nan")


def _selection_score(reference: Sequence[dict], grades: Sequence[dict]) -> float:
    """Mean kappa of the criteria defined on these responses (-inf if none is)."""
    score = mean_defined(list(criterion_kappas(reference, grades).values()))
    return score if score == score else float("-inf")


@dataclasses.dataclass(frozen=True)
class FoldResult:
    fold: tuple[str, str]
    n: int
    positives: dict  # criterion -> Sonnet YES in the held-out fold
    params: heuristic.HeuristicParams
    train_kappa: dict  # criterion -> kappa on the three training folds (pooled)
    test_kappa: dict  # criterion -> kappa on the held-out fold, or None
    control_false_positives: int  # affirmative on the held-out fold's controls


@dataclasses.dataclass(frozen=True)
class CrossValidation:
    in_sample: dict  # criterion -> kappa on all responses, default parameters
    in_sample_control_fp: int
    folds: list[FoldResult]
    pooled_out_of_fold: dict  # criterion -> kappa over all responses graded out of fold
    n_controls: int


def cross_validate(judged: JudgedFile, grid: Optional[Sequence[heuristic.HeuristicParams]] = None) -> CrossValidation:
    grid = list(grid or parameter_grid())
    if heuristic.DEFAULT_PARAMS not in grid:
        grid.insert(0, heuristic.DEFAULT_PARAMS)
    words = [r.word for r in judged.requests]
    analyses = [heuristic.analyse(r.response, r.word) for r in judged.requests]  # the slow part, once
    grades = {p: [heuristic.decide(a, w, p) for a, w in zip(analyses, words)] for p in grid}
    folds = [fold_of(t.prompt, t.concept, t.trial_idx) for t in judged.trials]
    controls = [w is None for w in words]

    def subset(values, keep):
        return [v for v, k in zip(values, keep) if k]

    def control_fp(gs, keep):
        return sum(g["affirmative"] for g, k, c in zip(gs, keep, controls) if k and c)

    results, out_of_fold = [], [None] * len(words)
    for f, fold in enumerate(FOLDS):
        train = [x != f for x in folds]
        test = [x == f for x in folds]
        ref_train = subset(judged.reference, train)
        scored = [(_selection_score(ref_train, subset(grades[p], train)), p == heuristic.DEFAULT_PARAMS, -i, p)
                  for i, p in enumerate(grid)]
        best = max(scored, key=lambda s: s[:3])[3]
        for i, keep in enumerate(test):
            if keep:
                out_of_fold[i] = grades[best][i]
        results.append(FoldResult(
            fold=fold, n=sum(test),
            positives={c: sum(r[c] for r in subset(judged.reference, test)) for c in CRITERIA},
            params=best,
            train_kappa=criterion_kappas(ref_train, subset(grades[best], train)),
            test_kappa=criterion_kappas(subset(judged.reference, test), subset(grades[best], test)),
            control_false_positives=control_fp(grades[best], test)))
    everything = [True] * len(words)
    default = grades[heuristic.DEFAULT_PARAMS]
    return CrossValidation(
        in_sample=criterion_kappas(judged.reference, default),
        in_sample_control_fp=control_fp(default, everything),
        folds=results,
        pooled_out_of_fold=criterion_kappas(judged.reference, out_of_fold),
        n_controls=sum(controls))


def _fmt(k: Optional[float]) -> str:
    return "n/a" if k is None or k != k else f"{k:.3f}"


def _changed(p: heuristic.HeuristicParams) -> str:
    diff = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)
            if getattr(p, f.name) != getattr(heuristic.DEFAULT_PARAMS, f.name)}
    return ", ".join(f"{k}={v}" for k, v in diff.items()) or "defaults"


def markdown(cv: CrossValidation) -> str:
    n = sum(f.n for f in cv.folds)
    lines = [f"Cross-validated `{heuristic.NAME}` vs Claude Sonnet 4.6 (n={n}; 4 folds by prompt and concept; "
             f"{len(parameter_grid())} parameter combinations). Kappa per criterion:", "",
             "| criterion | v1 in-sample | v2 in-sample | v2 in-fold (mean of 4) | v2 out-of-fold mean | "
             "v2 worst fold | v2 pooled out-of-fold |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in CRITERIA:
        train = [f.train_kappa[c] for f in cv.folds]
        test = [f.test_kappa[c] for f in cv.folds if f.test_kappa[c] is not None]
        worst = min(test) if test else None
        lines.append(f"| {c} | {V1_IN_SAMPLE[c]:.3f} | {_fmt(cv.in_sample[c])} | {_fmt(mean_defined(train))} | "
                     f"{_fmt(mean_defined(test))} ({len(test)} folds) | {_fmt(worst)} | "
                     f"{_fmt(cv.pooled_out_of_fold[c])} |")
    lines += ["", "Per held-out fold (Sonnet YES in the fold; kappa; parameters chosen on the other three folds):", "",
              "| held-out fold | n | Sonnet YES c/a/i/m | coherent | affirmative | identifies | immediate | "
              "control false positives | parameters |",
              "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for f in cv.folds:
        pos = "/".join(str(f.positives[c]) for c in CRITERIA)
        kappas = " | ".join(_fmt(f.test_kappa[c]) for c in CRITERIA)
        lines.append(f"| {f.fold[0]}, {f.fold[1]} | {f.n} | {pos} | {kappas} | {f.control_false_positives} | "
                     f"{_changed(f.params)} |")
    oof_fp = sum(f.control_false_positives for f in cv.folds)
    lines += ["", f"Affirmative on the {cv.n_controls} control trials (false positives): in sample "
              f"{cv.in_sample_control_fp}, out of fold {oof_fp}. n/a: the fold has no Sonnet YES (or no NO) for "
              "that criterion, so kappa is undefined there; it is left out of the mean and worst fold."]
    return "\n".join(lines)


def report(judged: JudgedFile) -> str:
    return markdown(cross_validate(judged))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--data", default=None, help="judged file (default: <repo>/../shared/data/...)")
    args = parser.parse_args(argv)
    print(report(load_judged_file(args.data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
