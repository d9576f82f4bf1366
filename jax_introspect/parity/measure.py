"""The JAX side of a parity check and its metrics: residuals, logits, continuations, the jump
rule (see the package docstring)."""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np

from jax_introspect.parity.reference import ParityError, Reference, check_reference, first_difference, short


JUMP_FACTOR = 10.0
JUMP_FLOOR = {"float32": 1e-4, "bfloat16": 0.1}
DTYPES = ("float32", "bfloat16")


def run_jax(lm, ref: Reference, ids: Sequence[Sequence[int]], batch_size: int = 8, log=print) -> dict:
    """Our tensors under the reference's names."""
    from jax_introspect import inject
    from jax_introspect.experiment import vectors as vectors_lib
    rows = [(c, prefix, i) for c, prefix in ref.prefixes() for i in range(len(ids))]
    layers = ref.residual_layers
    out = {}
    d_model = lm.config.d_model
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        n_real = len(chunk)
        if start and n_real < batch_size:  # pad the last chunk with copies: one compiled shape
            chunk = chunk + [chunk[-1]] * (batch_size - n_real)
        chunk_ids = [ids[i] for _, _, i in chunk]
        cases = [ref.cases[c] if c is not None else None for c, _, _ in chunk]
        injection = inject.make(
            layer=[c["layer"] if c else 0 for c in cases],
            strength=[c["strength"] if c else 0.0 for c in cases],
            vector=np.stack([ref.tensors[f"case{c}.vector"] if c is not None else np.zeros(d_model, np.float32)
                             for c, _, _ in chunk]),
            start=[ref.prompts[i].get("inject_start", 0) for _, _, i in chunk],
            norm_match=[c["norm_match"] if c else "raw" for c in cases])  # a mode name, or a bool in old dumps
        residuals = lm.residuals(chunk_ids, injection=injection)  # [L, b, T, D]
        logits = lm.logits(chunk_ids, injection=injection)  # [b, T, V]
        gens = lm.generate(chunk_ids, max_new_tokens=ref.meta["max_new_tokens"], injection=injection,
                           return_logits=True)
        for j, (_, prefix, i) in enumerate(chunk[:n_real]):
            T = len(ids[i])
            key = f"{prefix}.p{i}."
            out[key + "residuals"] = residuals[layers, j, -T:, :]
            out[key + "logits"] = logits[j, -T:, :]
            out[key + "continuation"] = np.asarray(gens[j].token_ids, np.int64)
            out[key + "continuation_logits"] = np.asarray(gens[j].logits, np.float32)
        log(f"  rows {start + n_real}/{len(rows)}")
    concepts = ref.meta.get("concepts")
    if concepts:
        cv = vectors_lib.concept_vectors(lm, concepts["words"], concepts["baseline_words"],
                                         template=concepts["template"], position=concepts.get("position", "last"))
        out["concept_vectors"] = cv.vectors
    return out


# --- metrics ----------------------------------------------------------------------------------

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logit_stats(ref: np.ndarray, ours: np.ndarray) -> dict:
    """ref, ours: [N, V]."""
    if ref.shape != ours.shape:
        raise ParityError(f"logits shapes differ: reference {list(ref.shape)} vs ours {list(ours.shape)}")
    if ref.size == 0:
        return {"n": 0}
    p, q = _log_softmax(ref), _log_softmax(ours)
    kl = (np.exp(p) * (p - q)).sum(-1)
    k = min(5, ref.shape[-1])
    top_ref = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
    top_ours = np.argsort(-ours, axis=-1, kind="stable")[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref.tolist(), top_ours.tolist())]
    diff = np.abs(ours.astype(np.float64) - ref)
    rel = np.linalg.norm(ours.astype(np.float64) - ref, axis=-1) / np.maximum(np.linalg.norm(ref.astype(np.float64), axis=-1), 1e-30)
    return {"n": int(ref.shape[0]), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "rel_err_max": float(rel.max()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((ref.argmax(-1) == ours.argmax(-1)).mean()), "top5": float(np.mean(overlap))}


def residual_stats(ref: Sequence[np.ndarray], ours: Sequence[np.ndarray], layers: Sequence[int]) -> list[dict]:
    """ref, ours: lists of [n_layers_saved, T_i, D] (one per row); one dict per saved layer."""
    out = []
    for k, layer in enumerate(layers):
        r = np.concatenate([x[k] for x in ref]).astype(np.float64)  # [N, D]
        o = np.concatenate([x[k] for x in ours]).astype(np.float64)
        d = o - r
        rn, on = np.linalg.norm(r, axis=-1), np.linalg.norm(o, axis=-1)
        rel = np.linalg.norm(d, axis=-1) / np.maximum(rn, 1e-30)
        cos = (r * o).sum(-1) / np.maximum(rn * on, 1e-30)
        out.append({"layer": int(layer), "max_abs": float(np.abs(d).max()), "mean_abs": float(np.abs(d).mean()),
                    "rel_err_max": float(rel.max()), "rel_err_mean": float(rel.mean()),
                    "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                    "ref_norm_mean": float(rn.mean())})
    return out


def first_jump(errors: Sequence[float], floor: float, factor: float = JUMP_FACTOR) -> Optional[int]:
    """Index of the first error >= floor and >= factor x the median of the preceding ones."""
    for i, e in enumerate(errors):
        base = float(np.median(errors[:i])) if i else 0.0
        if e >= floor and e >= factor * base:
            return i
    return None


def locate(layer_stats: list[dict], logits: dict, floor: float, factor: float) -> dict:
    errors = [s["rel_err_max"] for s in layer_stats]
    i = first_jump(errors, floor, factor)
    if i is not None:
        layer = layer_stats[i]["layer"]
        prev = layer_stats[i - 1]["layer"] if i else -1
        where = f"layer {layer}" if layer == prev + 1 else f"between layer {prev} (exclusive) and {layer}"
        return {"layer": layer, "where": where, "rel_err": errors[i],
                "before": float(np.median(errors[:i])) if i else 0.0}
    if logits.get("n") and logits["rel_err_max"] >= floor and logits["rel_err_max"] >= factor * errors[-1]:
        return {"layer": None, "where": "after the last layer (final norm / LM head)",
                "rel_err": logits["rel_err_max"], "before": errors[-1]}
    return {"layer": None, "where": None}


def continuation_stats(ref_tokens, ours_tokens, ref_logits, ours_logits) -> dict:
    ref_tokens, ours_tokens = [int(t) for t in ref_tokens], [int(t) for t in ours_tokens]
    div = first_difference(ours_tokens, ref_tokens)
    n = min(len(ref_tokens), len(ours_tokens)) if div is None else min(div + 1, len(ref_tokens), len(ours_tokens))
    stats = logit_stats(np.asarray(ref_logits)[:n], np.asarray(ours_logits)[:n])
    return {"identical": div is None, "first_divergence": div, "ref_len": len(ref_tokens),
            "ours_len": len(ours_tokens), "steps_compared": n, "step_logits_max_abs": stats.get("max_abs"),
            "step_kl_mean": stats.get("kl_mean")}


def measure_tensors(ref: Reference, ours: dict, dtype: str, floor: Optional[float] = None,
                    factor: float = JUMP_FACTOR, tokenizer=None) -> dict:
    floor = JUMP_FLOOR.get(dtype, 1e-4) if floor is None else floor
    layers = ref.residual_layers
    report = {"jump_floor": floor, "jump_factor": factor}
    groups = {"clean": [("clean", None)], "injected": [(f"case{c}", c) for c in range(len(ref.cases))]}
    for group, prefixes in groups.items():
        keys = [f"{prefix}.p{i}." for prefix, _ in prefixes for i in range(len(ref.prompts))]
        if not keys:
            continue
        lstats = residual_stats([ref.tensors[k + "residuals"] for k in keys], [ours[k + "residuals"] for k in keys],
                                layers)
        lg = logit_stats(np.concatenate([ref.tensors[k + "logits"] for k in keys]),
                         np.concatenate([ours[k + "logits"] for k in keys]))
        report[group] = {"layers": lstats, "logits": lg, "jump": locate(lstats, lg, floor, factor),
                         "residual_max_abs": max(s["max_abs"] for s in lstats),
                         "residual_rel_err_max": max(s["rel_err_max"] for s in lstats),
                         "residual_cos_min": min(s["cos_min"] for s in lstats)}
    conts = []
    for prefix, c in groups["clean"] + groups["injected"]:
        for i, p in enumerate(ref.prompts):
            k = f"{prefix}.p{i}."
            row = continuation_stats(ref.tensors[k + "continuation"], ours[k + "continuation"],
                                     ref.tensors[k + "continuation_logits"], ours[k + "continuation_logits"])
            row = {"prompt": p.get("name", str(i)), "case": ref.cases[c]["name"] if c is not None else "clean", **row}
            if tokenizer is not None:
                row["ref_text"] = tokenizer.decode(ref.tensors[k + "continuation"].tolist())
                row["ours_text"] = tokenizer.decode(ours[k + "continuation"].tolist())
            conts.append(row)
    report["continuations"] = conts
    if "concept_vectors" in ours:
        r, o = ref.tensors["concept_vectors"].astype(np.float64), ours["concept_vectors"].astype(np.float64)
        cos = (r * o).sum(-1) / np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(o, axis=-1), 1e-30)
        rel = np.linalg.norm(o - r, axis=-1) / np.maximum(np.linalg.norm(r, axis=-1), 1e-30)
        report["concept_vectors"] = {"words": ref.meta["concepts"]["words"], "cos_min": float(cos.min()),
                                     "cos_mean": float(cos.mean()), "rel_err_max": float(rel.max()),
                                     "per_layer_cos_min": [float(x) for x in cos.min(0)],
                                     "per_layer_rel_err_max": [float(x) for x in rel.max(0)]}
    report["summary"] = summarize(report)
    return report


def summarize(report: dict) -> dict:
    clean, inj = report.get("clean", {}), report.get("injected")
    conts = report["continuations"]
    s = {"residual_max_abs": clean["residual_max_abs"], "residual_rel_err_max": clean["residual_rel_err_max"],
         "residual_cos_min": clean["residual_cos_min"], "logits_max_abs": clean["logits"]["max_abs"],
         "logits_kl_mean": clean["logits"]["kl_mean"], "top1": clean["logits"]["top1"],
         "top5": clean["logits"]["top5"], "first_jump_layer": clean["jump"]["layer"],
         "first_jump_where": clean["jump"]["where"],
         "continuations_identical": all(c["identical"] for c in conts),
         "continuations_identical_count": f"{sum(c['identical'] for c in conts)}/{len(conts)}",
         "first_divergence_min": min((c["first_divergence"] for c in conts if c["first_divergence"] is not None),
                                     default=None)}
    if inj:
        s.update({"injected_residual_max_abs": inj["residual_max_abs"],
                  "injected_residual_rel_err_max": inj["residual_rel_err_max"],
                  "injected_logits_max_abs": inj["logits"]["max_abs"], "injected_logits_kl_mean": inj["logits"]["kl_mean"],
                  "injected_top1": inj["logits"]["top1"], "injected_first_jump_layer": inj["jump"]["layer"],
                  "injected_first_jump_where": inj["jump"]["where"]})
    if "concept_vectors" in report:
        s["concept_vector_cos_min"] = report["concept_vectors"]["cos_min"]
        s["concept_vector_rel_err_max"] = report["concept_vectors"]["rel_err_max"]
    return s


# --- the whole check --------------------------------------------------------------------------

def measure_checkpoint(checkpoint: str, ref: Reference, dtypes: Sequence[str] = ("float32",),
                       batch_size: int = 8, factor: float = JUMP_FACTOR, floors: Optional[dict] = None,
                       log=print) -> dict:
    import jax_introspect
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ParityError(f"dtypes {bad}: choose from {DTYPES}")
    floors = {**JUMP_FLOOR, **(floors or {})}
    # A half-precision reference is as noisy as a half-precision run: the floor covers both sides.
    ref_dtype = ref.meta.get("run", {}).get("dtype", "float32")
    ref_floor = floors["bfloat16"] if ref_dtype in ("bfloat16", "float16") else 0.0
    floors = {d: max(floors[d], ref_floor) for d in dtypes}
    report = {"checkpoint": os.path.abspath(checkpoint), "reference": reference_summary(ref), "runs": {},
              "jump_rule": {"metric": "max over tokens of ||ours - ref|| / ||ref|| after each layer",
                            "factor": factor, "floors": floors, "reference_dtype": ref_dtype}}
    for dtype in dtypes:
        t0 = time.time()
        lm = jax_introspect.load(checkpoint, dtype=dtype)
        checks = check_reference(ref, lm)  # before any compute, and for every dtype (cheap)
        report["checks"] = checks["status"]
        log(f"{dtype}: running {len(ref.prompts)} prompts x {1 + len(ref.cases)} runs")
        ours = run_jax(lm, ref, checks["ids"], batch_size=batch_size, log=log)
        run = measure_tensors(ref, ours, dtype, floors[dtype], factor, tokenizer=lm._tokenizer)
        run["seconds"] = round(time.time() - t0, 2)
        run["checkpoint_dtype"] = str(lm.dtype)
        report["runs"][dtype] = run
        del lm
    return report


def reference_summary(ref: Reference) -> dict:
    m = ref.meta
    return {"path": ref.path, "model": m["model"].get("path"), "gguf_file": m["model"].get("gguf_file"),
            "config_sha256": m["model"].get("config_sha256"), "n_layers": m["model"]["n_layers"],
            "run": m.get("run", {}), "created": m.get("created"), "prompts": [p.get("name") for p in m["prompts"]],
            "cases": [c["name"] for c in ref.cases], "residual_layers": short(ref.residual_layers),
            "words": (m.get("concepts") or {}).get("words", []), "max_new_tokens": m["max_new_tokens"]}
