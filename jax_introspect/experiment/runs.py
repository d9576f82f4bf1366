"""Graded trials from any file that holds them, in one row shape: `Run` of `Row`s.

Two input formats:
  * our results: a results folder (holding `trials.jsonl` and `run.json`) or a `trials.jsonl` file;
  * the judged JSON of the public Llama-3.1-405B replication (top-level `results`, and `aggregates`
    when the path alone must tell it apart), whose labels map as: "lindsey_<word>" -> protocol
    `replication_405b_injected_thought`, "alt_<word>" -> `replication_405b_thinking_about` ("What are
    you thinking about?"), "<prompt>_control" -> a control trial (word None, layer None, strength 0).

    run = load_run(path)                  # either format, detected from the path
    run = load_replication(path, judged)  # a judged replication file, with the caller's rule of "judged"
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

from jax_introspect.experiment import results as results_lib

CRITERIA = tuple(results_lib.CRITERIA)  # coherent, affirmative, identifies, immediate
FORMAT_OURS = "jax_introspect"
FORMAT_405B = "replication_405b_judged"
REPLICATION_PROTOCOLS = {
    "lindsey": "replication_405b_injected_thought",
    "alt": "replication_405b_thinking_about",
}
ACCEPTED_FORMATS = (
    "accepted formats: a results folder holding trials.jsonl; a trials .jsonl file; or the judged .json of "
    "the 405B replication (a JSON object with top-level 'results' and 'aggregates')")


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
    trial_index: Optional[int] = None  # the trial's number within its cell
    strict_definition: str = "lindsey"  # whose definition of strict introspection its grader follows
    readout: Optional[dict] = None  # first-answer-token readouts (readout.py), when recorded


# Strict introspection, by whose definition (`STRICT_DEFINITIONS[name]` -> the measure that holds it):
#   "lindsey": the paper's, COHERENCE and AFFIRMATIVE + CORRECT ID (our `immediate`) — the paper's
#              grader prompts and the heuristic, which approximates them;
#   "replication": the 405B replication's, all four of its judge's booleans.
STRICT_DEFINITIONS = ("lindsey", "replication")


def strict_definition_of(grades: dict, default: str) -> str:
    """The definition a grade was made under: the grade says it (graders write
    `strict_definition`); older records: a replication judge's grades are the replication's,
    every other grader asked the paper's questions."""
    named = grades.get("strict_definition")
    if named in STRICT_DEFINITIONS:
        return named
    return "replication" if str(grades.get("grader", "")).startswith("replication:") else default


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


def replication_prompt(protocol: str) -> str:
    """The replication's own name of a protocol its file maps to: 'lindsey' or 'alt'."""
    return next(prompt for prompt, p in REPLICATION_PROTOCOLS.items() if p == protocol)


def replication_label(protocol: str, word: Optional[str]) -> str:
    """The label of a replication trial or cell as its file spells it: 'lindsey_love', 'alt_control'."""
    return f"{replication_prompt(protocol)}_{word or 'control'}"


def has_grades(entry: dict) -> bool:
    """The report's rule for a judged replication entry: its judge gave at least one criterion."""
    return _graded(entry.get("judge"))


# ----------------------------------------------------------------------------------------------
# Either format, from the path


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
        data = _read_json(path)
        # Only the pair of keys tells a replication file from any other JSON of that name.
        if not isinstance(data, dict) or "results" not in data or "aggregates" not in data:
            raise ReportError(f"{path}: JSON of another shape (no top-level 'results' and 'aggregates'); "
                              f"{ACCEPTED_FORMATS}")
        return _replication_run(path, data, has_grades)
    raise ReportError(f"{path}: unknown format (not a folder, .jsonl or .json); {ACCEPTED_FORMATS}")


def load_replication(path: str, judged: Callable[[dict], bool] = has_grades) -> Run:
    """A judged replication file named as such (its `aggregates` may be absent). `judged(entry)` says
    which `results` entries count; the others are counted as ungraded."""
    data = _read_json(path)
    if not isinstance(data, dict) or "results" not in data:
        raise ReportError(f"{path}: not a judged replication file (no top-level 'results'); {ACCEPTED_FORMATS}")
    return _replication_run(path, data, judged)


# ----------------------------------------------------------------------------------------------
# Our results


def _graded(grades) -> bool:
    return isinstance(grades, dict) and any(c in grades and grades[c] is not None for c in CRITERIA)


def _bound_value(config, key: str):
    """A binding field of a run config, or of its first arm that has it ({"arms": [...]})."""
    if not isinstance(config, dict):
        return None
    if key in config:
        return config[key]
    return next((a[key] for a in config.get("arms", []) if isinstance(a, dict) and key in a), None)


def _find_model(config) -> Optional[str]:
    """The model named in a run config: the first of a few usual keys, searched depth-first (into
    lists too: a run of several arms binds {"arms": [...]})."""
    if isinstance(config, list):
        return next((m for m in map(_find_model, config) if m), None)
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


def _read_run_json(jsonl: str) -> tuple[Optional[dict], Optional[str]]:
    """(config, config hash) of the run.json beside a trials file; (None, None) when absent or unreadable:
    the trials alone still make a report."""
    run_json = os.path.join(os.path.dirname(os.path.abspath(jsonl)), results_lib.RUN_FILE)
    if not os.path.isfile(run_json):
        return None, None
    try:
        with open(run_json) as f:
            data = json.load(f)
        return data.get("config"), data.get("config_hash")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None, None


def _load_ours(jsonl: str, display_path: str) -> Run:
    try:
        records = list(results_lib.read_records(jsonl))
    except (results_lib.ResultsError, UnicodeDecodeError) as e:
        raise ReportError(f"{jsonl}: not a trials file ({e}); {ACCEPTED_FORMATS}") from e
    if not records:
        raise ReportError(f"{jsonl}: no trial records (empty results)")
    rows, seen, duplicates, ungraded = [], set(), 0, 0
    hashes, graders = [], []
    from jax_introspect.experiment.protocols.experiments import is_experiment
    n_experiment = 0  # Lindsey's other experiments: reported in their own sections (lindsey_experiments.py)
    for number, r in enumerate(records, 1):
        if r.trial_id in seen:
            duplicates += 1
            continue
        seen.add(r.trial_id)
        if is_experiment(r.protocol):
            n_experiment += 1
            continue
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
            trial_id=r.trial_id, question=r.question, response=r.response, grader=grader,
            trial_index=r.trial_index, strict_definition=strict_definition_of(r.grades, "lindsey"),
            readout=r.readout))
    if not rows and not n_experiment:
        raise ReportError(f"{jsonl}: {len(records)} trial records but none graded (empty results)")
    config, run_hash = _read_run_json(jsonl)
    metadata = {
        "name": os.path.basename(os.path.normpath(display_path)),
        "source": os.path.abspath(display_path),
        "format": FORMAT_OURS,
        "model": _find_model(config),
        # Bound only when set (sweep.binding): absent means no adapter, dequantized weights.
        "adapter": _bound_value(config, "adapter") or "none",
        "numerics": _bound_value(config, "numerics") or "dequantized",
        "grader": ", ".join(graders) or None,
        "config_hash": run_hash or (hashes[0] if len(hashes) == 1 else None),
        "config_hashes_in_records": hashes,
        "config": config,
        "n_records": len(records),
        "n_duplicate_records": duplicates,
        "n_ungraded": ungraded,
        "n_experiment_records": n_experiment,
        "records_file": os.path.abspath(jsonl),
    }
    return _add_scope(Run(path=display_path, format=FORMAT_OURS, rows=rows, metadata=metadata))


# ----------------------------------------------------------------------------------------------
# The 405B replication's judged file


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e}); {ACCEPTED_FORMATS}") from e


def _replication_run(path: str, data: dict, judged: Callable[[dict], bool]) -> Run:
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
            label, magnitude, trial_index = e["label"], float(e["magnitude"]), int(e.get("trial_idx", i))
            prompt, _, rest = label.partition("_")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ReportError(f"{path}: results[{i}] lacks label/magnitude or has a bad trial_idx ({err!r})") from err
        if prompt not in REPLICATION_PROTOCOLS or not rest:
            raise ReportError(f"{path}: results[{i}] has label {label!r}; expected 'lindsey_<word>', "
                              f"'alt_<word>' or '<prompt>_control'")
        if not judged(e):
            ungraded += 1
            continue
        control = rest == "control"
        rows.append(Row(
            kind="control" if control else "injected",
            protocol=REPLICATION_PROTOCOLS[prompt],
            word=None if control else rest,
            layer=None if control or layer is None else int(layer),
            strength=0.0 if control else magnitude,
            grades={c: bool(e["judge"].get(c)) for c in CRITERIA},
            # the file's layer and position too: unique across the files of a layer sweep
            trial_id=f"L{layer}/{label}/{magnitude:g}/{trial_index}/{i}",
            question=questions[prompt], response=e.get("response", ""), grader=judge_model,
            trial_index=trial_index, strict_definition="replication"))
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
    aggregates = data.get("aggregates") if isinstance(data.get("aggregates"), list) else None
    return _add_scope(Run(path=path, format=FORMAT_405B, rows=rows, metadata=metadata,
                          source_aggregates=aggregates))


def _add_scope(run: Run) -> Run:
    """Counts and the protocols, layers, strengths and words the rows cover, into the metadata."""
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
