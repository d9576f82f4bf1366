"""The 405B replication's artifacts beside a TPU run: its judged trials and ours (read and counted
by the experiment side's loaders) and its torch `.pt` concept vectors."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from jax_introspect.experiment import aggregation, runs
from jax_introspect.experiment.vectors import ConceptVectors, read_pt_vectors  # sweeps inject such files too
from jax_introspect.parity.reference import ParityError


def pt_to_concept_vectors(paths: Sequence[str]):
    """ConceptVectors-like arrays from .pt files: vectors [n, 1, D] (each file's single layer);
    the layers go in metadata['layers']. (A sweep reads such files with
    `vectors.vectors_from_files`, which checks them against its words, layers and width.)"""
    rows = [r for p in paths for r in read_pt_vectors(p)]
    dims = {r["vector"].shape[-1] for r in rows}
    if len(dims) != 1 or any(r["vector"].ndim != 1 for r in rows):
        raise ParityError(f"vector files hold vectors of shapes {sorted({r['vector'].shape for r in rows})}; "
                          "expected one [d_model] vector each")
    return ConceptVectors(names=[r["name"] for r in rows], vectors=np.stack([r["vector"] for r in rows])[:, None, :],
                          metadata={"method": "replication_pt", "layers": [r.get("layer") for r in rows],
                                    "files": [r["file"] for r in rows],
                                    "info": [{k: v for k, v in r.items() if k != "vector"} for r in rows]})


def replication_vectors_summary(paths: Sequence[str], ours=None, layer: Optional[int] = None) -> list[dict]:
    """One row per replication vector: its layer, size, norm and, given our ConceptVectors, the
    cosine with ours of the same name at that layer."""
    rows = []
    for r in (r for p in paths for r in read_pt_vectors(p)):
        v = r["vector"].astype(np.float64)
        row = {"name": r["name"], "file": os.path.basename(r["file"]), "layer": r.get("layer", layer),
               "d_model": int(v.shape[-1]), "norm": float(np.linalg.norm(v)), "raw_norm": r.get("raw_norm"),
               "pos_neg_cosine": r.get("pos_neg_cosine"), "cosine_with_ours": None}
        at = layer if layer is not None else r.get("layer")
        if ours is not None and r["name"] in ours.names and at is not None:
            if ours.vectors.shape[-1] != v.shape[-1]:
                row["note"] = f"ours has d_model {ours.vectors.shape[-1]}: another model"
            elif not 0 <= at < ours.vectors.shape[1]:
                row["note"] = f"layer {at} outside our vectors' {ours.vectors.shape[1]} layers"
            else:
                w = ours.vector(r["name"], at).astype(np.float64)
                row["cosine_with_ours"] = float(v @ w / max(np.linalg.norm(v) * np.linalg.norm(w), 1e-30))
        rows.append(row)
    return rows


REPLICATION_FIELDS = ("model_path", "layer", "magnitudes", "n_trials", "n_control_trials", "temperature", "top_p",
                       "max_new_tokens", "norm_match", "judge_model", "timestamp", "n_errors", "alt_prompt")


def replication_summary(path: str) -> dict:
    """The replication's judged JSON: its run settings and per-cell rates, counted from its judged
    trials (a disagreement with the file's own `aggregates` is among the warnings)."""
    if not os.path.isfile(path):
        raise ParityError(f"replication results {path} not found")
    run = runs.load_replication(path)
    settings = run.metadata["config"]
    return {"path": os.path.abspath(path), **{k: settings[k] for k in REPLICATION_FIELDS if k in settings},
            "n_results": run.metadata["n_records"], **_cell_rates(run)}


def our_results_summary(path: str) -> dict:
    """Per-cell rates of one of our runs (a results folder or its trials.jsonl), shaped like the replication's."""
    return {"path": os.path.abspath(path), **_cell_rates(runs.load_run(path))}


def _cell_rates(run: runs.Run) -> dict:
    """{"cells": one row per (label, layer, strength) with n and the rate of each measure, "warnings"};
    a label is the protocol and word as the run's own file spells them ('lindsey_love', or
    'lindsey_injected_thought_Dust'), 'control' for the word of controls."""
    summary = aggregation.aggregate(run)

    def label(cell):
        if run.format == runs.FORMAT_405B:
            return runs.replication_label(cell["protocol"], cell["word"])
        return f"{cell['protocol']}_{cell['word'] or 'control'}"

    cells = [{"label": label(c), "layer": c["layer"], "magnitude": c["strength"], "n": c["n"], **c["rates"]}
             for c in summary["cells"] + summary["controls"]]
    cells.sort(key=lambda c: (c["label"], aggregation.layer_key(c["layer"]), c["magnitude"]))
    return {"cells": cells, "warnings": summary["warnings"]}
