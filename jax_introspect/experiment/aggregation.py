"""The numbers of a report: a `Run`'s rows grouped into cells, counted, with Wilson intervals.

    summary = aggregate(run)   # -> dict (the numbers of summary.json), warnings included

Cells: injected trials per (protocol, layer, strength, word), the same pooled over words, controls
per protocol, and overall rates; an imported file's own `aggregates` are checked against the counts.
"""
from __future__ import annotations

import json
from collections import defaultdict

from jax_introspect.experiment import readout_report
from jax_introspect.experiment import results as results_lib
from jax_introspect.experiment.runs import CRITERIA, REPLICATION_PROTOCOLS, Run
from jax_introspect.experiment.stats import Z95, proportion

STRICT = results_lib.STRICT  # all four criteria: the replication's definition of strict introspection
STRICT_LINDSEY = "strict_lindsey"  # the paper's: coherent and AFFIRMATIVE + CORRECT ID (our `immediate`)
MEASURES = CRITERIA + (STRICT, STRICT_LINDSEY)
STRICT_MEASURE = {"replication": STRICT, "lindsey": STRICT_LINDSEY}  # a definition -> the measure holding it
ALL_WORDS = "all"  # the word of a cell pooled over words


def _measures(rows: list) -> tuple[dict, dict, dict]:
    n = len(rows)
    counts = {c: sum(r.grades[c] for r in rows) for c in CRITERIA}
    counts[STRICT] = sum(all(r.grades[c] for c in CRITERIA) for r in rows)
    counts[STRICT_LINDSEY] = sum(r.grades["coherent"] and r.grades["immediate"] for r in rows)
    rates = {m: (counts[m] / n if n else None) for m in MEASURES}
    intervals = {m: list(_interval(counts[m], n)) for m in MEASURES}
    return counts, rates, intervals


def _interval(k: int, n: int) -> tuple[float, float]:
    p = proportion(k, n)
    return p["low"], p["high"]


def _strict_definitions(rows: list) -> list:
    return sorted({r.strict_definition for r in rows})


def _cell(rows: list, **key) -> dict:
    counts, rates, intervals = _measures(rows)
    cell = dict(key)
    cell.update({"n": len(rows), "counts": counts, "rates": rates, "wilson": intervals,
                 "strict_definitions": _strict_definitions(rows)})
    return cell


def layer_key(layer):
    """Sort key of a layer: numbers first, None (controls) last."""
    return (layer is None, layer if layer is not None else 0)


def _injected_cells(injected: list) -> tuple[list, list]:
    """Cells per (protocol, layer, strength, word), and the same pooled over words (with n_words)."""
    per_word, pooled = defaultdict(list), defaultdict(list)
    for r in injected:
        per_word[(r.protocol, r.layer, r.strength, r.word)].append(r)
        pooled[(r.protocol, r.layer, r.strength)].append(r)

    def order(key):
        return (key[0], layer_key(key[1]), key[2]) + tuple(str(k) for k in key[3:])

    cells = [_cell(rs, protocol=p, kind="injected", layer=l, strength=s, word=w)
             for (p, l, s, w), rs in sorted(per_word.items(), key=lambda kv: order(kv[0]))]
    pooled_cells = [_cell(rs, protocol=p, kind="injected", layer=l, strength=s, word=ALL_WORDS)
                    for (p, l, s), rs in sorted(pooled.items(), key=lambda kv: order(kv[0]))]
    for c in pooled_cells:
        c["n_words"] = len({r.word for r in pooled[(c["protocol"], c["layer"], c["strength"])]})
    return cells, pooled_cells


def _control_cells(controls: list) -> list:
    """One cell per protocol, with its false-positive rate (affirmative answers without injection)."""
    by_protocol = defaultdict(list)
    for r in controls:
        by_protocol[r.protocol].append(r)
    cells = []
    for p in sorted(by_protocol):
        cell = _cell(by_protocol[p], protocol=p, kind="control", layer=None, strength=0.0, word=None)
        cell["false_positive"] = proportion(cell["counts"]["affirmative"], cell["n"])
        cells.append(cell)
    return cells


def _overall(injected: list, controls: list, protocol: str) -> dict:
    i_counts, i_rates, i_int = _measures(injected)
    c_counts, c_rates, c_int = _measures(controls)
    return {
        "protocol": protocol,
        "strict_definitions": _strict_definitions(injected + controls),
        "injected": {"n": len(injected), "counts": i_counts, "rates": i_rates, "wilson": i_int},
        "control": {"n": len(controls), "counts": c_counts, "rates": c_rates, "wilson": c_int},
        "false_positive": proportion(c_counts["affirmative"], len(controls)),
    }


def aggregate(run: Run) -> dict:
    """All the report's numbers: per-word cells, cells pooled over words, controls, overall rates."""
    injected = [r for r in run.rows if r.kind == "injected"]
    controls = [r for r in run.rows if r.kind == "control"]
    cells, pooled_cells = _injected_cells(injected)
    control_cells = _control_cells(controls)
    protocols = sorted({r.protocol for r in run.rows})
    summary = {
        "generator": "jax_introspect.experiment.report",
        "run": _jsonable(run.metadata),
        "measures": list(MEASURES),
        "interval": {"method": "wilson_score", "z": Z95, "level": 0.95},
        "cells": cells,
        "pooled": pooled_cells,
        "controls": control_cells,
        "overall": {
            "by_protocol": [_overall([r for r in injected if r.protocol == p],
                                     [r for r in controls if r.protocol == p], p) for p in protocols],
            "all": _overall(injected, controls, ALL_WORDS),
        },
    }
    readout = readout_report.summarize(run.rows)
    if readout is not None:  # p_yes / p_no and the logit lens, when the records carry them
        summary["readout"] = readout
    if run.source_aggregates is not None:
        summary["source_aggregates_check"] = _check_source_aggregates(run, cells, control_cells)
    summary["warnings"] = _warnings(run, summary)
    return summary


def _warnings(run: Run, summary: dict) -> list:
    """What a reader must not miss: the report also says these on stderr (launchers) and in summary.json."""
    meta, out = run.metadata, []
    check = summary.get("source_aggregates_check")
    if check is not None and not check["match"]:
        first = check["mismatches"][0] if check["mismatches"] else {}
        out.append(f"{run.path}: the file's own aggregates disagree with the counts of its results in "
                   f"{len(check['mismatches'])} of {check['cells_in_file']} cells (first: {json.dumps(first)[:200]}); "
                   f"its results list ({meta.get('n_records')} entries) may be incomplete or edited")
    if meta.get("n_ungraded"):
        out.append(f"{run.path}: {meta['n_ungraded']} of {meta.get('n_records')} records are ungraded and not counted")
    if meta.get("n_duplicate_records"):
        out.append(f"{run.path}: {meta['n_duplicate_records']} duplicate records (a trial id seen twice) skipped")
    return out


def _check_source_aggregates(run: Run, cells: list, control_cells: list) -> dict:
    """Compare our cells with the imported file's own `aggregates` (label, magnitude, n, counts)."""
    ours = {}
    for c in cells:
        ours[(c["protocol"], c["word"], round(c["strength"], 6))] = c
    for c in control_cells:
        ours[(c["protocol"], None, 0.0)] = c
    mismatches, checked = [], 0
    for agg in run.source_aggregates:
        try:
            prompt, _, rest = agg["label"].partition("_")
            protocol = REPLICATION_PROTOCOLS[prompt]
            control = rest == "control"
            key = (protocol, None if control else rest, 0.0 if control else round(float(agg["magnitude"]), 6))
        except (KeyError, TypeError, ValueError, AttributeError):
            mismatches.append({"aggregate": _jsonable(agg), "problem": "unreadable label/magnitude"})
            continue
        checked += 1
        mine = ours.get(key)
        if mine is None:
            mismatches.append({"label": agg.get("label"), "magnitude": agg.get("magnitude"),
                               "problem": "no such cell in the results"})
            continue
        theirs = agg.get("counts", {})
        diff = {m: [theirs.get(m), mine["counts"][m]] for m in MEASURES
                if m in theirs and theirs[m] != mine["counts"][m]}
        if agg.get("n") != mine["n"]:
            diff["n"] = [agg.get("n"), mine["n"]]
        if diff:
            mismatches.append({"label": agg.get("label"), "magnitude": agg.get("magnitude"),
                               "file_vs_ours": diff})
    return {"cells_checked": checked, "cells_in_file": len(run.source_aggregates), "mismatches": mismatches,
            "match": not mismatches and checked == len(run.source_aggregates)}


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------------
# Two runs side by side


def _cell_match_key(cell: dict):
    """Cells of two runs meet only within one protocol: strengths of two protocols are on different
    scales (raw vs norm-matched), so a Lindsey cell never stands beside a replication cell."""
    word = cell["word"]
    return (cell["protocol"], cell["layer"], round(float(cell["strength"]), 6),
            word.lower() if isinstance(word, str) else word)


def shared_cells(a: dict, b: dict) -> list:
    """Pairs of cells (pooled and per word) that two runs share: same protocol, layer, strength, word."""
    pairs = []
    for group in ("pooled", "cells"):
        theirs = defaultdict(list)
        for c in b[group]:
            theirs[_cell_match_key(c)].append(c)
        for c in a[group]:
            for d in theirs.get(_cell_match_key(c), []):
                pairs.append((c, d))
    return pairs


def shared_controls(a: dict, b: dict) -> list:
    """Pairs of control cells of two runs with the same protocol."""
    theirs = defaultdict(list)
    for c in b["controls"]:
        theirs[c["protocol"]].append(c)
    return [(c, d) for c in a["controls"] for d in theirs.get(c["protocol"], [])]


def comparison(a: dict, b: dict) -> dict:
    """summary.json's `compare`: the other run's summary and the cells and controls the two share."""
    return {
        "run": b,
        "shared_cells": [{"a": x, "b": y} for x, y in shared_cells(a, b)],
        "shared_controls": [{"a": x, "b": y} for x, y in shared_controls(a, b)],
    }
