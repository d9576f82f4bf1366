"""Reports over graded trials: per-cell rates with Wilson intervals, as markdown, JSON and heatmaps.

The jobs live in their own modules: `runs` loads either input format into rows, `aggregation` counts
them into the summary, `render` draws report.md and the heatmaps; this module writes the report
folder, whole or not at all.

    run = load_run(path)                 # -> Run(rows, metadata)
    summary = aggregate(run)             # -> dict (the numbers of summary.json)
    write_report(run, out_dir, compare=None)  # -> path of report.md
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional

from jax_introspect import folders
from jax_introspect.experiment import aggregation, readout_report, render
from jax_introspect.experiment.aggregation import aggregate
from jax_introspect.experiment.runs import ReportError, Row, Run, load_run

__all__ = ["MARKER", "REPORT_FILE", "SUMMARY_FILE", "ReportError", "Row", "Run", "aggregate", "default_out_dir",
           "load_run", "read_warnings", "write_report"]

MARKER = ".jax_introspect_report"
REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"


def default_out_dir(path: str) -> str:
    """`<folder>/report` for a results folder or a .jsonl inside one; `<stem>_report` beside a .json."""
    path = os.path.normpath(path)
    if os.path.isdir(path):
        return os.path.join(path, "report")
    if path.endswith(".json"):
        return path[:-len(".json")] + "_report"
    return os.path.join(os.path.dirname(os.path.abspath(path)), "report")


def read_warnings(report_md: str) -> list:
    """The warnings of a written report (from the summary.json beside report.md)."""
    with open(os.path.join(os.path.dirname(report_md), SUMMARY_FILE)) as f:
        summary = json.load(f)
    return summary.get("warnings", []) + summary.get("compare", {}).get("run", {}).get("warnings", [])


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


def _inspect_files(runs: list, folder: str, inspect: Optional[bool]) -> dict:
    """The Inspect logs and viewer (`inspect_log.write_logs`) into `folder`, or why not: `inspect`
    True requires them, None writes them when inspect_ai is importable, False skips them."""
    from jax_introspect.experiment import inspect_log
    if inspect is False:
        return {"reason": "not requested (--noinspect)"}
    reason = inspect_log.unavailable()
    if reason:
        if inspect:
            raise inspect_log.InspectUnavailable(reason)
        return {"reason": reason}
    return inspect_log.write_logs(runs, folder)


def _write_files(run: Run, folder: str, compare: Optional[Run], inspect: Optional[bool] = None) -> None:
    """report.md, summary.json, the heatmaps, the Inspect logs and viewer, and the marker, into `folder`."""
    summary = aggregate(run)
    other = aggregate(compare) if compare is not None else None
    heatmaps = render.heatmaps(summary, folder, prefix="")
    other_heatmaps = render.heatmaps(other, folder, prefix="compare_") if other is not None else []
    readout_plots = readout_report.plots(summary.get("readout"), folder, "", run.name)  # named in the summaries
    if other is not None:
        readout_plots += readout_report.plots(other.get("readout"), folder, "compare_", compare.name)
    inspect_info = _inspect_files([run] + ([compare] if compare is not None else []), folder, inspect)
    text = render.markdown(run, summary, heatmaps, compare, other, other_heatmaps, inspect=inspect_info)
    text, extra_files = _with_experiments(run, summary, folder, text)
    if other is not None:
        summary["compare"] = aggregation.comparison(summary, other)
    summary["inspect"] = inspect_info
    summary["files"] = [REPORT_FILE, SUMMARY_FILE] + heatmaps + other_heatmaps + readout_plots + extra_files + \
        inspect_info.get("logs", []) + ([inspect_info["viewer"]] if inspect_info.get("viewer") else [])
    with open(os.path.join(folder, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    with open(os.path.join(folder, REPORT_FILE), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(folder, MARKER), "w") as f:
        f.write("written by jax_introspect.experiment.report\n")


def _with_experiments(run: Run, summary: dict, folder: str, text: str) -> tuple[str, list]:
    """report.md with the sections of Lindsey's other experiments (lindsey_experiments.py) appended
    (alone, when the run holds no injected-thought trials); their numbers go into summary.json."""
    if not run.metadata.get("n_experiment_records"):
        return text, []
    from jax_introspect.experiment import lindsey_experiments
    lines, files, numbers = lindsey_experiments.report_sections(run.metadata["records_file"], folder)
    summary["lindsey_experiments"] = numbers
    if not run.rows:
        text = f"# Introspection report: {run.name}\n\nModel: {run.metadata.get('model')}\n\n"
    return text.rstrip() + "\n\n" + "\n".join(lines).rstrip() + "\n", files


def write_report(run: Run, out_dir: str, compare: Optional[Run] = None, inspect: Optional[bool] = None) -> str:
    """Write report.md, summary.json and heatmap PNGs into out_dir; return the path of report.md.
    With inspect_ai importable (or `inspect` True, which requires it; False skips them), also the runs'
    Inspect logs (inspect_logs/*.eval) and a static viewer of them (inspect_viewer/index.html).

    The files are written into a temporary folder beside out_dir and renamed into place only when all
    are written, so a failed report never leaves a complete-looking folder. An existing out_dir is
    replaced only if it is empty or an earlier report (it holds the marker file)."""
    if not run.rows and not run.metadata.get("n_experiment_records"):
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
        _write_files(run, tmp, compare, inspect)
        folders.swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, REPORT_FILE)
