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
heuristic grader's cross-validated agreement (`benchmarks.grader_cv`). The files are read by
`benchmarks.judged`. The tables in docs/grading.md are this script's output.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from benchmarks import grader_cv
from benchmarks.judged import DATA_FILE, HELDOUT_FILES, cohen_kappa, default_data_path, load_judged_files
from jax_introspect.experiment.grading import CRITERIA, make_grader


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
        print("\n" + grader_cv.report(judged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
