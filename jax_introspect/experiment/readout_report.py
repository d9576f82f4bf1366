"""The report's readout section: p_yes / p_no and the logit lens (`readout.py`) per cell and on controls.

    section = summarize(run.rows)          # summary.json's "readout" (None: no record has a readout)
    lines = markdown_lines(section, "##")  # report.md's tables
    names = plots(section, folder, prefix, title)   # (also section["plots"]) p_yes against strength per layer, controls as a band

The readout is a function of a trial's prompt and injection only, so trials of one cell with the
same word carry the same value: a cell's mean is over its trials, its 95% interval a Student-t
interval over its distinct words' means (the independent units; None with fewer than two words).
Controls read one clean prompt per protocol: one value, no sampling interval (a band of zero
width). The lens: the fraction of a cell's trials whose injected word's token (any of its first
tokens, `readout.word_token_ids`) is in the top-k at the injected layer (Wilson interval), against
the fraction of the same trials whose word token is in the top-k of the controls' lens at that
layer (the same prompt without injection).
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from typing import Optional

from jax_introspect.experiment.stats import LEVEL, proportion


def mean_interval(values: list) -> dict:
    """{"mean", "low", "high", "n"}: the mean of `values` and its Student-t 95% interval (None below 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    from scipy import stats as scipy_stats
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(scipy_stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / math.sqrt(n)
    # clipped to [0, 1]: every value averaged here is a probability
    return {"mean": mean, "low": max(0.0, mean - half), "high": min(1.0, mean + half), "n": n}


def _over_words(rows: list, value) -> dict:
    """The trials' mean; the interval over the distinct words' means (`mean_interval`)."""
    by_word = defaultdict(list)
    for r in rows:
        by_word[r.word].append(value(r))
    interval = mean_interval([sum(v) / len(v) for v in by_word.values()])
    values = [value(r) for r in rows]
    return dict(interval, mean=sum(values) / len(values), n_trials=len(rows), n_words=len(by_word))


def _lens_at(row, layer: int) -> Optional[dict]:
    return next((lens for lens in row.readout["lens"] if lens["layer"] == layer), None)


def summarize(rows: list) -> Optional[dict]:
    """summary.json's "readout": cells (protocol, layer, strength) and controls (protocol), or None."""
    rows = [r for r in rows if r.readout]
    if not rows:
        return None
    injected = defaultdict(list)
    controls = defaultdict(list)
    for r in rows:
        (injected[(r.protocol, r.layer, r.strength)] if r.kind == "injected" else controls[r.protocol]).append(r)
    control_top = {}  # (protocol, layer) -> the controls' top-k ids there
    control_cells = []
    for protocol in sorted(controls):
        group = controls[protocol]
        layers = sorted({lens["layer"] for r in group for lens in r.readout["lens"]})
        for layer in layers:
            tops = {tuple(_lens_at(r, layer)["top_ids"]) for r in group if _lens_at(r, layer)}
            control_top[(protocol, layer)] = set().union(*tops)
        control_cells.append({
            "protocol": protocol, "n_trials": len(group),
            "p_yes": mean_interval([r.readout["p_yes"] for r in group]),
            "p_no": mean_interval([r.readout["p_no"] for r in group]),
            "lens_top_tokens": {str(layer): _lens_at(group[0], layer)["top_tokens"] for layer in layers
                                if _lens_at(group[0], layer)}})
    cells = []
    for (protocol, layer, strength) in sorted(injected, key=lambda k: (k[0], k[1], k[2])):
        group = injected[(protocol, layer, strength)]
        in_top = sum(_lens_at(r, layer)["word_rank"] <= len(_lens_at(r, layer)["top_ids"]) for r in group)
        cell = {"protocol": protocol, "layer": layer, "strength": strength,
                "p_yes": _over_words(group, lambda r: r.readout["p_yes"]),
                "p_no": _over_words(group, lambda r: r.readout["p_no"]),
                "word_in_top_k": proportion(in_top, len(group)),
                "word_prob": _over_words(group, lambda r: _lens_at(r, layer)["word_prob"]),
                "word_rank_median": sorted(_lens_at(r, layer)["word_rank"] for r in group)[len(group) // 2]}
        top = control_top.get((protocol, layer))
        if top is not None:
            baseline = sum(bool(top & set(_lens_at(r, layer)["word_token_ids"])) for r in group)
            cell["control_word_in_top_k"] = proportion(baseline, len(group))
        cells.append(cell)
    top_k = max(len(lens["top_ids"]) for r in rows for lens in r.readout["lens"])
    return {"cells": cells, "controls": control_cells, "top_k": top_k,
            "interval": "p: mean over trials, Student-t 95% over distinct words' means; lens: Wilson 95%"}


def _mean(m: dict, form: str = ".4f") -> str:
    if m["low"] is None:
        return f"{m['mean']:{form}}"
    return f"{m['mean']:{form}} [{m['low']:{form}}, {m['high']:{form}}]"


def _prop(p: dict) -> str:
    return f"{p['k']}/{p['n']} ({100 * p['rate']:.1f}% [{100 * p['low']:.1f}, {100 * p['high']:.1f}])"


def markdown_lines(section: Optional[dict], h: str) -> list:
    if not section:
        return []
    from jax_introspect.experiment.render import _num, _table
    k = section["top_k"]
    lines = [f"{h} Detection probability and logit lens (first answer token)", "",
             "p_yes / p_no: softmax probability of the yes-like / no-like first answer tokens (the sets are in "
             "readout.json beside trials.jsonl) at the last prompt position; mean over trials with a Student-t 95% "
             "interval over the cell's distinct words (a trial's readout depends on its prompt and injection only). "
             "Controls read the clean prompt: one value. Logit lens: the residual after the injected layer at "
             f"that position through the final norm and unembedding; `word in top-{k}`: the injected word's "
             "token among its top tokens, against the same words in the controls' lens at that layer "
             "(no injection).", ""]
    if section["controls"]:
        # (tables of this section lead with another column than the protocol: the run's tables key on it)
        lines += _table(["controls", "protocol", "trials", "p_yes", "p_no"],
                        [["controls", c["protocol"], c["n_trials"], _mean(c["p_yes"]), _mean(c["p_no"])]
                         for c in section["controls"]]) + [""]
    lines += _table(["layer", "strength", "protocol", "n (words)", "p_yes", "p_no", f"word in top-{k}",
                     f"word in controls' top-{k}", "word prob (lens)", "median word rank"],
                    [[_num(c["layer"]), _num(c["strength"]), c["protocol"],
                      f"{c['p_yes']['n_trials']} ({c['p_yes']['n_words']})", _mean(c["p_yes"]), _mean(c["p_no"]),
                      _prop(c["word_in_top_k"]),
                      _prop(c["control_word_in_top_k"]) if "control_word_in_top_k" in c else "—",
                      _mean(c["word_prob"], ".2e"), c["word_rank_median"]] for c in section["cells"]]) + [""]
    names = section.get("plots", [])
    lines += [f"![{os.path.splitext(name)[0]}]({name})" for name in names] + ([""] if names else [])
    return lines


def plots(section: Optional[dict], folder: str, prefix: str, title: str) -> list:
    """Draw and name them in section["plots"]. One PNG per protocol: p_yes against strength, a line per layer (95% intervals), the controls'
    value as a grey band; beside it the fraction of trials with the word in the lens' top-k."""
    if not section:
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    by_protocol = defaultdict(list)
    for c in section["cells"]:
        by_protocol[c["protocol"]].append(c)
    controls = {c["protocol"]: c for c in section["controls"]}
    names = []
    for protocol in sorted(by_protocol):
        fig = Figure(figsize=(10, 3.8), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax_p, ax_lens = fig.subplots(1, 2)
        by_layer = defaultdict(list)
        for c in by_protocol[protocol]:
            by_layer[c["layer"]].append(c)
        for layer in sorted(by_layer):
            cells = sorted(by_layer[layer], key=lambda c: c["strength"])
            xs = [c["strength"] for c in cells]
            ys = [c["p_yes"]["mean"] for c in cells]
            err = [[y - (c["p_yes"]["low"] if c["p_yes"]["low"] is not None else y) for c, y in zip(cells, ys)],
                   [(c["p_yes"]["high"] if c["p_yes"]["high"] is not None else y) - y for c, y in zip(cells, ys)]]
            ax_p.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"layer {layer}")
            line = ax_lens.plot(xs, [c["word_in_top_k"]["rate"] for c in cells], marker="o", label=f"layer {layer}")
            if all("control_word_in_top_k" in c for c in cells):
                ax_lens.plot(xs, [c["control_word_in_top_k"]["rate"] for c in cells], linestyle="--",
                             color=line[0].get_color(), label=f"layer {layer}, controls' lens")
        control = controls.get(protocol)
        if control:
            p = control["p_yes"]
            low, high = (p["low"], p["high"]) if p["low"] is not None else (p["mean"], p["mean"])
            ax_p.axhspan(low, high, color="grey", alpha=0.3)
            ax_p.axhline(p["mean"], color="grey", linestyle="--", label="controls (no injection)")
        ax_p.set_xlabel("strength")
        ax_p.set_ylabel("p_yes (first answer token)")
        ax_p.legend(fontsize=7)
        ax_lens.set_xlabel("strength")
        ax_lens.set_ylabel(f"word in lens top-{section['top_k']}")
        ax_lens.set_ylim(-0.05, 1.05)
        ax_lens.legend(fontsize=7)
        fig.suptitle(f"{title} — {protocol}: detection probability and logit lens", fontsize=10)
        name = f"{prefix}readout_{re.sub(r'[^A-Za-z0-9_.-]+', '_', protocol)}.png"
        fig.savefig(os.path.join(folder, name))
        names.append(name)
    section["plots"] = names
    return names
