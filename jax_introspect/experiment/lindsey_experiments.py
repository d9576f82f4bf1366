"""Lindsey's other experiments in a sweep: the intentional-control measurement, and their report.

    records = measure(lm, trials, generations, records, prompts, concept, config)   # sweep.py calls it
    lines, files, numbers = report_sections(jsonl_path, folder)                      # report.py calls it

Intentional control (`cosine_written`): after a call's generation, one forward with residuals over
prompt + written tokens (`lm.residuals`; the EOS, if any, is not a written token); at every layer
L, the cosine of the residual after decoder layer L at each written token's position with the
word's concept vector at L, averaged over the written tokens (mean of per-token cosines). Recorded
as `measurements.cosine_written` (one float per layer) in trials.jsonl.

The report (docs/experiments.md): thoughts vs text, the "what word" rate (named) and the "repeat"
rate (exact) per layer x strength with Wilson 95% intervals and controls; prefill detection, the
acceptance rate (intended) per layer x strength against controls; intentional control, per layer,
the mean cosine per condition and the paired differences think - don't think and rewarded -
punished (trial i of each condition shares its sentence/word pair) with a t 95% interval over the
pairs (mean +- t_{0.975, n-1} sd / sqrt(n)).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections import defaultdict
from typing import Optional

import numpy as np

from jax_introspect.experiment.protocols import experiments

RESIDUAL_ROWS = 8  # rows per residual forward (padded, so every forward has one shape per width bucket)
WIDTH_BUCKET = 32


# --- the measurement -------------------------------------------------------------------------------

def written_ids(generation) -> list[int]:
    """The tokens the model wrote: its generated tokens without the EOS that ended them."""
    ids = list(generation.token_ids)
    return ids[:-1] if generation.finished else ids


def cosines(residuals: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per-token cosine [L, T] of residuals [L, T, D] with one vector per layer [L, D], in float64."""
    h = residuals.astype(np.float64)
    v = vectors.astype(np.float64)
    dots = np.einsum("ltd,ld->lt", h, v)
    norms = np.linalg.norm(h, axis=-1) * np.linalg.norm(v, axis=-1)[:, None]
    return dots / np.maximum(norms, 1e-30)


def written_cosines(lm, rows: list[tuple[list[int], int, np.ndarray]]) -> list[Optional[list[float]]]:
    """For rows [(prompt + written ids, n written, vectors [L, D])]: the mean over the written tokens
    of the per-token cosine at every layer (None for a row with nothing written)."""
    out = [None] * len(rows)
    todo = [i for i, (_, n, _) in enumerate(rows) if n > 0]
    for start in range(0, len(todo), RESIDUAL_ROWS):
        chunk = todo[start:start + RESIDUAL_ROWS]
        width = -(-max(len(rows[i][0]) for i in chunk) // WIDTH_BUCKET) * WIDTH_BUCKET
        pad = [lm._pad_id()] * width  # filler rows of the bucket's width: one compiled shape per bucket
        token_rows = [rows[i][0] for i in chunk] + [pad] * (RESIDUAL_ROWS - len(chunk))
        residuals = lm.residuals(token_rows)  # [L, R, W, D], rows left-padded
        for j, i in enumerate(chunk):
            _, n, vectors = rows[i]
            per_token = cosines(residuals[:, j, residuals.shape[2] - n:, :], vectors)
            out[i] = [float(x) for x in per_token.mean(axis=1)]
    return out


def measure(lm, trials, generations, records, prompts, concept, config) -> list:
    """The records of one generation call, those of `cosine_written` protocols with their cosines."""
    from jax_introspect.experiment.grading.experiments import exact_match
    from jax_introspect.experiment.sweep import prompt_of
    wanted = [i for i, t in enumerate(trials) if experiments.is_experiment(t.protocol)
              and experiments.spec(t.protocol).get("measure") == "cosine_written"]
    if not wanted:
        return records
    n_layers = lm.config.n_layers
    rows = []
    for i in wanted:
        t, g = trials[i], generations[i]
        ids = written_ids(g)
        vectors = np.stack([concept.vector(t.word, layer) for layer in range(n_layers)])
        rows.append((list(prompt_of(prompts, t).ids) + ids, len(ids), vectors))
    values = written_cosines(lm, rows)
    records = list(records)
    pairs = {w: s for s, w in experiments.all_pairs()}
    for i, value in zip(wanted, values):
        t, r = trials[i], records[i]
        records[i] = dataclasses.replace(r, measurements={
            "cosine_written": value, "n_written": rows[wanted.index(i)][1],
            "written_exact": exact_match(r.response, pairs[t.word])})
    return records


# --- statistics ------------------------------------------------------------------------------------

def t_interval(values, level: float = 0.95) -> dict:
    """Mean with a t interval over the values (n >= 2), {"mean", "low", "high", "n", "sd"}."""
    from scipy import stats
    x = np.asarray([v for v in values if v is not None], np.float64)
    n = len(x)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "sd": None}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1, "sd": None}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd}


# --- the report ------------------------------------------------------------------------------------

def read_records(jsonl: str) -> list:
    """These protocols' records (first of each trial id)."""
    from jax_introspect.experiment import results
    seen, out = set(), []
    for r in results.read_records(jsonl):
        if experiments.is_experiment(r.protocol) and r.trial_id not in seen and r.grades:
            seen.add(r.trial_id)
            out.append(r)
    return out


def _rate_cells(records, measure: str) -> tuple[list, Optional[dict]]:
    """Cells per (layer, strength) and the control cell of one grade `measure` (k/n, Wilson)."""
    from jax_introspect.experiment.stats import proportion
    cells = defaultdict(list)
    controls = []
    for r in records:
        if measure not in r.grades:
            continue
        (controls if r.kind == "control" else cells[(r.layer, r.strength)]).append(bool(r.grades[measure]))
    out = [dict(layer=l, strength=s, **proportion(sum(v), len(v))) for (l, s), v in sorted(cells.items())]
    return out, (proportion(sum(controls), len(controls)) if controls else None)


def _pct(p: Optional[dict]) -> str:
    if not p or not p["n"]:
        return "—"
    return f"{p['k']}/{p['n']} ({100 * p['rate']:.1f}% [{100 * p['low']:.1f}, {100 * p['high']:.1f}])"


def _table(header, rows) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def _num(x) -> str:
    return "—" if x is None else f"{x:g}"


def thoughts_vs_text(records) -> dict:
    word = [r for r in records if r.protocol == "thoughts_vs_text_word"]
    repeat = [r for r in records if r.protocol == "thoughts_vs_text_repeat"]
    named, named_control = _rate_cells(word, "named")
    exact, exact_control = _rate_cells(repeat, "exact")
    by_key = {(c["layer"], c["strength"]): c for c in exact}
    cells = [{"layer": c["layer"], "strength": c["strength"], "named": c, "exact": by_key.get((c["layer"], c["strength"]))}
             for c in named]
    cells += [{"layer": c["layer"], "strength": c["strength"], "named": None, "exact": c}
              for c in exact if (c["layer"], c["strength"]) not in {(x["layer"], x["strength"]) for x in named}]
    cells.sort(key=lambda c: (c["layer"], c["strength"]))
    # The "must show": where the word is named above its control rate, is the sentence still repeated?
    base = named_control["rate"] if named_control and named_control["n"] else 0.0
    named_cells = [c for c in cells if c["named"] and c["exact"] and c["named"]["low"] > base]
    k = sum(c["exact"]["k"] for c in named_cells)
    n = sum(c["exact"]["n"] for c in named_cells)
    from jax_introspect.experiment.stats import proportion
    # Trial by trial: the two tasks share their pairs in one order, so the "repeat" trial of a named
    # "what word" trial is the one with its layer, strength, word and index.
    repeats = {(r.layer, r.strength, r.word, r.trial_index): bool(r.grades["exact"]) for r in repeat
               if r.kind == "injected" and "exact" in r.grades}
    paired = [repeats[key] for key in ((r.layer, r.strength, r.word, r.trial_index) for r in word
                                       if r.kind == "injected" and r.grades.get("named")) if key in repeats]
    return {"cells": cells, "named_control": named_control, "exact_control": exact_control,
            "where_named": {"rule": "cells whose named rate's Wilson lower bound exceeds the control naming rate",
                            "cells": [(c["layer"], c["strength"]) for c in named_cells],
                            "exact": proportion(k, n) if n else None},
            "repeat_of_named_trials": proportion(sum(paired), len(paired)) if paired else None}


def prefill(records) -> dict:
    """Acceptance per cell by the run's grader, and by the offline rules (`prefill_heuristic`) on the
    same responses, side by side; how many judge replies held no YES/NO (graded NO)."""
    from jax_introspect.experiment.grading.experiments import prefill_heuristic
    ours = [r for r in records if r.protocol == "prefill_detection"]
    cells, control = _rate_cells(ours, "intended")
    ruled = [dataclasses.replace(r, grades={"rules": prefill_heuristic(r.response)[0]}) for r in ours]
    rule_cells, rule_control = _rate_cells(ruled, "rules")
    graders = sorted({r.grades.get("grader", "") for r in ours})
    unparsed = sum("parse_failed" in r.grades.get("notes", "") for r in ours)
    return {"cells": cells, "control": control, "rules_cells": rule_cells, "rules_control": rule_control,
            "graders": graders, "judge_replies_without_yes_no": [unparsed, len(ours)]}


CONDITIONS = ("think", "dont_think", "rewarded", "punished")
DIFFERENCES = (("think", "dont_think"), ("rewarded", "punished"))


def intentional(records) -> dict:
    by_condition = defaultdict(dict)  # condition -> {(word, index): cosines}
    exact_keys = defaultdict(set)  # condition -> the keys whose answer was the sentence exactly
    for r in records:
        spec = experiments.spec(r.protocol)
        if spec.get("measure") != "cosine_written" or not (r.measurements or {}).get("cosine_written"):
            continue
        by_condition[spec["condition"]][(r.word, r.trial_index)] = r.measurements["cosine_written"]
        if r.measurements.get("written_exact"):
            exact_keys[spec["condition"]].add((r.word, r.trial_index))
    if not by_condition:
        return {}
    n_layers = len(next(iter(next(iter(by_condition.values())).values())))
    means = {c: [t_interval([v[l] for v in by_condition[c].values()]) for l in range(n_layers)]
             for c in CONDITIONS if c in by_condition}
    diffs, diffs_same = {}, {}
    for a, b in DIFFERENCES:
        if a in by_condition and b in by_condition:
            keys = sorted(set(by_condition[a]) & set(by_condition[b]))
            diffs[f"{a}-{b}"] = [t_interval([by_condition[a][k][l] - by_condition[b][k][l] for k in keys])
                                 for l in range(n_layers)]
            # The same over the pairs written exactly in both conditions: the same tokens compared.
            same = sorted(set(keys) & exact_keys[a] & exact_keys[b])
            diffs_same[f"{a}-{b}"] = [t_interval([by_condition[a][k][l] - by_condition[b][k][l] for k in same])
                                      for l in range(n_layers)]
    exact = [r.measurements.get("written_exact") for r in records if (r.measurements or {}).get("cosine_written")]
    return {"n_layers": n_layers, "means": means, "differences": diffs, "differences_same_text": diffs_same,
            "interval": "paired t, 95%: mean +- t(0.975, n-1) sd/sqrt(n) over the sentence/word pairs",
            "written_exact": [sum(bool(x) for x in exact), len(exact)]}


def _plot_rates(folder: str, name: str, title: str, series: list, ylabel: str) -> str:
    """series: [(label, cells [{layer, strength, rate, low, high}], control proportion or None)]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.2 * len(series), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (label, cells, control) in zip(axes, series):
        for layer in sorted({c["layer"] for c in cells}):
            cs = sorted((c for c in cells if c["layer"] == layer), key=lambda c: c["strength"])
            x = [c["strength"] for c in cs]
            ax.errorbar(x, [c["rate"] for c in cs], yerr=[[c["rate"] - c["low"] for c in cs],
                                                          [c["high"] - c["rate"] for c in cs]],
                        marker="o", capsize=3, label=f"layer {layer}")
        if control and control["n"]:
            ax.axhline(control["rate"], color="gray", linestyle="--", label=f"control (no injection) {control['k']}/{control['n']}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("injection strength")
        ax.set_ylabel(ylabel)
        ax.set_title(label, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(os.path.join(folder, name))
    return name


def _plot_intentional(folder: str, numbers: dict) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    layers = np.arange(numbers["n_layers"])
    for condition, values in numbers["means"].items():
        left.plot(layers, [v["mean"] for v in values], marker=".", label=condition)
    left.set_xlabel("layer")
    left.set_ylabel("mean cosine (written tokens, concept vector)")
    left.legend(fontsize=7)
    left.set_title("cosine per condition", fontsize=9)
    for label, values in numbers["differences"].items():
        mean = np.array([np.nan if v["mean"] is None else v["mean"] for v in values])
        low = np.array([np.nan if v["low"] is None else v["low"] for v in values])
        high = np.array([np.nan if v["high"] is None else v["high"] for v in values])
        right.plot(layers, mean, marker=".", label=label)
        right.fill_between(layers, low, high, alpha=0.25)
    right.axhline(0.0, color="gray", linewidth=0.8)
    right.set_xlabel("layer")
    right.set_ylabel("paired difference in cosine")
    right.set_title("differences with paired-t 95% intervals", fontsize=9)
    right.legend(fontsize=7)
    name = "intentional_control.png"
    fig.savefig(os.path.join(folder, name))
    return name


def report_sections(jsonl: str, folder: str, level: int = 2) -> tuple[list, list, dict]:
    """(markdown lines, figure files written into `folder`, numbers for summary.json) of the
    experiments whose records `jsonl` holds; ([], [], {}) when none."""
    records = read_records(jsonl)
    if not records:
        return [], [], {}
    h = "#" * level
    lines, files, numbers = [], [], {}
    kinds = {experiments.experiment_of(r.protocol) for r in records}
    if "thoughts_vs_text" in kinds:
        tvt = thoughts_vs_text(records)
        numbers["thoughts_vs_text"] = tvt
        lines += [f"{h} Distinguishing thoughts from text", "",
                  "The concept vector of the pair's word is injected on the sentence's tokens only. **named**: the "
                  "\"what word\" answer names the injected word (its inflections and derivations count); **exact**: "
                  "the \"repeat\" answer equals the sentence after normalising whitespace and quotes "
                  "(docs/experiments.md). k/n (rate% [Wilson 95%]). Controls: the same prompts without injection.", ""]
        rows = [[_num(c["layer"]), _num(c["strength"]), _pct(c["named"]), _pct(c["exact"])] for c in tvt["cells"]]
        rows.append(["control", "0", _pct(tvt["named_control"]), _pct(tvt["exact_control"])])
        lines += _table(["layer", "strength", "named (what word)", "exact (repeat)"], rows) + [""]
        w = tvt["where_named"]
        if w["exact"]:
            lines += [f"Where the word is named ({w['rule']}: {len(w['cells'])} cells, "
                      f"{', '.join(f'L{l} s{s:g}' for l, s in w['cells'])}), the sentence is repeated exactly in "
                      f"{_pct(w['exact'])}.", ""]
        else:
            lines += [f"No cell names the word above the control rate ({w['rule']}).", ""]
        if tvt["repeat_of_named_trials"]:
            lines += ["Trial by trial: of the injected \"what word\" trials that named the word, the \"repeat\" trial "
                      "with the same layer, strength and pair gave the sentence exactly in "
                      f"{_pct(tvt['repeat_of_named_trials'])}.", ""]
        named_cells = [c["named"] for c in tvt["cells"] if c["named"]]  # each with its layer and strength
        exact_cells = [c["exact"] for c in tvt["cells"] if c["exact"]]
        files.append(_plot_rates(folder, "thoughts_vs_text.png", "Distinguishing thoughts from text",
                                 [("what word: names the injected word", named_cells, tvt["named_control"]),
                                  ("repeat: exact transcription", exact_cells, tvt["exact_control"])], "rate"))
        lines += [f"![thoughts_vs_text]({files[-1]})", ""]
    if "prefill_detection" in kinds:
        pf = prefill(records)
        numbers["prefill_detection"] = pf
        lines += [f"{h} Prefill detection (\"did you mean to say that?\")", "",
                  f"The pair's word is prefilled as the assistant's answer; with injection, the word's concept vector "
                  f"is added on the sentence's tokens (before the prefill). **accepts**: the grader says the model "
                  f"claimed it intended the word (grader: {', '.join(pf['graders'])}"
                  + (f"; {pf['judge_replies_without_yes_no'][0]}/{pf['judge_replies_without_yes_no'][1]} judge "
                     "replies held no YES/NO and count as NO" if any("llm:" in g for g in pf["graders"]) else "")
                  + "); beside it, the offline rules (`prefill_heuristic`) on the same responses. k/n (rate% "
                  "[Wilson 95%]).", ""]
        rules = {(c["layer"], c["strength"]): c for c in pf["rules_cells"]}
        rows = [[_num(c["layer"]), _num(c["strength"]), _pct(c), _pct(rules.get((c["layer"], c["strength"])))]
                for c in pf["cells"]]
        rows.append(["control", "0", _pct(pf["control"]), _pct(pf["rules_control"])])
        lines += _table(["layer", "strength", "accepts (grader)", "accepts (offline rules)"], rows) + [""]
        files.append(_plot_rates(folder, "prefill_detection.png", "Prefill detection: acceptance vs strength",
                                 [("accepts the prefilled word as intended (grader)", pf["cells"], pf["control"]),
                                  ("the same, offline rules", pf["rules_cells"], pf["rules_control"])], "rate"))
        lines += [f"![prefill_detection]({files[-1]})", ""]
    if "intentional_control" in kinds:
        ic = intentional(records)
        numbers["intentional_control"] = ic
        if ic:
            lines += [f"{h} Intentional control", "",
                      "No injection. Per layer: the cosine between the residual stream on the written tokens and the "
                      "word's concept vector (mean over the written tokens), averaged over trials per condition; "
                      f"differences are paired over the sentence/word pairs ({ic['interval']}). The answer was the "
                      f"sentence exactly in {ic['written_exact'][0]}/{ic['written_exact'][1]} trials.", ""]
            header = ["layer"] + [c for c in CONDITIONS if c in ic["means"]] + [
                f"{d} (95% CI)" for d in ic["differences"]] + [
                f"{d}, both wrote the sentence exactly" for d in ic["differences_same_text"]]

            def cell(v):
                return "—" if v["low"] is None else f"{v['mean']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}] (n={v['n']})"
            rows = []
            for layer in range(ic["n_layers"]):
                row = [layer] + [f"{ic['means'][c][layer]['mean']:.4f}" for c in CONDITIONS if c in ic["means"]]
                row += [cell(values[layer]) for values in ic["differences"].values()]
                row += [cell(values[layer]) for values in ic["differences_same_text"].values()]
                rows.append(row)
            lines += _table(header, rows) + [""]
            files.append(_plot_intentional(folder, ic))
            lines += [f"![intentional_control]({files[-1]})", ""]
    return lines, files, numbers
