"""What the model said: a few responses per protocol, chosen deterministically, for report.md.

    picks = choose(run.rows, summary)   # -> [{"protocol", "cells": [{"cell", "trials": [Row, ...]}, ...]}]
    lines = markdown_lines(picks)       # the report's "Transcripts" section

Per protocol: its strongest injected cells (pooled over words: protocol x layer x strength, ranked by
the count of trials its grader's own strict definition counts, then affirmative, identifies,
coherent; ties to the lower layer, then the lower strength) and its controls. Within a cell, trials
in this order: counted strict (by the grader's definition), then affirmative without identification,
then the most incoherent (graded not coherent, most repetitive text first), then the rest; ties by
word, trial index and trial id. Responses are cut at a word boundary near `max_chars`.
"""
from __future__ import annotations

import re
from typing import Optional

from jax_introspect.experiment.aggregation import STRICT_MEASURE

CELLS_PER_PROTOCOL = 2
PER_CELL = 3
MAX_CHARS = 400
# The category of a trial within a cell, in the order they are quoted.
STRICT, AFFIRMATIVE_NO_ID, INCOHERENT, OTHER = range(4)
CATEGORY_LABELS = {STRICT: "counted strict", AFFIRMATIVE_NO_ID: "affirmative, no identification",
                   INCOHERENT: "incoherent", OTHER: "other"}


def is_strict(row) -> bool:
    """Strict introspection by the definition the row's grader follows."""
    g = row.grades
    if row.strict_definition == "replication":
        return all(bool(g[c]) for c in ("coherent", "affirmative", "identifies", "immediate"))
    return bool(g["coherent"]) and bool(g["immediate"])


def category(row) -> int:
    if is_strict(row):
        return STRICT
    if row.grades["affirmative"] and not row.grades["identifies"]:
        return AFFIRMATIVE_NO_ID
    if not row.grades["coherent"]:
        return INCOHERENT
    return OTHER


def repetitiveness(text: str) -> float:
    """1 - distinct/total words: 0 for text without repeats, near 1 for a loop of one word."""
    words = re.findall(r"\w+", text.lower())
    return 1.0 - len(set(words)) / len(words) if words else 1.0


def order_key(row):
    c = category(row)
    return (c, -repetitiveness(row.response) if c == INCOHERENT else 0.0, str(row.word or ""),
            row.trial_index if row.trial_index is not None else -1, row.trial_id)


def pick(rows: list, n: int = PER_CELL) -> list:
    return sorted(rows, key=order_key)[:n]


def _cell_strength(cell: dict) -> tuple:
    measures = [STRICT_MEASURE[d] for d in cell.get("strict_definitions") or ["lindsey"]]
    strict = max(cell["counts"][m] for m in measures)
    c = cell["counts"]
    return (-strict, -c["affirmative"], -c["identifies"], -c["coherent"],
            cell["layer"] if cell["layer"] is not None else 0, cell["strength"])


def strongest_cells(summary: dict, protocol: str, k: int = CELLS_PER_PROTOCOL) -> list:
    """The protocol's k strongest pooled cells (see the module docstring for the ranking)."""
    cells = [c for c in summary["pooled"] if c["protocol"] == protocol]
    return sorted(cells, key=_cell_strength)[:k]


def choose(rows: list, summary: dict, cells_per_protocol: int = CELLS_PER_PROTOCOL, per_cell: int = PER_CELL) -> list:
    out = []
    for protocol in sorted({r.protocol for r in rows}):
        groups = []
        for cell in strongest_cells(summary, protocol, cells_per_protocol):
            members = [r for r in rows if r.kind == "injected" and r.protocol == protocol
                       and r.layer == cell["layer"] and r.strength == cell["strength"]]
            groups.append({"cell": cell, "trials": pick(members, per_cell)})
        controls = [r for r in rows if r.kind == "control" and r.protocol == protocol]
        if controls:
            cell = next((c for c in summary["controls"] if c["protocol"] == protocol), None)
            groups.append({"cell": cell, "trials": pick(controls, per_cell)})
        out.append({"protocol": protocol, "cells": groups})
    return out


def truncate(text: str, max_chars: int = MAX_CHARS) -> str:
    """`text` with runs of blank lines squeezed, cut at a word boundary near max_chars, with the number
    of characters left out."""
    text = re.sub(r"\n\s*\n+", "\n", text.strip())
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", max_chars - 80, max_chars)
    cut = cut if cut > 0 else max_chars
    return text[:cut].rstrip() + f" … [{len(text) - cut} more characters]"


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _grades(row) -> str:
    marks = " ".join(f"{c} {'✓' if row.grades[c] else '✗'}" for c in ("coherent", "affirmative", "identifies",
                                                                      "immediate"))
    return f"{marks}; strict ({row.strict_definition}'s) {'✓' if is_strict(row) else '✗'}"


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _cell_heading(cell: Optional[dict], trials: list) -> str:
    if not trials:
        return ""
    if trials[0].kind == "control":
        n = cell["n"] if cell else len(trials)
        fp = cell["counts"]["affirmative"] if cell else sum(r.grades["affirmative"] for r in trials)
        return f"**Controls** (no injection; {fp}/{n} affirmative = false positives)"
    measures = [STRICT_MEASURE[d] for d in cell.get("strict_definitions") or ["lindsey"]]
    strict = max(cell["counts"][m] for m in measures)
    return (f"**Layer {_num(cell['layer'])}, strength {_num(cell['strength'])}** (pooled over "
            f"{cell.get('n_words', '?')} words: {strict}/{cell['n']} strict by its grader's definition, "
            f"{cell['counts']['affirmative']}/{cell['n']} affirmative, {cell['counts']['identifies']}/{cell['n']} "
            "identify)")


def markdown_lines(picks: list, max_chars: int = MAX_CHARS) -> list:
    lines = []
    for p in picks:
        lines += [f"### {p['protocol']}", ""]
        asked = next((r.question for g in p["cells"] for r in g["trials"] if r.question), "")
        if asked:
            lines += [f"Asked: {truncate(asked, 240).replace(chr(10), ' ')}", ""]
        for group in p["cells"]:
            trials = group["trials"]
            if not trials:
                continue
            lines += [_cell_heading(group["cell"], trials), ""]
            for r in trials:
                who = f"word **{r.word}**, " if r.word else ""
                lines.append(f"- `{r.trial_id}` ({who}{CATEGORY_LABELS[category(r)]}): {_grades(r)}")
                if r.question and r.question != asked:
                    lines.append(f"  - asked: {truncate(r.question, 240).replace(chr(10), ' ')}")
                text = truncate(r.response, max_chars) or "(empty response)"
                fence = _fence(text)
                lines += ["", f"  {fence}text"] + [f"  {line}" for line in text.split("\n")] + [f"  {fence}", ""]
        lines.append("")
    return lines


def section(rows: list, summary: dict, level: int = 2) -> list:
    """report.md's transcripts section for one run."""
    h = "#" * level
    intro = (f"Per protocol: its {CELLS_PER_PROTOCOL} strongest cells (pooled over words, ranked by trials counted strict "
             "by the grader's own definition, then affirmative, identifies, coherent) and its controls; in each, "
             f"up to {PER_CELL} responses: those counted strict first, then affirmative without identification, "
             f"then the most incoherent, then others. Responses are cut near {MAX_CHARS} characters; every "
             "response is in the Inspect log (see below) and in the results file.")
    lines = [f"{h} Transcripts (what the model said)", "", intro, ""]
    body = markdown_lines(choose(rows, summary))
    if level != 2:
        body = [("#" * (level + 1) + line[3:]) if line.startswith("### ") else line for line in body]
    return lines + body
