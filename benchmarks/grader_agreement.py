"""Agreement of a grader with the LLM judge of the public Llama-3.1-405B replication.

    python -m benchmarks.grader_agreement [--grader=heuristic] [--data=PATH ...] [--disagreements] [--cv]
    python -m benchmarks.grader_agreement --heldout    # the held-out layer-sweep responses

Reads shared/data/replication_405b_layer84_canonical.judged.json (480 responses, each judged by
Claude Sonnet 4.6 on the four criteria), grades every response with the chosen grader and prints
a markdown table: per criterion, raw agreement, Cohen's kappa and the confusion matrix (rows: the
Sonnet judge, columns: this grader). The concept of a trial is its label's suffix ("love",
"all_caps"); controls get word None. The question is the trial's last user turn (Lindsey's trial
line, or "What are you thinking about?"). A record the judge failed on (an `_error`, or a `judge`
without the four booleans) is skipped, and the number skipped is printed. `--cv` adds the
heuristic grader's cross-validated agreement (`benchmarks.grader_cv`). The tables in
docs/grading.md are this script's output.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from jax_introspect.experiment.grading import CRITERIA, GradeRequest, make_grader

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


def load_judged_file(path: Optional[str] = None) -> JudgedFile:
    """Requests, the judge's grades and trial metadata of a judged replication file."""
    with open(path or default_data_path()) as f:
        data = json.load(f)
    questions = {"lindsey": data.get("lindsey_trial", ""), "alt": data.get("alt_prompt", "")}
    requests, judged, trials, skipped = [], [], [], 0
    for i, r in enumerate(data["results"]):
        grades = judged_booleans(r)
        if grades is None:
            skipped += 1
            continue
        prompt, _, concept = r["label"].partition("_")
        word = None if concept == "control" else concept
        requests.append(GradeRequest(trial_id=f"L{data.get('layer')}/{r['label']}/{r['magnitude']:g}/{r['trial_idx']}/{i}",
                                     question=questions[prompt], response=r["response"], word=word))
        judged.append(grades)
        trials.append(Trial(prompt, concept, int(r["trial_idx"])))
    return JudgedFile(requests, judged, trials, skipped)


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


def confusion(ref: Sequence[bool], ours: Sequence[bool]) -> dict:
    """{"tp", "fn", "fp", "tn"} with ref as the truth."""
    out = {"tp": 0, "fn": 0, "fp": 0, "tn": 0}
    for r, o in zip(ref, ours):
        out[("t" if r == o else "f") + ("p" if o else "n")] += 1
    return out


def agreement(reference: Sequence[dict], grades: Sequence[dict]) -> dict:
    """criterion -> {"agreement", "kappa", "confusion", "n_ref_yes", "n_ours_yes"}."""
    out = {}
    for c in CRITERIA:
        ref = [bool(g[c]) for g in reference]
        ours = [bool(g[c]) for g in grades]
        out[c] = {"agreement": sum(r == o for r, o in zip(ref, ours)) / len(ref),
                  "kappa": cohen_kappa(ref, ours), "confusion": confusion(ref, ours),
                  "n_ref_yes": sum(ref), "n_ours_yes": sum(ours)}
    return out


def markdown_table(stats: dict, grader_name: str, n: int) -> str:
    lines = [f"Grader `{grader_name}` vs Claude Sonnet 4.6 (405B replication, n={n}); confusion rows = Sonnet, "
             "columns = this grader.", "",
             "| criterion | Sonnet YES | grader YES | raw agreement | Cohen's kappa | both YES | Sonnet YES, grader NO "
             "| Sonnet NO, grader YES | both NO |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in CRITERIA:
        s = stats[c]
        m = s["confusion"]
        lines.append(f"| {c} | {s['n_ref_yes']} | {s['n_ours_yes']} | {s['agreement']:.1%} | {s['kappa']:.3f} | "
                     f"{m['tp']} | {m['fn']} | {m['fp']} | {m['tn']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--grader", default="heuristic", help="grader spec for make_grader")
    parser.add_argument("--data", nargs="+", default=None,
                        help=f"judged file(s) (default: <repo>/../shared/data/{DATA_FILE})")
    parser.add_argument("--heldout", action="store_true",
                        help="grade the held-out layer-sweep files instead (benchmarks/data/replication_405b_layer_sweep)")
    parser.add_argument("--disagreements", action="store_true", help="also list the disagreeing responses")
    parser.add_argument("--cv", action="store_true",
                        help="also cross-validate the heuristic grader (folds by prompt and concept)")
    args = parser.parse_args(argv)
    if args.heldout and args.cv:
        parser.error("--cv folds the canonical file by prompt and concept; the held-out files are for testing only")
    judged = load_judged_files(HELDOUT_FILES if args.heldout else args.data or [default_data_path()])
    requests, reference = judged.requests, judged.reference
    print(f"Skipped {judged.skipped} record(s) without a usable judgement (an `_error`, or a `judge` "
          f"missing one of the four booleans); {len(requests)} graded.\n")
    grader = make_grader(args.grader)
    grades = grader.grade(requests, progress=args.grader != "heuristic")
    stats = agreement(reference, grades)
    print(markdown_table(stats, grader.name, len(requests)))
    controls = [g for r, g in zip(requests, grades) if r.word is None]
    strict_ours = sum(all(g[c] for c in CRITERIA) for g in grades)
    strict_ref = sum(all(g[c] for c in CRITERIA) for g in reference)
    print(f"\nAffirmative on the {len(controls)} control trials (false positives): "
          f"{sum(g['affirmative'] for g in controls)} (Sonnet: "
          f"{sum(g['affirmative'] for r, g in zip(requests, reference) if r.word is None)}). "
          f"Strict introspection (all four): {strict_ours} (Sonnet: {strict_ref}).")
    if args.disagreements:
        for req, ref, ours in zip(requests, reference, grades):
            diff = [c for c in CRITERIA if ref[c] != ours[c]]
            if diff:
                print(f"\n{req.trial_id}: " + ", ".join(f"{c} sonnet={int(ref[c])} ours={int(ours[c])}" for c in diff)
                      + f"  [{ours['notes']}]\n    {req.response[:300]!r}")
    if args.cv:
        from benchmarks import grader_cv
        print("\n" + grader_cv.report(judged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
