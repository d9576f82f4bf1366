"""Agreement of a grader with the LLM judge of the public Llama-3.1-405B replication.

    python -m benchmarks.grader_agreement [--grader=heuristic] [--data=PATH] [--disagreements]

Reads shared/data/replication_405b_layer84_canonical.judged.json (480 responses, each judged by
Claude Sonnet 4.6 on the four criteria), grades every response with the chosen grader and prints
a markdown table: per criterion, raw agreement, Cohen's kappa and the confusion matrix (rows: the
Sonnet judge, columns: this grader). The concept of a trial is its label's suffix ("love",
"all_caps"); controls get word None. The question is the trial's last user turn (Lindsey's trial
line, or "What are you thinking about?"). The table in docs/grading.md is this script's output.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from jax_introspect.grading import CRITERIA, GradeRequest, make_grader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_FILE = "replication_405b_layer84_canonical.judged.json"


def default_data_path(repo: str = REPO) -> str:
    """shared/data sits beside the repository clone (<repo>/../shared/data)."""
    return os.path.join(os.path.dirname(repo), "shared", "data", DATA_FILE)


def load_judged(path: Optional[str] = None) -> tuple[list[GradeRequest], list[dict]]:
    """(requests, Sonnet's grades) for the judged replication file."""
    with open(path or default_data_path()) as f:
        data = json.load(f)
    questions = {"lindsey": data["lindsey_trial"], "alt": data["alt_prompt"]}
    requests, judged = [], []
    for i, r in enumerate(data["results"]):
        prompt, _, concept = r["label"].partition("_")
        word = None if concept == "control" else concept
        requests.append(GradeRequest(trial_id=f"{r['label']}/{r['magnitude']:g}/{r['trial_idx']}/{i}",
                                     question=questions[prompt], response=r["response"], word=word))
        judged.append({c: bool(r["judge"][c]) for c in CRITERIA})
    return requests, judged


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
    parser.add_argument("--data", default=None, help=f"judged file (default: <repo>/../shared/data/{DATA_FILE})")
    parser.add_argument("--disagreements", action="store_true", help="also list the disagreeing responses")
    args = parser.parse_args(argv)
    requests, reference = load_judged(args.data)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
