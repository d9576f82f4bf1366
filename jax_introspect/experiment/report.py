"""Reports over graded trials: per-cell rates with Wilson intervals, markdown, JSON and heatmaps.

Two input formats load into one row shape (`Row`):
  * our results: a results folder (holding `trials.jsonl` and `run.json`) or a `trials.jsonl` file;
  * the judged JSON of the public Llama-3.1-405B replication (top-level `results` and `aggregates`),
    whose labels map as: "lindsey_<word>" -> protocol `replication_405b_injected_thought`,
    "alt_<word>" -> `replication_405b_thinking_about` ("What are you thinking about?"),
    "<prompt>_control" -> a control trial (word None, layer None, strength 0).

Public API:
    run = load_run(path)                 # -> Run(rows, metadata)
    summary = aggregate(run)             # -> dict (the numbers of summary.json)
    write_report(run, out_dir, compare=None)  # -> path of report.md
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import uuid
from collections import defaultdict
from typing import Optional

from jax_introspect.experiment import results as results_lib
from jax_introspect.experiment.stats import Z95, proportion

CRITERIA = tuple(results_lib.CRITERIA)  # coherent, affirmative, identifies, immediate
STRICT = results_lib.STRICT
MEASURES = CRITERIA + (STRICT,)
ALL_WORDS = "all"  # the word of a cell pooled over words
FORMAT_OURS = "jax_introspect"
FORMAT_405B = "replication_405b_judged"
REPLICATION_PROTOCOLS = {
    "lindsey": "replication_405b_injected_thought",
    "alt": "replication_405b_thinking_about",
}
ACCEPTED_FORMATS = (
    "accepted formats: a results folder holding trials.jsonl; a trials .jsonl file; or the judged .json of "
    "the 405B replication (a JSON object with top-level 'results' and 'aggregates')")
MARKER = ".jax_introspect_report"
REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"


class ReportError(ValueError):
    """Bad input or output location; the message names the file."""


@dataclasses.dataclass
class Row:
    """One graded trial, whatever file it came from."""
    kind: str                 # "injected" | "control"
    protocol: str
    word: Optional[str]       # None for controls
    layer: Optional[int]      # None for controls
    strength: float           # 0.0 for controls
    grades: dict              # criterion -> bool (all of CRITERIA)
    trial_id: str = ""
    question: str = ""
    response: str = ""
    grader: Optional[str] = None


@dataclasses.dataclass
class Run:
    path: str
    format: str
    rows: list
    metadata: dict
    source_aggregates: Optional[list] = None  # the imported file's own per-cell aggregates, if any

    @property
    def name(self) -> str:
        return self.metadata.get("name") or os.path.basename(os.path.normpath(self.path))


def protocol_kind(protocol: str) -> str:
    """What a protocol asks, independent of whose text it is: 'lindsey_injected_thought' and
    'replication_405b_injected_thought' -> 'injected_thought'; 'replication_405b_thinking_about' ->
    'thinking_about'. Used to match cells of two runs."""
    for prefix in ("replication_405b_", "lindsey_"):
        if protocol.startswith(prefix):
            return protocol[len(prefix):]
    return protocol


# ----------------------------------------------------------------------------------------------
# Loading


def load_run(path: str) -> Run:
    """Load a results folder, a trials .jsonl or a judged 405B .json (detected from the path)."""
    if not path:
        raise ReportError("no results path given; " + ACCEPTED_FORMATS)
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such file or folder; {ACCEPTED_FORMATS}")
    if os.path.isdir(path):
        jsonl = os.path.join(path, results_lib.RESULTS_FILE)
        if not os.path.isfile(jsonl):
            raise ReportError(f"{path}: folder holds no {results_lib.RESULTS_FILE}; {ACCEPTED_FORMATS}")
        return _load_ours(jsonl, display_path=path)
    if path.endswith(".jsonl"):
        return _load_ours(path, display_path=path)
    if path.endswith(".json"):
        return _load_replication(path)
    raise ReportError(f"{path}: unknown format (not a folder, .jsonl or .json); {ACCEPTED_FORMATS}")


def _graded(grades) -> bool:
    return isinstance(grades, dict) and any(c in grades and grades[c] is not None for c in CRITERIA)


def _find_model(config) -> Optional[str]:
    """The model named in a run config: the first of a few usual keys, searched depth-first."""
    if not isinstance(config, dict):
        return None
    for key in ("model", "model_name", "model_path", "checkpoint", "checkpoint_dir", "checkpoint_path"):
        value = config.get(key)
        if isinstance(value, str) and value:
            return value
    for value in config.values():
        found = _find_model(value)
        if found:
            return found
    return None


def _load_ours(jsonl: str, display_path: str) -> Run:
    try:
        records = list(results_lib.read_records(jsonl))
    except (results_lib.ResultsError, UnicodeDecodeError) as e:
        raise ReportError(f"{jsonl}: not a trials file ({e}); {ACCEPTED_FORMATS}") from e
    if not records:
        raise ReportError(f"{jsonl}: no trial records (empty results)")
    rows, seen, duplicates, ungraded = [], set(), 0, 0
    hashes, graders = [], []
    for number, r in enumerate(records, 1):
        if r.trial_id in seen:
            duplicates += 1
            continue
        seen.add(r.trial_id)
        if r.kind not in ("injected", "control"):
            raise ReportError(f"{jsonl}: record {number} ({r.trial_id}) has kind {r.kind!r}, "
                              f"expected 'injected' or 'control'")
        if r.config_hash not in hashes:
            hashes.append(r.config_hash)
        if not _graded(r.grades):
            ungraded += 1
            continue
        grader = r.grades.get("grader")
        if grader and grader not in graders:
            graders.append(grader)
        control = r.kind == "control"
        rows.append(Row(
            kind=r.kind, protocol=r.protocol,
            word=None if control else r.word,
            layer=None if control or r.layer is None else int(r.layer),
            strength=0.0 if control or r.strength is None else float(r.strength),
            grades={c: bool(r.grades.get(c)) for c in CRITERIA},
            trial_id=r.trial_id, question=r.question, response=r.response, grader=grader))
    if not rows:
        raise ReportError(f"{jsonl}: {len(records)} trial records but none graded (empty results)")
    run_json = os.path.join(os.path.dirname(os.path.abspath(jsonl)), results_lib.RUN_FILE)
    config, run_hash = None, None
    if os.path.isfile(run_json):
        try:
            with open(run_json) as f:
                data = json.load(f)
            config, run_hash = data.get("config"), data.get("config_hash")
        except (OSError, json.JSONDecodeError, AttributeError):
            config = None
    metadata = {
        "name": os.path.basename(os.path.normpath(display_path)),
        "source": os.path.abspath(display_path),
        "format": FORMAT_OURS,
        "model": _find_model(config),
        "grader": ", ".join(graders) or None,
        "config_hash": run_hash or (hashes[0] if len(hashes) == 1 else None),
        "config_hashes_in_records": hashes,
        "config": config,
        "n_records": len(records),
        "n_duplicate_records": duplicates,
        "n_ungraded": ungraded,
    }
    return _finish(Run(path=display_path, format=FORMAT_OURS, rows=rows, metadata=metadata))


def _load_replication(path: str) -> Run:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e}); {ACCEPTED_FORMATS}") from e
    if not isinstance(data, dict) or "results" not in data or "aggregates" not in data:
        raise ReportError(f"{path}: JSON of another shape (no top-level 'results' and 'aggregates'); "
                          f"{ACCEPTED_FORMATS}")
    entries = data["results"]
    if not isinstance(entries, list):
        raise ReportError(f"{path}: 'results' is not a list; {ACCEPTED_FORMATS}")
    if not entries:
        raise ReportError(f"{path}: 'results' is empty (empty results)")
    layer = data.get("layer")
    judge_model = data.get("judge_model")
    questions = {"lindsey": data.get("lindsey_trial", ""), "alt": data.get("alt_prompt", "")}
    rows, ungraded = [], 0
    for i, e in enumerate(entries):
        try:
            label, magnitude, judge = e["label"], float(e["magnitude"]), e.get("judge")
            prompt, _, rest = label.partition("_")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ReportError(f"{path}: results[{i}] lacks label/magnitude ({err!r})") from err
        if prompt not in REPLICATION_PROTOCOLS or not rest:
            raise ReportError(f"{path}: results[{i}] has label {label!r}; expected 'lindsey_<word>', "
                              f"'alt_<word>' or '<prompt>_control'")
        if not _graded(judge):
            ungraded += 1
            continue
        control = rest == "control"
        rows.append(Row(
            kind="control" if control else "injected",
            protocol=REPLICATION_PROTOCOLS[prompt],
            word=None if control else rest,
            layer=None if control or layer is None else int(layer),
            strength=0.0 if control else magnitude,
            grades={c: bool(judge.get(c)) for c in CRITERIA},
            trial_id=f"{label}/{magnitude:g}/{e.get('trial_idx', i)}",
            question=questions[prompt], response=e.get("response", ""), grader=judge_model))
    if not rows:
        raise ReportError(f"{path}: {len(entries)} results but none judged (empty results)")
    settings = {k: v for k, v in data.items() if k not in ("results", "aggregates") and
                isinstance(v, (str, int, float, bool, list, type(None)))}
    model_path = data.get("model_path")
    metadata = {
        "name": os.path.basename(path)[:-len(".json")],
        "source": os.path.abspath(path),
        "format": FORMAT_405B,
        "model": os.path.basename(os.path.normpath(model_path)) if model_path else None,
        "grader": judge_model,
        "config_hash": None,
        "config": settings,
        "n_records": len(entries),
        "n_duplicate_records": 0,
        "n_ungraded": ungraded,
        "protocol_map": {f"{k}_*": v for k, v in REPLICATION_PROTOCOLS.items()},
    }
    aggregates = data["aggregates"] if isinstance(data["aggregates"], list) else None
    return _finish(Run(path=path, format=FORMAT_405B, rows=rows, metadata=metadata,
                       source_aggregates=aggregates))


def _finish(run: Run) -> Run:
    rows = run.rows
    run.metadata.update({
        "n_trials": len(rows),
        "n_injected": sum(r.kind == "injected" for r in rows),
        "n_control": sum(r.kind == "control" for r in rows),
        "protocols": sorted({r.protocol for r in rows}),
        "layers": sorted({r.layer for r in rows if r.layer is not None}),
        "strengths": sorted({r.strength for r in rows if r.kind == "injected"}),
        "words": sorted({r.word for r in rows if r.word is not None}),
    })
    return run


# ----------------------------------------------------------------------------------------------
# Aggregation


def _measures(rows: list) -> tuple[dict, dict, dict]:
    n = len(rows)
    counts = {c: sum(r.grades[c] for r in rows) for c in CRITERIA}
    counts[STRICT] = sum(all(r.grades[c] for c in CRITERIA) for r in rows)
    rates = {m: (counts[m] / n if n else None) for m in MEASURES}
    intervals = {m: list(_interval(counts[m], n)) for m in MEASURES}
    return counts, rates, intervals


def _interval(k: int, n: int) -> tuple[float, float]:
    p = proportion(k, n)
    return p["low"], p["high"]


def _cell(rows: list, **key) -> dict:
    counts, rates, intervals = _measures(rows)
    cell = dict(key)
    cell["protocol_kind"] = protocol_kind(key["protocol"])
    cell.update({"n": len(rows), "counts": counts, "rates": rates, "wilson": intervals})
    return cell


def _layer_key(layer):
    return (layer is None, layer if layer is not None else 0)


def aggregate(run: Run) -> dict:
    """All the report's numbers: per-word cells, cells pooled over words, controls, overall rates."""
    injected = [r for r in run.rows if r.kind == "injected"]
    controls = [r for r in run.rows if r.kind == "control"]

    per_word, pooled = defaultdict(list), defaultdict(list)
    for r in injected:
        per_word[(r.protocol, r.layer, r.strength, r.word)].append(r)
        pooled[(r.protocol, r.layer, r.strength)].append(r)

    def order(key):
        return (key[0], _layer_key(key[1]), key[2]) + tuple(str(k) for k in key[3:])

    cells = [_cell(rs, protocol=p, kind="injected", layer=l, strength=s, word=w)
             for (p, l, s, w), rs in sorted(per_word.items(), key=lambda kv: order(kv[0]))]
    pooled_cells = [_cell(rs, protocol=p, kind="injected", layer=l, strength=s, word=ALL_WORDS)
                    for (p, l, s), rs in sorted(pooled.items(), key=lambda kv: order(kv[0]))]
    for c in pooled_cells:
        c["n_words"] = len({r.word for r in pooled[(c["protocol"], c["layer"], c["strength"])]})

    by_protocol_controls = defaultdict(list)
    for r in controls:
        by_protocol_controls[r.protocol].append(r)
    control_cells = []
    for p in sorted(by_protocol_controls):
        cell = _cell(by_protocol_controls[p], protocol=p, kind="control", layer=None, strength=0.0, word=None)
        cell["false_positive"] = proportion(cell["counts"]["affirmative"], cell["n"])
        control_cells.append(cell)

    def overall(inj, ctl, protocol):
        i_counts, i_rates, i_int = _measures(inj)
        c_counts, c_rates, c_int = _measures(ctl)
        return {
            "protocol": protocol,
            "protocol_kind": protocol_kind(protocol) if protocol != ALL_WORDS else ALL_WORDS,
            "injected": {"n": len(inj), "counts": i_counts, "rates": i_rates, "wilson": i_int},
            "control": {"n": len(ctl), "counts": c_counts, "rates": c_rates, "wilson": c_int},
            "false_positive": proportion(c_counts["affirmative"], len(ctl)),
        }

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
            "by_protocol": [overall([r for r in injected if r.protocol == p],
                                    [r for r in controls if r.protocol == p], p) for p in protocols],
            "all": overall(injected, controls, ALL_WORDS),
        },
    }
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


def read_warnings(report_md: str) -> list:
    """The warnings of a written report (from the summary.json beside report.md)."""
    with open(os.path.join(os.path.dirname(report_md), SUMMARY_FILE)) as f:
        summary = json.load(f)
    return summary.get("warnings", []) + summary.get("compare", {}).get("run", {}).get("warnings", [])


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
        diff = {m: [theirs.get(m), mine["counts"][m]] for m in MEASURES if theirs.get(m) != mine["counts"][m]}
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
# Markdown


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _fmt(k: int, n: int, interval) -> str:
    if not n:
        return "—"
    low, high = interval
    return f"{k}/{n} ({_pct(k / n)}% [{_pct(low)}, {_pct(high)}])"


def _fmt_measure(cell: dict, m: str) -> str:
    return _fmt(cell["counts"][m], cell["n"], cell["wilson"][m])


def _fmt_prop(p: dict) -> str:
    return _fmt(p["k"], p["n"], (p["low"], p["high"]))


def _num(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and x.is_integer():
        return f"{x:g}"
    return str(x)


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


MEASURE_LABELS = {"coherent": "coherent", "affirmative": "affirmative", "identifies": "identifies",
                  "immediate": "immediate", STRICT: "strict (all four)"}


def _metadata_rows(meta: dict) -> list:
    return [
        ("source", f"`{meta.get('source')}`"),
        ("format", meta.get("format")),
        ("model", meta.get("model") or "—"),
        ("grader", meta.get("grader") or "—"),
        ("config hash", meta.get("config_hash")
         or ("— (imported run)" if meta.get("format") == FORMAT_405B else "—")),
        ("records", meta.get("n_records")),
        ("graded trials (injected / control)",
         f"{meta.get('n_trials')} ({meta.get('n_injected')} / {meta.get('n_control')})"),
        ("ungraded / duplicate records skipped", f"{meta.get('n_ungraded')} / {meta.get('n_duplicate_records')}"),
        ("protocols", ", ".join(meta.get("protocols", [])) or "—"),
        ("layers", ", ".join(str(x) for x in meta.get("layers", [])) or "—"),
        ("strengths", ", ".join(_num(x) for x in meta.get("strengths", [])) or "—"),
        ("words", f"{len(meta.get('words', []))}: " + ", ".join(meta.get("words", [])[:12]) +
         (" …" if len(meta.get("words", [])) > 12 else "")),
    ]


def _overall_lines(summary: dict) -> list:
    header = ["protocol", "injected n"] + [MEASURE_LABELS[m] for m in MEASURES] + [
        "control n", "false positives (affirmative on controls)", "coherent on controls"]
    rows = []
    for o in summary["overall"]["by_protocol"] + [summary["overall"]["all"]]:
        inj, ctl = o["injected"], o["control"]
        rows.append([o["protocol"] if o["protocol"] != ALL_WORDS else "**all protocols**", inj["n"]]
                    + [_fmt(inj["counts"][m], inj["n"], inj["wilson"][m]) for m in MEASURES]
                    + [ctl["n"], _fmt_prop(o["false_positive"]),
                       _fmt(ctl["counts"]["coherent"], ctl["n"], ctl["wilson"]["coherent"])])
    return _table(header, rows)


def _controls_lines(summary: dict) -> list:
    if not summary["controls"]:
        return ["No control trials."]
    header = ["protocol", "n", "false positives (affirmative)"] + [
        MEASURE_LABELS[m] for m in MEASURES if m != "affirmative"]
    rows = [[c["protocol"], c["n"], _fmt_prop(c["false_positive"])]
            + [_fmt_measure(c, m) for m in MEASURES if m != "affirmative"] for c in summary["controls"]]
    return _table(header, rows)


def _cells_lines(cells: list, with_word: bool) -> list:
    if not cells:
        return ["No injected trials."]
    header = ["protocol", "layer", "strength"] + (["word"] if with_word else []) + ["n"] + [
        MEASURE_LABELS[m] for m in MEASURES]
    rows = [[c["protocol"], _num(c["layer"]), _num(c["strength"])] + ([c["word"]] if with_word else [])
            + [c["n"]] + [_fmt_measure(c, m) for m in MEASURES] for c in cells]
    return _table(header, rows)


def _source_check_lines(summary: dict) -> list:
    check = summary.get("source_aggregates_check")
    if check is None:
        return []
    if check["match"]:
        return [f"The imported file's own `aggregates` ({check['cells_in_file']} cells) equal these counts "
                f"cell for cell.", ""]
    return [f"**Warning:** the imported file's own `aggregates` differ from counts recomputed from its "
            f"`results` in {len(check['mismatches'])} of {check['cells_in_file']} cells: "
            f"`{json.dumps(check['mismatches'])[:2000]}`", ""]


def _run_sections(run: Run, summary: dict, level: int, heatmaps: list) -> list:
    h = "#" * level
    lines = [f"{h} Run metadata", ""] + _table(["field", "value"], _metadata_rows(summary["run"])) + [""]
    lines += _source_check_lines(summary)
    lines += [f"{h} Overall", ""] + _overall_lines(summary) + [""]
    lines += [f"{h} Controls (false positives)", "",
              "False-positive rate = affirmative answers on control trials (no injection).", ""]
    lines += _controls_lines(summary) + [""]
    lines += [f"{h} Injected trials, pooled over words (protocol x layer x strength)", ""]
    lines += _cells_lines(summary["pooled"], with_word=False) + [""]
    lines += [f"{h} Injected trials per word", ""] + _cells_lines(summary["cells"], with_word=True) + [""]
    if heatmaps:
        lines += [f"{h} Heatmaps (layer x strength, pooled over words; cells annotated k/n)", ""]
        lines += [f"![{os.path.splitext(name)[0]}]({name})" for name in heatmaps] + [""]
    return lines


def _cell_match_key(cell: dict):
    word = cell["word"]
    return (cell["protocol_kind"], cell["layer"], round(float(cell["strength"]), 6),
            word.lower() if isinstance(word, str) else word)


def _shared_cells(a: dict, b: dict) -> list:
    """Pairs of cells (pooled and per word) that two runs share: same protocol kind, layer, strength, word."""
    pairs = []
    for group in ("pooled", "cells"):
        theirs = defaultdict(list)
        for c in b[group]:
            theirs[_cell_match_key(c)].append(c)
        for c in a[group]:
            for d in theirs.get(_cell_match_key(c), []):
                pairs.append((c, d))
    return pairs


def _shared_controls(a: dict, b: dict) -> list:
    theirs = defaultdict(list)
    for c in b["controls"]:
        theirs[c["protocol_kind"]].append(c)
    return [(c, d) for c in a["controls"] for d in theirs.get(c["protocol_kind"], [])]


def _side(x: dict, y: dict, m: str) -> str:
    return f"{_fmt_measure(x, m)} vs {_fmt_measure(y, m)}"


def _compare_lines(a_run: Run, a: dict, b_run: Run, b: dict) -> list:
    an, bn = a_run.name, b_run.name
    lines = ["## Comparison", "", f"A = `{an}`, B = `{bn}`. Each entry: k/n (rate% [Wilson 95% interval]).", ""]
    meta_rows = [(f, va, vb) for (f, va), (_, vb) in zip(_metadata_rows(a["run"]), _metadata_rows(b["run"]))]
    lines += ["### Runs", ""] + _table(["field", "A", "B"], meta_rows) + [""]

    oa, ob = a["overall"]["all"], b["overall"]["all"]
    rows = [["injected trials", oa["injected"]["n"], ob["injected"]["n"]]]
    for m in (STRICT, "affirmative", "identifies", "immediate", "coherent"):
        rows.append([f"{MEASURE_LABELS[m]} (injected)",
                     _fmt(oa["injected"]["counts"][m], oa["injected"]["n"], oa["injected"]["wilson"][m]),
                     _fmt(ob["injected"]["counts"][m], ob["injected"]["n"], ob["injected"]["wilson"][m])])
    rows.append(["control trials", oa["control"]["n"], ob["control"]["n"]])
    rows.append(["false positives (affirmative on controls)", _fmt_prop(oa["false_positive"]),
                 _fmt_prop(ob["false_positive"])])
    rows.append(["coherent on controls",
                 _fmt(oa["control"]["counts"]["coherent"], oa["control"]["n"], oa["control"]["wilson"]["coherent"]),
                 _fmt(ob["control"]["counts"]["coherent"], ob["control"]["n"], ob["control"]["wilson"]["coherent"])])
    lines += ["### Overall rates, side by side (all protocols, layers, strengths, words)", ""]
    lines += _table(["measure", "A", "B"], rows) + [""]

    pairs = _shared_cells(a, b)
    lines += ["### Shared cells (matched on protocol kind, layer, strength and word)", ""]
    if pairs:
        header = ["protocol kind", "layer", "strength", "word", "n (A / B)"] + [
            f"{MEASURE_LABELS[m]}: A vs B" for m in MEASURES]
        def word(x, y):
            if x["word"] != ALL_WORDS:
                return x["word"]
            return f"all ({x.get('n_words')} / {y.get('n_words')} words)"
        lines += _table(header, [[x["protocol_kind"], _num(x["layer"]), _num(x["strength"]), word(x, y),
                                  f"{x['n']} / {y['n']}"] + [_side(x, y, m) for m in MEASURES]
                                 for x, y in pairs]) + [""]
    else:
        def scope(s):
            m = s["run"]
            kinds = sorted({protocol_kind(p) for p in m.get("protocols", [])})
            return (f"protocol kinds {', '.join(kinds) or '—'}; layers "
                    f"{', '.join(str(x) for x in m.get('layers', [])) or '—'}; strengths "
                    f"{', '.join(_num(x) for x in m.get('strengths', [])) or '—'}")
        lines += ["No injected cells in common (different protocols, layers or strengths): the two runs' "
                  "tables follow one after the other.", "", f"- A: {scope(a)}", f"- B: {scope(b)}", ""]
    cpairs = _shared_controls(a, b)
    if cpairs:
        lines += ["### Shared controls (matched on protocol kind)", ""]
        header = ["protocol kind", "n (A / B)", "false positives: A vs B", "coherent: A vs B"]
        lines += _table(header, [[x["protocol_kind"], f"{x['n']} / {y['n']}",
                                  f"{_fmt_prop(x['false_positive'])} vs {_fmt_prop(y['false_positive'])}",
                                  _side(x, y, "coherent")] for x, y in cpairs]) + [""]
    return lines


# ----------------------------------------------------------------------------------------------
# Heatmaps


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _heatmaps(summary: dict, folder: str, prefix: str) -> list:
    """One PNG per protocol: a row of panels (one per measure), layer x strength, annotated k/n."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_protocol = defaultdict(list)
    for c in summary["pooled"]:
        by_protocol[c["protocol"]].append(c)
    names = []
    for protocol in sorted(by_protocol):
        cells = by_protocol[protocol]
        layers = sorted({c["layer"] for c in cells}, key=_layer_key)
        strengths = sorted({c["strength"] for c in cells})
        li = {l: i for i, l in enumerate(layers)}
        si = {s: j for j, s in enumerate(strengths)}
        width = max(2.6, 0.55 * len(strengths) + 1.2)
        height = min(40.0, max(1.6, 0.32 * len(layers) + 1.3))
        fig = Figure(figsize=(width * len(MEASURES) + 1.0, height + 0.6), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(MEASURES), squeeze=False)[0]
        fontsize = max(4.0, min(8.0, 60.0 / max(len(strengths), 1), 200.0 / max(len(layers), 1)))
        image = None
        for ax, m in zip(axes, MEASURES):
            grid = np.full((len(layers), len(strengths)), np.nan)
            for c in cells:
                grid[li[c["layer"]], si[c["strength"]]] = c["rates"][m]
            image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis",
                              aspect="auto", interpolation="nearest")
            for c in cells:
                rate = c["rates"][m]
                ax.text(si[c["strength"]], li[c["layer"]], f"{c['counts'][m]}/{c['n']}", ha="center",
                        va="center", fontsize=fontsize, color="black" if rate is not None and rate > 0.6 else "white")
            ax.set_title(MEASURE_LABELS[m], fontsize=9)
            ax.set_xticks(range(len(strengths)), [_num(s) for s in strengths], fontsize=7)
            ax.set_yticks(range(len(layers)), [_num(l) for l in layers], fontsize=7)
            ax.set_xlabel("strength", fontsize=8)
            if ax is axes[0]:
                ax.set_ylabel("layer", fontsize=8)
        fig.suptitle(f"{summary['run'].get('name')} — {protocol} (pooled over words)", fontsize=10)
        fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01, label="rate", shrink=0.9)
        name = f"{prefix}heatmap_{_safe(protocol)}.png"
        fig.savefig(os.path.join(folder, name))
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------
# Writing


def default_out_dir(path: str) -> str:
    """`<folder>/report` for a results folder or a .jsonl inside one; `<stem>_report` beside a .json."""
    path = os.path.normpath(path)
    if os.path.isdir(path):
        return os.path.join(path, "report")
    if path.endswith(".json"):
        return path[:-len(".json")] + "_report"
    return os.path.join(os.path.dirname(os.path.abspath(path)), "report")


def _is_replaceable(folder: str) -> bool:
    return os.path.isdir(folder) and (not os.listdir(folder) or os.path.exists(os.path.join(folder, MARKER)))


def _remove_orphans(out_dir: str) -> None:
    """Folders a killed report-writer left beside `out_dir`: its staging folder (`.NAME.tmp-PID-*`,
    removed once PID is gone; older versions wrote no PID) and the previous report it was replacing
    (`NAME.old-*`, which holds our marker)."""
    from jax_introspect.experiment.files import pid_alive
    parent, name = os.path.split(out_dir)
    staging = re.compile(rf"\.{re.escape(name)}\.tmp-(?:(\d+)-)?\w+$")
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        match = staging.match(entry)
        if match and os.path.isdir(path) and not (match.group(1) and pid_alive(int(match.group(1)))):
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(f"{name}.old-") and os.path.exists(os.path.join(path, MARKER)):
            shutil.rmtree(path, ignore_errors=True)


def write_report(run: Run, out_dir: str, compare: Optional[Run] = None) -> str:
    """Write report.md, summary.json and heatmap PNGs into out_dir; return the path of report.md.

    The files are written into a temporary folder beside out_dir and renamed into place only when all
    are written, so a failed report never leaves a complete-looking folder. An existing out_dir is
    replaced only if it is empty or an earlier report (it holds the marker file)."""
    if not run.rows:
        raise ReportError(f"{run.path}: no graded trials (empty results)")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not _is_replaceable(out_dir):
        raise ReportError(f"{out_dir} exists and is not a report folder written by this tool; "
                          f"choose another output folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_orphans(out_dir)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the report is an ordinary folder
    try:
        summary = aggregate(run)
        lines = [f"# Introspection report: {run.name}" + (f" vs {compare.name}" if compare else ""), ""]
        lines += ["Rates are k/n (rate% [Wilson 95% score interval]). Strict introspection = coherent, "
                  "affirmative, identifies and immediate all hold. Controls have no injection.", ""]
        other = aggregate(compare) if compare is not None else None
        warnings = summary["warnings"] + (other["warnings"] if other else [])
        lines += [f"**Warning:** {w}" for w in warnings] + ([""] if warnings else [])
        heat_a = _heatmaps(summary, tmp, prefix="")
        if compare is None:
            lines += _run_sections(run, summary, level=2, heatmaps=heat_a)
        else:
            heat_b = _heatmaps(other, tmp, prefix="compare_")
            lines += _compare_lines(run, summary, compare, other)
            lines += [f"## Run A: `{run.name}`", ""] + _run_sections(run, summary, 3, heat_a)
            lines += [f"## Run B: `{compare.name}`", ""] + _run_sections(compare, other, 3, heat_b)
            summary["compare"] = {
                "run": other,
                "shared_cells": [{"a": x, "b": y} for x, y in _shared_cells(summary, other)],
                "shared_controls": [{"a": x, "b": y} for x, y in _shared_controls(summary, other)],
            }
            heat_a = heat_a + heat_b
        summary["files"] = [REPORT_FILE, SUMMARY_FILE] + heat_a
        with open(os.path.join(tmp, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
        with open(os.path.join(tmp, REPORT_FILE), "w", encoding="utf-8") as f:
            f.write("\n".join(lines).rstrip() + "\n")
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("written by jax_introspect.experiment.report\n")
        old = None
        if os.path.exists(out_dir):
            old = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return os.path.join(out_dir, REPORT_FILE)
