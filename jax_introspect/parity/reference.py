"""The reference dump (written by launch/gpu_reference.py) and the checks that it belongs to the
same model, tokenizer and prompts as the checkpoint (format: docs/parity.md)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

FORMAT = "jax_introspect.gpu_reference/v1"
META_FILE = "reference.json"
TENSOR_FILE = "reference.safetensors"
OUTPUTS = ("residuals", "logits", "continuation", "continuation_logits")


class ParityError(ValueError):
    """The reference and the checkpoint cannot be set side by side; the message names the problem."""


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
            raise ParityError(f"{path} is not valid JSON: {e}") from e


def read_reference(path: str) -> Reference:
    """Read and structurally validate a dump folder (or its reference.json)."""
    folder = os.path.dirname(path) if path.endswith(".json") else path
    if not os.path.isdir(folder):
        raise ParityError(f"reference dump {folder} not found")
    meta_path, tensor_path = os.path.join(folder, META_FILE), os.path.join(folder, TENSOR_FILE)
    if not os.path.isfile(meta_path):
        raise ParityError(f"{folder} has no {META_FILE}: not a complete reference dump "
                          "(gpu_reference.py writes it last; was it interrupted?)")
    if not os.path.isfile(tensor_path):
        raise ParityError(f"{folder} has no {TENSOR_FILE}: the dump is incomplete; copy the whole folder")
    meta = _read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise ParityError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r} "
                          "(written by launch/gpu_reference.py)")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        tensors = load_file(tensor_path)
    # A truncated or foreign file: a bad header (SafetensorError), an unreadable file (OSError), or
    # tensors of a dtype numpy lacks (bfloat16: TypeError; float8: AttributeError).
    except (SafetensorError, OSError, TypeError, AttributeError) as e:
        raise ParityError(f"{tensor_path} cannot be read as safetensors: {e}") from e
    ref = Reference(meta=meta, tensors=tensors, path=os.path.abspath(folder))
    validate_reference(ref)
    return ref


def validate_reference(ref: Reference) -> None:
    """Internal consistency: every tensor the metadata promises, with the shapes it implies."""
    meta, tensors = ref.meta, ref.tensors
    for key in ("model", "prompts", "residual_layers", "max_new_tokens"):
        if key not in meta:
            raise ParityError(f"reference metadata lacks {key!r}")
    n_layers, d_model = meta["model"]["n_layers"], meta["model"]["d_model"]
    layers = ref.residual_layers
    if not layers:
        raise ParityError("the reference saved no residual layers (residual_layers is empty)")
    if layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n_layers:
        raise ParityError(f"reference residual_layers {layers} is not a sorted subset of 0..{n_layers - 1}")
    if not ref.prompts:
        raise ParityError("the reference holds no prompts")
    missing = sorted(k for k in meta.get("tensors", {}) if k not in tensors)
    for c, prefix in ref.prefixes():
        for i in range(len(ref.prompts)):
            missing += [f"{prefix}.p{i}.{k}" for k in OUTPUTS if f"{prefix}.p{i}.{k}" not in tensors]
        if c is not None and f"{prefix}.vector" not in tensors:
            missing.append(f"{prefix}.vector")
    if meta.get("concepts") and "concept_vectors" not in tensors:
        missing.append("concept_vectors")
    if missing:
        raise ParityError(f"the reference dump is incomplete: {len(missing)} tensors missing, e.g. "
                          f"{sorted(set(missing))[:4]}")
    for c, prefix in ref.prefixes():
        for i, p in enumerate(ref.prompts):
            T = len(p["ids"])
            res = tensors[f"{prefix}.p{i}.residuals"]
            if res.shape[0] != len(layers):
                raise ParityError(
                    f"{prefix} prompt {i} ({p.get('name')}): residuals hold {res.shape[0]} layers but the dump's "
                    f"residual_layers lists {len(layers)} ({short(layers)}): the dump is missing layers "
                    "(truncated or edited); re-run gpu_reference.py")
            if res.shape[1:] != (T, d_model):
                raise ParityError(f"{prefix} prompt {i}: residuals have shape {list(res.shape)}, expected "
                                  f"[{len(layers)}, {T}, {d_model}] for its {T} tokens")
            logits = tensors[f"{prefix}.p{i}.logits"]
            if logits.ndim != 2 or logits.shape[0] != T:
                raise ParityError(f"{prefix} prompt {i}: logits have shape {list(logits.shape)}, expected [{T}, vocab]")
    concepts = meta.get("concepts")
    if concepts:
        shape = tensors["concept_vectors"].shape
        if shape != (len(concepts["words"]), n_layers, d_model):
            raise ParityError(f"reference concept_vectors have shape {list(shape)}, expected "
                              f"[{len(concepts['words'])}, {n_layers}, {d_model}]: the dump is missing layers or words")
    for c, case in enumerate(ref.cases):
        if not 0 <= case["layer"] < n_layers:
            raise ParityError(f"injection case {case['name']}: layer {case['layer']} out of range 0..{n_layers - 1}")


def short(xs: Sequence, n: int = 8) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= n else f"[{', '.join(map(str, xs[:n]))}, ... {xs[-1]}]"


# --- checks against the checkpoint -----------------------------------------------------------

_CONFIG_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "tie_word_embeddings", "rope_scaling")


def check_model(ref: Reference, config) -> None:
    """The dump must come from a model with this checkpoint's architecture."""
    from jax_introspect.config import ConfigError, from_hf_dict
    hf = dict(ref.meta["model"]["config"])
    if (hf.get("quantization_config") or {}).get("quant_method") == "gguf":
        # transformers marks a model it loaded from a GGUF file so; its weights are dequantized floats.
        del hf["quantization_config"]
    try:
        theirs = from_hf_dict(hf, source="the reference's config")
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ParityError(f"the reference dump's model is not a Llama model jax_introspect runs: {e}") from e
    diffs = [f"{f}: reference {getattr(theirs, f)} vs checkpoint {getattr(config, f)}"
             for f in _CONFIG_FIELDS if getattr(theirs, f) != getattr(config, f)]
    diffs += [f"{f}: reference {getattr(theirs, f)} vs checkpoint {getattr(config, f)}"
              for f in ("rope_theta", "rms_norm_eps")
              if not math.isclose(getattr(theirs, f), getattr(config, f), rel_tol=1e-6)]
    if diffs:
        raise ParityError("the reference dump is from another model (" + "; ".join(diffs) + "). Make the dump "
                          "from the model this checkpoint was converted from")


def first_difference(a: Sequence, b: Sequence) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _describe_ids(tokenizer, ours: Sequence[int], theirs: Sequence[int]) -> str:
    i = first_difference(ours, theirs)
    def tok(ids):
        if i >= len(ids):
            return "(end)"
        return f"{ids[i]} {tokenizer.decode([ids[i]])!r}" if tokenizer is not None else str(ids[i])
    return (f"first difference at token {i}: ours {tok(ours)} vs reference {tok(theirs)} "
            f"({len(ours)} vs {len(theirs)} tokens)")


def _describe_text(ours: str, theirs: str) -> str:
    i = first_difference(ours, theirs)
    return f"first difference at character {i}: ours {ours[i:i + 40]!r} vs reference {theirs[i:i + 40]!r}"


def _needs_tokenizer(ref: Reference) -> bool:
    return any(p["kind"] != "ids" for p in ref.prompts) or bool(ref.meta.get("concepts"))


def check_tokenizer(ref: Reference, lm) -> str:
    """The checkpoint's tokenizer must tokenize like the reference's. Returns a status line."""
    info = ref.meta.get("tokenizer")
    if not _needs_tokenizer(ref):
        return "not needed (token-id prompts)"
    if info is None:
        raise ParityError("the reference has text prompts but no tokenizer fingerprint: the dump is damaged")
    if lm._tokenizer is None:
        raise ParityError(f"the reference tokenized text, but checkpoint {lm.path} has no tokenizer; "
                          "convert it with the model's tokenizer (`launch.convert --tokenizer=...`)")
    ours = lm.tokenizer.encode(info["probe_text"])
    if ours != info["probe_ids"]:
        raise ParityError("tokenizer mismatch: the probe text tokenizes differently ("
                          + _describe_ids(lm.tokenizer, ours, info["probe_ids"]) + "). The dump was made with "
                          "another tokenizer than this checkpoint's")
    if any(p["kind"] == "chat" for p in ref.prompts) or ref.meta.get("concepts"):
        text = lm.tokenizer.chat_prompt([{"role": "user", "content": "Hi"}])
        if text != info["chat_probe_text"]:
            raise ParityError("chat template mismatch: a one-message chat renders differently ("
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
                    raise ParityError(f"{label}: our chat template renders another text than the reference's ("
                                      + _describe_text(text, p["text"]) + ")")
            ours = lm.tokenizer.encode(text)
            if ours != p["ids"]:
                raise ParityError(f"{label}: our token ids differ from the reference's ("
                                  + _describe_ids(lm.tokenizer, ours, p["ids"]) + ")")
            if "anchor" in p:
                start = protocols.start_at_anchor(lm.tokenizer, text, p["anchor"])
                if start != p["inject_start"]:
                    raise ParityError(f"{label}: the anchor {p['anchor']!r} gives injection start {start} here, "
                                      f"{p['inject_start']} in the reference")
        if max(ours) >= vocab:
            raise ParityError(f"{label}: token id {max(ours)} >= the checkpoint's vocabulary ({vocab})")
        out.append(ours)
    return out


def check_prompt_entries(ref: Reference, entries: Sequence[dict]) -> None:
    """`entries` (a prompts file read with gpu_reference.read_prompts_file) must be the dump's prompts."""
    keys = ("kind", "messages", "text", "ids", "inject_start", "anchor")
    if len(entries) != len(ref.prompts):
        raise ParityError(f"mismatched prompts: the prompts file has {len(entries)} prompts, the reference "
                          f"{len(ref.prompts)}")
    for i, (e, p) in enumerate(zip(entries, ref.prompts)):
        for key in keys:
            if key not in e or (key == "text" and e["kind"] == "chat") or (key == "ids" and e["kind"] != "ids"):
                continue
            if e[key] != p.get(key):
                raise ParityError(f"mismatched prompts: prompt {i} ({e.get('name')}) has {key}={e[key]!r:.80} in the "
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
