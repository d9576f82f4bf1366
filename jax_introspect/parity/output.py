"""Writing a parity report: parity.json, parity.md and parity.png."""
from __future__ import annotations

import json
import os

from jax_introspect.experiment import aggregation
from jax_introspect.parity.replication import REPLICATION_FIELDS


def _cell_table(leading: list, rows: list) -> list:
    """Markdown lines: per (leading columns, cell) its leading columns, then the rate of each criterion
    and of strict introspection."""
    def line(values):
        return "| " + " | ".join(str(x) for x in values) + " |"
    header = [*leading, *aggregation.CRITERIA, "strict"]
    body = [line([*lead, *(_fmt(cell.get(m)) for m in aggregation.MEASURES)]) for lead, cell in rows]
    return [line(header), "|" + "---|" * len(header)] + body


def _warning_lines(summary: dict) -> list:
    return [f"**Warning:** {w}" for w in summary.get("warnings", [])] + ([""] if summary.get("warnings") else [])


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def to_markdown(report: dict) -> str:
    lines = ["# jax_introspect vs reference", ""]
    ref = report.get("reference")
    if ref:
        run = ref.get("run", {})
        lines += [f"- checkpoint: `{report['checkpoint']}`",
                  f"- reference: `{ref['path']}` (model `{ref['model']}`{', ' + ref['gguf_file'] if ref.get('gguf_file') else ''}; "
                  f"{run.get('device')} {run.get('dtype')}, torch {run.get('torch')}, transformers {run.get('transformers')}"
                  f"{', ' + run['gpu'] if run.get('gpu') else ''})",
                  f"- prompts: {len(ref['prompts'])}; injection cases: {len(ref['cases'])} "
                  f"({', '.join(ref['cases'][:6])}{' ...' if len(ref['cases']) > 6 else ''}); "
                  f"concept words: {', '.join(ref['words']) or '-'}; residual layers: {ref['residual_layers']}"]
        for k, v in report.get("checks", {}).items():
            lines.append(f"- check {k}: {v}")
        rule = report["jump_rule"]
        lines += [f"- jump rule: first layer with e_l >= floor and e_l >= {rule['factor']:g} x median(e_0..e_l-1), "
                  f"e = {rule['metric']}; floors {rule['floors']}", ""]
        runs = report["runs"]
        names = list(runs)
        lines += ["## Summary", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        keys = list(dict.fromkeys(k for r in runs.values() for k in r["summary"]))
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_fmt(runs[n]["summary"].get(k)) for n in names) + " |")
        for name, run in runs.items():
            lines += ["", f"## {name} (checkpoint loaded as {run['checkpoint_dtype']}, {run['seconds']} s)", ""]
            for group in ("clean", "injected"):
                if group not in run:
                    continue
                g = run[group]
                jump = g["jump"]["where"] or "none"
                lines += [f"### {group}: residuals per layer (first jump: {jump})", "",
                          "| layer | max abs | mean abs | rel err max | rel err mean | cos min | cos mean |",
                          "|---|---|---|---|---|---|---|"]
                for s in g["layers"]:
                    lines.append(f"| {s['layer']} | {_fmt(s['max_abs'])} | {_fmt(s['mean_abs'])} | {_fmt(s['rel_err_max'])} "
                                 f"| {_fmt(s['rel_err_mean'])} | {s['cos_min']:.8f} | {s['cos_mean']:.8f} |")
                lg = g["logits"]
                lines += ["", f"logits ({lg['n']} positions): max abs {_fmt(lg['max_abs'])}, mean KL {_fmt(lg['kl_mean'])}, "
                          f"top-1 {lg['top1']:.4f}, top-5 overlap {lg['top5']:.4f}", ""]
            if "concept_vectors" in run:
                cv = run["concept_vectors"]
                lines += [f"concept vectors ({', '.join(cv['words'])}): cosine min {cv['cos_min']:.8f}, mean "
                          f"{cv['cos_mean']:.8f}; relative error max {_fmt(cv['rel_err_max'])}", ""]
            lines += ["### greedy continuations", "", "| prompt | case | identical | first divergence | tokens ref/ours "
                      "| step logits max abs | step KL |", "|---|---|---|---|---|---|---|"]
            for c in run["continuations"]:
                lines.append(f"| {c['prompt']} | {c['case']} | {_fmt(c['identical'])} | {_fmt(c['first_divergence'])} | "
                             f"{c['ref_len']}/{c['ours_len']} | {_fmt(c['step_logits_max_abs'])} | {_fmt(c['step_kl_mean'])} |")
    rep = report.get("replication")
    if rep:
        lines += ["", "## 405B replication (GPU run)", ""]
        lines += [f"- {k}: {rep[k]}" for k in REPLICATION_FIELDS if k in rep] + [""] + _warning_lines(rep)
        lines += _cell_table(["label", "magnitude", "n"], [([c["label"], f"{c['magnitude']:g}", c["n"]], c)
                                                           for c in rep["cells"]])
    ours = report.get("our_results")
    if ours:
        lines += ["", f"## our run (`{ours['path']}`)", ""] + _warning_lines(ours)
        lines += _cell_table(["label", "layer", "strength", "n"],
                             [([c["label"], _fmt(c["layer"]), f"{c['magnitude']:g}", c["n"]], c) for c in ours["cells"]])
    vecs = report.get("replication_vectors")
    if vecs:
        lines += ["", "## replication vectors", "", "| name | file | layer | d_model | norm | raw norm | cos(pos, neg) "
                  "| cosine with ours |", "|---|---|---|---|---|---|---|---|"]
        for v in vecs:
            lines.append(f"| {v['name']} | {v['file']} | {_fmt(v['layer'])} | {v['d_model']} | {_fmt(v['norm'])} | "
                         f"{_fmt(v['raw_norm'])} | {_fmt(v['pos_neg_cosine'])} | {_fmt(v['cosine_with_ours'])}"
                         f"{' (' + v['note'] + ')' if v.get('note') else ''} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> str:
    """Per-layer residual relative error and 1 - cosine (log scale)."""
    import matplotlib.ticker
    from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    for dtype, run in report.get("runs", {}).items():
        for group, style in (("clean", "-"), ("injected", "--")):
            if group not in run:
                continue
            layers = [s["layer"] for s in run[group]["layers"]]
            rel = [max(s["rel_err_max"], 1e-12) for s in run[group]["layers"]]
            cos = [max(1 - s["cos_min"], 1e-16) for s in run[group]["layers"]]
            axes[0].plot(layers, rel, style, marker=".", label=f"{dtype} {group}")
            axes[1].plot(layers, cos, style, marker=".", label=f"{dtype} {group}")
            jump = run[group]["jump"]["layer"]
            if jump is not None:
                axes[0].axvline(jump, color="red", alpha=0.4)
                axes[0].annotate(f"{dtype} {group}: jump at {jump}", (jump, max(rel)), color="red", fontsize=8)
    for ax, title in zip(axes, ("residual relative error (max over tokens)", "1 - cosine (min over tokens)")):
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(report: dict, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "parity.json"), "markdown": os.path.join(out, "parity.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False, default=str)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(to_markdown(report))
    if report.get("runs"):
        paths["plot"] = plot(report, os.path.join(out, "parity.png"))
    return paths
