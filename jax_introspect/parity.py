"""TPU-vs-GPU parity: run a reference dump's prompts through jax_introspect and measure the gap.

A reference dump (written by `launch/gpu_reference.py` with PyTorch/transformers; format in
docs/compare.md) holds, per prompt, the residual stream after every decoder layer, the logits,
and a greedy continuation with its step logits, each clean and under every injection case,
plus Lindsey concept vectors. `compare_checkpoint` checks that the dump belongs to the same
model, tokenizer and prompts as the checkpoint (a clear `CompareError` otherwise), recomputes all
of it with jax_introspect in each requested dtype, and reports:

- per layer: residual max / mean |diff|, per-token relative error ||ours - ref|| / ||ref|| (max
  and mean over tokens), per-token cosine (min and mean); clean and injected rows separately;
- logits: max |diff|, mean KL(ref || ours) over positions, top-1 agreement, top-5 overlap
  (|top5 ours ∩ top5 ref| / 5, averaged over positions);
- concept vectors: cosine and relative error per word and layer;
- continuations: whether the greedy tokens are identical, the first index where they diverge,
  and the step logits compared up to and including that step (the contexts agree until then);
- the first layer where the difference jumps (the rule below).

The jump rule. e_l = the max over tokens of the per-token relative residual error after layer
l. Layer l is where the difference jumps if it is the first with

    e_l >= floor   and   e_l >= factor * median(e_0 .. e_{l-1})     (for l = 0: e_0 >= floor)

defaults factor=10 and floor 1e-4 (float32) / 0.1 (bfloat16; also whenever the reference itself
ran in bfloat16 or float16). A correct float32 port sits
near 1e-6 everywhere, so a wrong weight or op stands out by orders of magnitude at its layer,
while bfloat16's round-off grows smoothly and crosses neither bar. When no layer jumps but the
logits do (their relative error passes the same two bars against the last layer's), the fault is
placed after the layers: the final norm or the LM head. Injected rows get the same rule
separately, so a fault only in the injection path shows up there alone. With a dump that saved
only some layers, the jump is located between the previous saved layer (exclusive) and the
reported one (inclusive).

Also here: summaries of the 405B replication's artifacts (judged JSON, torch `.pt` vectors) to
set a TPU run beside that GPU run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Optional, Sequence

import numpy as np

FORMAT = "jax_introspect.gpu_reference/v1"
META_FILE = "reference.json"
TENSOR_FILE = "reference.safetensors"
JUMP_FACTOR = 10.0
JUMP_FLOOR = {"float32": 1e-4, "bfloat16": 0.1}
DTYPES = ("float32", "bfloat16")
OUTPUTS = ("residuals", "logits", "continuation", "continuation_logits")


class CompareError(ValueError):
    """The reference and the checkpoint cannot be compared; the message names the problem."""


# --- the reference dump ----------------------------------------------------------------------

@dataclasses.dataclass
class Reference:
    meta: dict
    tensors: dict  # name -> np.ndarray
    path: str = ""

    @property
    def prompts(self) -> list[dict]:
        return self.meta["prompts"]

    @property
    def cases(self) -> list[dict]:
        return self.meta.get("cases", [])

    @property
    def residual_layers(self) -> list[int]:
        return list(self.meta["residual_layers"])

    def prefixes(self) -> list[tuple[Optional[int], str]]:
        return [(None, "clean")] + [(c, f"case{c}") for c in range(len(self.cases))]


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CompareError(f"{path} is not valid JSON: {e}") from None


def read_reference(path: str) -> Reference:
    """Read and structurally validate a dump folder (or its reference.json)."""
    folder = os.path.dirname(path) if path.endswith(".json") else path
    if not os.path.isdir(folder):
        raise CompareError(f"reference dump {folder} not found")
    meta_path, tensor_path = os.path.join(folder, META_FILE), os.path.join(folder, TENSOR_FILE)
    if not os.path.isfile(meta_path):
        raise CompareError(f"{folder} has no {META_FILE}: not a complete reference dump "
                           "(gpu_reference.py writes it last; was it interrupted?)")
    if not os.path.isfile(tensor_path):
        raise CompareError(f"{folder} has no {TENSOR_FILE}: the dump is incomplete; copy the whole folder")
    meta = _read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise CompareError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r} "
                           "(written by launch/gpu_reference.py)")
    from safetensors.numpy import load_file
    try:
        tensors = load_file(tensor_path)
    except Exception as e:  # a truncated or foreign file
        raise CompareError(f"{tensor_path} cannot be read as safetensors: {e}") from None
    ref = Reference(meta=meta, tensors=tensors, path=os.path.abspath(folder))
    validate_reference(ref)
    return ref


def validate_reference(ref: Reference) -> None:
    """Internal consistency: every tensor the metadata promises, with the shapes it implies."""
    meta, tensors = ref.meta, ref.tensors
    for key in ("model", "prompts", "residual_layers", "max_new_tokens"):
        if key not in meta:
            raise CompareError(f"reference metadata lacks {key!r}")
    n_layers, d_model = meta["model"]["n_layers"], meta["model"]["d_model"]
    layers = ref.residual_layers
    if not layers:
        raise CompareError("the reference saved no residual layers (residual_layers is empty)")
    if layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n_layers:
        raise CompareError(f"reference residual_layers {layers} is not a sorted subset of 0..{n_layers - 1}")
    if not ref.prompts:
        raise CompareError("the reference holds no prompts")
    missing = sorted(k for k in meta.get("tensors", {}) if k not in tensors)
    for c, prefix in ref.prefixes():
        for i in range(len(ref.prompts)):
            missing += [f"{prefix}.p{i}.{k}" for k in OUTPUTS if f"{prefix}.p{i}.{k}" not in tensors]
        if c is not None and f"{prefix}.vector" not in tensors:
            missing.append(f"{prefix}.vector")
    if meta.get("concepts") and "concept_vectors" not in tensors:
        missing.append("concept_vectors")
    if missing:
        raise CompareError(f"the reference dump is incomplete: {len(missing)} tensors missing, e.g. "
                           f"{sorted(set(missing))[:4]}")
    for c, prefix in ref.prefixes():
        for i, p in enumerate(ref.prompts):
            T = len(p["ids"])
            res = tensors[f"{prefix}.p{i}.residuals"]
            if res.shape[0] != len(layers):
                raise CompareError(
                    f"{prefix} prompt {i} ({p.get('name')}): residuals hold {res.shape[0]} layers but the dump's "
                    f"residual_layers lists {len(layers)} ({_short(layers)}): the dump is missing layers "
                    "(truncated or edited); re-run gpu_reference.py")
            if res.shape[1:] != (T, d_model):
                raise CompareError(f"{prefix} prompt {i}: residuals have shape {list(res.shape)}, expected "
                                   f"[{len(layers)}, {T}, {d_model}] for its {T} tokens")
            logits = tensors[f"{prefix}.p{i}.logits"]
            if logits.ndim != 2 or logits.shape[0] != T:
                raise CompareError(f"{prefix} prompt {i}: logits have shape {list(logits.shape)}, expected [{T}, vocab]")
    concepts = meta.get("concepts")
    if concepts:
        shape = tensors["concept_vectors"].shape
        if shape != (len(concepts["words"]), n_layers, d_model):
            raise CompareError(f"reference concept_vectors have shape {list(shape)}, expected "
                               f"[{len(concepts['words'])}, {n_layers}, {d_model}]: the dump is missing layers or words")
    for c, case in enumerate(ref.cases):
        if not 0 <= case["layer"] < n_layers:
            raise CompareError(f"injection case {case['name']}: layer {case['layer']} out of range 0..{n_layers - 1}")


def _short(xs: Sequence, n: int = 8) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= n else f"[{', '.join(map(str, xs[:n]))}, ... {xs[-1]}]"


# --- checks against the checkpoint -----------------------------------------------------------

_CONFIG_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "tie_word_embeddings", "rope_scaling")


def check_model(ref: Reference, config) -> None:
    """The dump must come from a model with this checkpoint's architecture."""
    from jax_introspect.config import ConfigError, from_hf_dict
    try:
        theirs = from_hf_dict(ref.meta["model"]["config"], source="the reference's config")
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CompareError(f"the reference dump's model is not a Llama model jax_introspect runs: {e}") from None
    diffs = [f"{f}: reference {getattr(theirs, f)} vs checkpoint {getattr(config, f)}"
             for f in _CONFIG_FIELDS if getattr(theirs, f) != getattr(config, f)]
    diffs += [f"{f}: reference {getattr(theirs, f)} vs checkpoint {getattr(config, f)}"
              for f in ("rope_theta", "rms_norm_eps")
              if not math.isclose(getattr(theirs, f), getattr(config, f), rel_tol=1e-6)]
    if diffs:
        raise CompareError("the reference dump is from another model (" + "; ".join(diffs) + "). Make the dump "
                           "from the model this checkpoint was converted from")


def _first_difference(a: Sequence, b: Sequence) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _describe_ids(tokenizer, ours: Sequence[int], theirs: Sequence[int]) -> str:
    i = _first_difference(ours, theirs)
    def tok(ids):
        if i >= len(ids):
            return "(end)"
        return f"{ids[i]} {tokenizer.decode([ids[i]])!r}" if tokenizer is not None else str(ids[i])
    return (f"first difference at token {i}: ours {tok(ours)} vs reference {tok(theirs)} "
            f"({len(ours)} vs {len(theirs)} tokens)")


def _describe_text(ours: str, theirs: str) -> str:
    i = _first_difference(ours, theirs)
    return f"first difference at character {i}: ours {ours[i:i + 40]!r} vs reference {theirs[i:i + 40]!r}"


def _needs_tokenizer(ref: Reference) -> bool:
    return any(p["kind"] != "ids" for p in ref.prompts) or bool(ref.meta.get("concepts"))


def check_tokenizer(ref: Reference, lm) -> str:
    """The checkpoint's tokenizer must tokenize like the reference's. Returns a status line."""
    info = ref.meta.get("tokenizer")
    if not _needs_tokenizer(ref):
        return "not needed (token-id prompts)"
    if info is None:
        raise CompareError("the reference has text prompts but no tokenizer fingerprint: the dump is damaged")
    if lm._tokenizer is None:
        raise CompareError(f"the reference tokenized text, but checkpoint {lm.path} has no tokenizer; "
                           "convert it with the model's tokenizer (`launch.convert --tokenizer=...`)")
    ours = lm.tokenizer.encode(info["probe_text"])
    if ours != info["probe_ids"]:
        raise CompareError("tokenizer mismatch: the probe text tokenizes differently ("
                           + _describe_ids(lm.tokenizer, ours, info["probe_ids"]) + "). The dump was made with "
                           "another tokenizer than this checkpoint's")
    if any(p["kind"] == "chat" for p in ref.prompts) or ref.meta.get("concepts"):
        text = lm.tokenizer.chat_prompt([{"role": "user", "content": "Hi"}])
        if text != info["chat_probe_text"]:
            raise CompareError("chat template mismatch: a one-message chat renders differently ("
                               + _describe_text(text, info["chat_probe_text"]) + ")")
    return f"probe text and chat template agree ({lm.tokenizer!r})"


def prompt_token_ids(ref: Reference, lm) -> list[list[int]]:
    """Our token ids for each reference prompt; any difference from the reference's is an error."""
    from jax_introspect.experiment import protocols
    out = []
    vocab = lm.config.vocab_size
    for i, p in enumerate(ref.prompts):
        label = f"prompt {i} ({p.get('name')})"
        if p["kind"] == "ids":
            ours = list(p["ids"])
        else:
            text = p["text"]
            if p["kind"] == "chat":
                text = lm.tokenizer.chat_prompt(p["messages"])
                if text != p["text"]:
                    raise CompareError(f"{label}: our chat template renders another text than the reference's ("
                                       + _describe_text(text, p["text"]) + ")")
            ours = lm.tokenizer.encode(text)
            if ours != p["ids"]:
                raise CompareError(f"{label}: our token ids differ from the reference's ("
                                   + _describe_ids(lm.tokenizer, ours, p["ids"]) + ")")
            if "anchor" in p:
                start = protocols.start_at_anchor(lm.tokenizer, text, p["anchor"])
                if start != p["inject_start"]:
                    raise CompareError(f"{label}: the anchor {p['anchor']!r} gives injection start {start} here, "
                                       f"{p['inject_start']} in the reference")
        if max(ours) >= vocab:
            raise CompareError(f"{label}: token id {max(ours)} >= the checkpoint's vocabulary ({vocab})")
        out.append(ours)
    return out


def check_prompt_entries(ref: Reference, entries: Sequence[dict]) -> None:
    """`entries` (a prompts file read with gpu_reference.read_prompts_file) must be the dump's prompts."""
    keys = ("kind", "messages", "text", "ids", "inject_start", "anchor")
    if len(entries) != len(ref.prompts):
        raise CompareError(f"mismatched prompts: the prompts file has {len(entries)} prompts, the reference "
                           f"{len(ref.prompts)}")
    for i, (e, p) in enumerate(zip(entries, ref.prompts)):
        for key in keys:
            if key not in e or (key == "text" and e["kind"] == "chat") or (key == "ids" and e["kind"] != "ids"):
                continue
            if e[key] != p.get(key):
                raise CompareError(f"mismatched prompts: prompt {i} ({e.get('name')}) has {key}={e[key]!r:.80} in the "
                                   f"prompts file but {p.get(key)!r:.80} in the reference")


def check_reference(ref: Reference, lm) -> dict:
    """All checks before any compute; returns their status lines and our prompt ids."""
    check_model(ref, lm.config)
    status = {"model": f"architecture matches ({ref.meta['model'].get('config_sha256', '')[:12]})",
              "tokenizer": check_tokenizer(ref, lm)}
    ids = prompt_token_ids(ref, lm)
    status["prompts"] = f"{len(ids)} prompts, token ids identical"
    eos = sorted(lm._tokenizer.eos_ids) if lm._tokenizer is not None else []
    if sorted(ref.meta.get("eos_ids", [])) != eos:
        status["eos_warning"] = (f"end-of-turn ids differ: reference {ref.meta.get('eos_ids')} vs ours {eos}; "
                                 "continuations may differ in length")
    return {"status": status, "ids": ids}


# --- the JAX side -----------------------------------------------------------------------------

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
            norm_match=[bool(c and c["norm_match"]) for c in cases])
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
        raise CompareError(f"logits shapes differ: reference {list(ref.shape)} vs ours {list(ours.shape)}")
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
    div = _first_difference(ours_tokens, ref_tokens)
    n = min(len(ref_tokens), len(ours_tokens)) if div is None else min(div + 1, len(ref_tokens), len(ours_tokens))
    stats = logit_stats(np.asarray(ref_logits)[:n], np.asarray(ours_logits)[:n])
    return {"identical": div is None, "first_divergence": div, "ref_len": len(ref_tokens),
            "ours_len": len(ours_tokens), "steps_compared": n, "step_logits_max_abs": stats.get("max_abs"),
            "step_kl_mean": stats.get("kl_mean")}


def compare_tensors(ref: Reference, ours: dict, dtype: str, floor: Optional[float] = None,
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


# --- the whole comparison ---------------------------------------------------------------------

def compare_checkpoint(checkpoint: str, ref: Reference, dtypes: Sequence[str] = ("float32",),
                       batch_size: int = 8, factor: float = JUMP_FACTOR, floors: Optional[dict] = None,
                       log=print) -> dict:
    import jax_introspect
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise CompareError(f"dtypes {bad}: choose from {DTYPES}")
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
        run = compare_tensors(ref, ours, dtype, floors[dtype], factor, tokenizer=lm._tokenizer)
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
            "cases": [c["name"] for c in ref.cases], "residual_layers": _short(ref.residual_layers),
            "words": (m.get("concepts") or {}).get("words", []), "max_new_tokens": m["max_new_tokens"]}


# --- the 405B replication's artifacts -------------------------------------------------------

def read_pt_vectors(path: str) -> list[dict]:
    """A torch .pt vector file: the replication's {"direction", "concept", "layer", ...} dict, a
    dict name -> tensor, or a bare tensor. Returns [{"name", "vector" (float32), "layer", ...}]."""
    if not os.path.isfile(path):
        raise CompareError(f"vector file {path} not found")
    try:
        import torch
    except ImportError:
        raise CompareError("reading .pt vector files needs torch (pip install torch)") from None
    data = torch.load(path, map_location="cpu", weights_only=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    if isinstance(data, dict) and "direction" in data:
        info = {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool))}
        return [{"name": str(data.get("concept", stem)), "vector": data["direction"].float().numpy(), "file": path,
                 **info}]
    if isinstance(data, dict):
        rows = [{"name": str(k), "vector": v.float().numpy(), "file": path} for k, v in data.items() if torch.is_tensor(v)]
        if rows:
            return rows
    elif torch.is_tensor(data):
        return [{"name": stem, "vector": data.float().numpy(), "file": path}]
    raise CompareError(f"{path}: expected a tensor, a dict of tensors or a replication vector dict")


def pt_to_concept_vectors(paths: Sequence[str]):
    """ConceptVectors-like arrays from .pt files: vectors [n, 1, D] (each file's single layer);
    the layers go in metadata['layers']."""
    from jax_introspect.experiment.vectors import ConceptVectors
    rows = [r for p in paths for r in read_pt_vectors(p)]
    dims = {r["vector"].shape[-1] for r in rows}
    if len(dims) != 1 or any(r["vector"].ndim != 1 for r in rows):
        raise CompareError(f"vector files hold vectors of shapes {sorted({r['vector'].shape for r in rows})}; "
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


_REPLICATION_FIELDS = ("model_path", "layer", "magnitudes", "n_trials", "n_control_trials", "temperature", "top_p",
                       "max_new_tokens", "norm_match", "judge_model", "timestamp", "n_errors", "alt_prompt")
_JUDGE_CRITERIA = ("coherent", "affirmative", "identifies", "immediate")


def replication_summary(path: str) -> dict:
    """The replication's judged JSON: its run settings and per-cell rates (computed from the
    judged trials when the file has no `aggregates`)."""
    if not os.path.isfile(path):
        raise CompareError(f"replication results {path} not found")
    data = _read_json(path)
    if not isinstance(data, dict) or not ("aggregates" in data or "results" in data):
        raise CompareError(f"{path} is not a replication results file (no 'aggregates' or 'results')")
    cells = []
    if data.get("aggregates"):
        for a in data["aggregates"]:
            cells.append({"label": a["label"], "magnitude": a["magnitude"], "n": a["n"], **a["rates"]})
    else:
        groups = {}
        for r in data["results"]:
            if isinstance(r.get("judge"), dict):
                groups.setdefault((r["label"], r["magnitude"]), []).append(r["judge"])
        for (label, mag), judges in sorted(groups.items()):
            rates = {c: float(np.mean([bool(j.get(c)) for j in judges])) for c in _JUDGE_CRITERIA}
            rates["strict_introspection"] = float(np.mean([all(bool(j.get(c)) for c in _JUDGE_CRITERIA) for j in judges]))
            cells.append({"label": label, "magnitude": mag, "n": len(judges), **rates})
    return {"path": os.path.abspath(path), **{k: data[k] for k in _REPLICATION_FIELDS if k in data},
            "n_results": len(data.get("results", [])), "vectors": data.get("vectors"), "cells": cells}


def our_results_summary(folder: str) -> dict:
    """Per-cell rates of one of our results folders (trials.jsonl), shaped like the replication's."""
    from jax_introspect.experiment import results as results_lib
    path = os.path.join(folder, results_lib.RESULTS_FILE)
    if not os.path.isfile(path):
        raise CompareError(f"{folder} has no {results_lib.RESULTS_FILE}")
    groups = {}
    for r in results_lib.read_records(path):
        label = f"{r.protocol}_{r.word or 'control'}"
        groups.setdefault((label, r.layer, float(r.strength)), []).append(r.grades)
    cells = []
    for (label, layer, strength), grades in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1, kv[0][2])):
        rates = {c: float(np.mean([bool(g.get(c)) for g in grades])) for c in results_lib.CRITERIA}
        rates[results_lib.STRICT] = float(np.mean([results_lib.strict(g) for g in grades]))
        cells.append({"label": label, "layer": layer, "magnitude": strength, "n": len(grades), **rates})
    return {"path": os.path.abspath(folder), "cells": cells}


# --- outputs ------------------------------------------------------------------------------------

def _cell_row(cell: dict, leading: list) -> str:
    """A markdown row: the leading columns, then the judge criteria and strict introspection."""
    rates = [_fmt(cell.get(k)) for k in (*_JUDGE_CRITERIA, "strict_introspection")]
    return "| " + " | ".join(str(x) for x in [*leading, *rates]) + " |"


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
        lines += [f"- {k}: {rep[k]}" for k in _REPLICATION_FIELDS if k in rep]
        lines += ["", "| label | magnitude | n | coherent | affirmative | identifies | immediate | strict |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [_cell_row(c, [c["label"], f"{c['magnitude']:g}", c["n"]]) for c in rep["cells"]]
    ours = report.get("our_results")
    if ours:
        lines += ["", f"## our run (`{ours['path']}`)", "",
                  "| label | layer | strength | n | coherent | affirmative | identifies | immediate | strict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [_cell_row(c, [c["label"], _fmt(c["layer"]), f"{c['magnitude']:g}", c["n"]]) for c in ours["cells"]]
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
    paths = {"json": os.path.join(out, "compare.json"), "markdown": os.path.join(out, "compare.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False, default=str)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(to_markdown(report))
    if report.get("runs"):
        paths["plot"] = plot(report, os.path.join(out, "compare.png"))
    return paths
