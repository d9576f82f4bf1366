"""A report's text and pictures from its numbers: report.md's markdown and the heatmap PNGs.

    text = markdown(run, summary, heatmaps=names)                        # one run
    text = markdown(run, summary, names, compare, other, other_names)    # A/B, side by side
    names = heatmaps(summary, folder, prefix)                            # -> the PNG files written
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Optional, Sequence

from jax_introspect.experiment.aggregation import (ALL_WORDS, MEASURES, STRICT, STRICT_LINDSEY, STRICT_MEASURE,
                                                   layer_key, shared_cells, shared_controls)
from jax_introspect.experiment.runs import FORMAT_405B, Run
from jax_introspect.experiment import transcripts

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
                  "immediate": "immediate", STRICT: "strict (all four)",
                  STRICT_LINDSEY: "strict (Lindsey: coherent + immediate)"}
DEFINITION_LABELS = {"lindsey": "Lindsey's (coherent and AFFIRMATIVE + CORRECT ID = `immediate`)",
                     "replication": "the 405B replication's (all four of its judge's booleans)"}
STRICT_NOTE = ("Two definitions of strict introspection are shown side by side: **strict (all four)** = coherent, "
               "affirmative, identifies and immediate all hold (the 405B replication's); **strict (Lindsey)** = "
               "coherent and `immediate`, the paper's AFFIRMATIVE + CORRECT ID answer (Lindsey 2026's). Each "
               "protocol's own definition, the one its grader follows, is named in the tables' "
               "\"grader's strict\" column.")


def _own_strict(cell: dict) -> str:
    """The definition a cell's grader follows, and which column holds it."""
    names = cell.get("strict_definitions") or []
    return "; ".join(f"{DEFINITION_LABELS[d].split(' (')[0]} → {MEASURE_LABELS[STRICT_MEASURE[d]]}"
                     for d in names) or "—"


def _metadata_rows(meta: dict) -> list:
    return [
        ("source", f"`{meta.get('source')}`"),
        ("format", meta.get("format")),
        ("model", meta.get("model") or "—"),
        ("adapter", meta.get("adapter") or "—"),
        ("numerics", meta.get("numerics") or "—"),
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
    header = ["protocol", "grader's strict", "injected n"] + [MEASURE_LABELS[m] for m in MEASURES] + [
        "control n", "false positives (affirmative on controls)", "coherent on controls"]
    rows = []
    for o in summary["overall"]["by_protocol"] + [summary["overall"]["all"]]:
        inj, ctl = o["injected"], o["control"]
        rows.append([o["protocol"] if o["protocol"] != ALL_WORDS else "**all protocols**", _own_strict(o), inj["n"]]
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
    header = ["protocol", "layer", "strength"] + (["word"] if with_word else []) + ["n", "grader's strict"] + [
        MEASURE_LABELS[m] for m in MEASURES]
    rows = [[c["protocol"], _num(c["layer"]), _num(c["strength"])] + ([c["word"]] if with_word else [])
            + [c["n"], _own_strict(c)] + [_fmt_measure(c, m) for m in MEASURES] for c in cells]
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


def _run_sections(summary: dict, level: int, heatmaps: Sequence[str]) -> list:
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
    from jax_introspect.experiment import readout_report
    lines += readout_report.markdown_lines(summary.get("readout"), h)
    return lines


def _side(x: dict, y: dict, m: str) -> str:
    return f"{_fmt_measure(x, m)} vs {_fmt_measure(y, m)}"


def _compare_lines(a_run: Run, a: dict, b_run: Run, b: dict) -> list:
    an, bn = a_run.name, b_run.name
    lines = ["## Comparison", "", f"A = `{an}`, B = `{bn}`. Each entry: k/n (rate% [Wilson 95% interval]).", ""]
    meta_rows = [(f, va, vb) for (f, va), (_, vb) in zip(_metadata_rows(a["run"]), _metadata_rows(b["run"]))]
    lines += ["### Runs", ""] + _table(["field", "A", "B"], meta_rows) + [""]

    oa, ob = a["overall"]["all"], b["overall"]["all"]
    rows = [["injected trials", oa["injected"]["n"], ob["injected"]["n"]]]
    for m in (STRICT, STRICT_LINDSEY, "affirmative", "identifies", "immediate", "coherent"):
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

    pairs = shared_cells(a, b)
    lines += ["### Shared cells (matched on protocol, layer, strength and word)", "",
              "Cells meet only within one protocol: two protocols' strengths are on different scales.", ""]
    if pairs:
        header = ["protocol", "layer", "strength", "word", "n (A / B)", "grader's strict (A / B)"] + [
            f"{MEASURE_LABELS[m]}: A vs B" for m in MEASURES]
        def word(x, y):
            if x["word"] != ALL_WORDS:
                return x["word"]
            return f"all ({x.get('n_words')} / {y.get('n_words')} words)"
        lines += _table(header, [[x["protocol"], _num(x["layer"]), _num(x["strength"]), word(x, y),
                                  f"{x['n']} / {y['n']}", f"{_own_strict(x)} / {_own_strict(y)}"]
                                 + [_side(x, y, m) for m in MEASURES] for x, y in pairs]) + [""]
    else:
        def scope(s):
            m = s["run"]
            return (f"protocols {', '.join(m.get('protocols', [])) or '—'}; layers "
                    f"{', '.join(str(x) for x in m.get('layers', [])) or '—'}; strengths "
                    f"{', '.join(_num(x) for x in m.get('strengths', [])) or '—'}")
        lines += ["No injected cells in common (different protocols, layers or strengths): the two runs' "
                  "tables follow one after the other.", "", f"- A: {scope(a)}", f"- B: {scope(b)}", ""]
    cpairs = shared_controls(a, b)
    if cpairs:
        lines += ["### Shared controls (matched on protocol)", ""]
        header = ["protocol", "n (A / B)", "false positives: A vs B", "coherent: A vs B"]
        lines += _table(header, [[x["protocol"], f"{x['n']} / {y['n']}",
                                  f"{_fmt_prop(x['false_positive'])} vs {_fmt_prop(y['false_positive'])}",
                                  _side(x, y, "coherent")] for x, y in cpairs]) + [""]
    return lines


def inspect_lines(inspect: Optional[dict]) -> list:
    """report.md's section on the run's Inspect logs and viewer (or why there are none)."""
    if inspect is None:
        return []
    lines = ["## Transcripts in Inspect's log viewer", ""]
    if inspect.get("logs"):
        lines += ["Every graded trial is a sample of an Inspect log (`inspect_ai`), with its chat messages, response, "
                  "a score per criterion and for strict introspection (both definitions, with the grader's notes), "
                  "and its metadata (protocol, word, layer, strength, vector method, injection window and start "
                  "token, seed, trial id, n_tokens, finished):", ""]
        lines += [f"- [`{p}`]({p})" for p in inspect["logs"]]
        lines += ["", f"Static viewer, opens from disk with no server and no network (logs embedded): "
                  f"[`{inspect['viewer']}`]({inspect['viewer']}). With inspect-ai installed, "
                  f"`inspect view --log-dir {os.path.dirname(inspect['logs'][0])}` serves the logs too.", ""]
    else:
        lines += [f"No Inspect logs written: {inspect.get('reason')}.", ""]
    return lines


def markdown(run: Run, summary: dict, heatmaps: Sequence[str], compare: Optional[Run] = None,
             other: Optional[dict] = None, compare_heatmaps: Sequence[str] = (),
             inspect: Optional[dict] = None) -> str:
    """report.md: the warnings, then one run's tables and quoted transcripts, or with `compare`
    (summary `other`) the two side by side followed by each run's tables and transcripts; then the
    section on the Inspect logs (`inspect`: {"logs", "viewer"} or {"reason"}), if given."""
    lines = [f"# Introspection report: {run.name}" + (f" vs {compare.name}" if compare else ""), ""]
    lines += ["Rates are k/n (rate% [Wilson 95% score interval]). Controls have no injection.", "", STRICT_NOTE, ""]
    warnings = summary["warnings"] + (other["warnings"] if other else [])
    lines += [f"**Warning:** {w}" for w in warnings] + ([""] if warnings else [])
    if compare is None:
        lines += _run_sections(summary, level=2, heatmaps=heatmaps)
        lines += transcripts.section(run.rows, summary, level=2)
    else:
        lines += _compare_lines(run, summary, compare, other)
        lines += [f"## Run A: `{run.name}`", ""] + _run_sections(summary, 3, heatmaps)
        lines += transcripts.section(run.rows, summary, level=3)
        lines += [f"## Run B: `{compare.name}`", ""] + _run_sections(other, 3, compare_heatmaps)
        lines += transcripts.section(compare.rows, other, level=3)
    lines += inspect_lines(inspect)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# Heatmaps


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def heatmaps(summary: dict, folder: str, prefix: str) -> list:
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
        layers = sorted({c["layer"] for c in cells}, key=layer_key)
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
