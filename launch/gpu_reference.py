#!/usr/bin/env python3
"""The PyTorch side of a TPU-vs-GPU parity check: a reference dump from HF transformers.

Run it where you trust the PyTorch numbers (your GPU box), copy the folder it writes next to
the JAX checkpoint, and check parity there:

    python launch/gpu_reference.py --model=/models/Llama-3.1-8B-Instruct --out=ref_8b \\
        --prompts_file=prompts.json --words=Dust,Oceans --layers=10,20 --strengths=2,4 \\
        --device=cuda --max_new_tokens=32
    python -m launch.parity --checkpoint=checkpoints/llama8b --reference=ref_8b --out=parity_8b

Standalone on purpose: it needs only torch, transformers, numpy and safetensors (plus `gguf`
for a .gguf model, `accelerate` for --device=auto), never JAX or jax_introspect, and it
re-implements in torch exactly what jax_introspect computes:

- Residuals: forward hooks on every decoder layer record its output (the raw residual stream
  after the layer, before the final norm; with an injection at that layer, injection included).
- Concept vectors (Lindsey's "Tell me about {word}" method, jax_introspect.experiment.vectors.concept_vectors
  with position="last"): the chat prompt [user: template.format(word)] with the assistant
  generation header, the residual after every layer at its last token, minus the mean of the
  same over the baseline words. Not normalised.
- Injection (jax_introspect.inject): a forward hook on decoder layer `layer` adds
  `strength * vector` to its output at every token whose position is >= `start` and, when an
  `end` is given, < `end` (exclusive; positions come from the layer's `position_ids`, so cached
  decode steps are injected too, or not once past `end`); with
  --norm_match=mlp_out (or bare --norm_match) it adds `strength * vector * |mlp_out| / (|vector| + 1e-6)`,
  where mlp_out is that layer's MLP output at the token (captured by a hook on the layer's MLP):
  vllm-lens 1.1.0's norm_match, the 405B replication's; with --norm_match=residual the norm is
  that of the layer's output before the addition, the full residual stream: vllm-lens >= 1.2.0's.
- Greedy continuations: a plain KV-cached loop, token = argmax of the float32 logits (first
  maximum on ties), stopping after an end-of-turn token or --max_new_tokens.

The dump (docs/parity.md has the full format) is a folder holding `reference.safetensors`
(float32 residuals, logits, concept vectors, injection vectors, int64 continuations) and
`reference.json` (model config and fingerprint, tokenizer fingerprint, prompts as text and ids,
words, layers, strengths, injection cases, versions, device).

Prompts file (--prompts_file, JSON): a list (or {"prompts": [...]}) whose entries are
    "a string"                                   one user message, chat-formatted
    {"messages": [{"role": ..., "content": ...}, ...]}  chat-formatted with the HF chat template
    {"text": "..."}                              raw text, tokenized as is (no BOS added)
    {"ids": [1, 2, 3]}                           raw token ids (models without a tokenizer)
each optionally with "name", "inject_start" (first injected position; default --inject_start)
or "anchor" (injection starts at the token before the one holding the anchor's first
character, as Lindsey's window starts before "Trial 1").
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import os
import platform
import sys
import time
from typing import Optional, Sequence

import numpy as np

FORMAT = "jax_introspect.gpu_reference/v1"
META_FILE = "reference.json"
TENSOR_FILE = "reference.safetensors"

# Tokenized on both sides: any difference means the tokenizers differ.
PROBE_TEXT = ("Trial 1: Do you detect an injected thought? If so, what is it about?\n\n"
              "  Café, naïve, 日本語, 🙂! Numbers: 3.14159, -42. ALL CAPS and\ttabs.\n")
DEFAULT_TEMPLATE = "Tell me about {word}"
# The first 20 of Lindsey's 100 baseline words (pass --baseline_words=@file for the full list,
# e.g. jax_introspect/experiment/protocols/data/baseline_words.json).
DEFAULT_BASELINE_WORDS = ["Desks", "Jackets", "Gondolas", "Laughter", "Intelligence", "Bicycles", "Chairs",
                          "Orchestras", "Sand", "Pottery", "Arrowheads", "Jewelry", "Daffodils", "Plateaus",
                          "Estuaries", "Quilts", "Moments", "Bamboo", "Ravines", "Archives"]
DEFAULT_PROMPTS = [
    {"name": "capital", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"name": "story", "messages": [{"role": "user", "content": "Write one sentence about the sea."}]},
]
# Config keys that decide the computation: their hash is the model fingerprint.
FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
                    "attention_bias", "mlp_bias")


class ReferenceError(ValueError):
    """Bad input for the reference run; the message names the problem."""


# Injection norm modes as jax_introspect.inject.NORM_MODES names them (copied: no JAX here).
NORM_MODES = ("raw", "mlp_out", "residual")
NORM_EPS = 1e-6  # vllm-lens' norm_match divides by |vector| + 1e-6


def norm_mode_name(value) -> str:
    """A norm-match setting as its mode name; bools are the old spelling (True = "mlp_out")."""
    if isinstance(value, bool):
        return NORM_MODES[int(value)]
    if value in NORM_MODES:
        return value
    raise ReferenceError(f"norm_match={value!r}: choose one of {', '.join(NORM_MODES)}")


# --- inputs -----------------------------------------------------------------------------------

def split_list(value) -> list[str]:
    """'a,b' or ['a', 'b'] or '@file' (JSON list, JSON {"words": [...]}, or one entry per line)."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and str(value[0]).startswith("@"):
            value = value[0]
        else:
            return [str(v).strip() for v in value if str(v).strip()]
    value = str(value)
    if value.startswith("@"):
        path = value[1:]
        if not os.path.isfile(path):
            raise ReferenceError(f"list file {path} not found")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return [line.strip() for line in text.splitlines() if line.strip()]
        data = data.get("words", data) if isinstance(data, dict) else data
        return [str(v) for v in data]
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_numbers(value, kind=float, what="value") -> list:
    try:
        return [kind(v) for v in split_list(value)]
    except ValueError:
        raise ReferenceError(f"--{what}={value!r}: expected a comma-separated list of numbers") from None


def read_prompts_file(path: Optional[str]) -> list[dict]:
    """The prompt entries of a prompts file (not yet tokenized), or the defaults."""
    if not path:
        return [dict(p) for p in DEFAULT_PROMPTS]
    if not os.path.isfile(path):
        raise ReferenceError(f"prompts file {path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ReferenceError(f"prompts file {path} is not valid JSON: {e}") from None
    entries = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ReferenceError(f"prompts file {path}: expected a non-empty list of prompts (or {{\"prompts\": [...]}})")
    return [normalize_entry(e, i, path) for i, e in enumerate(entries)]


def normalize_entry(entry, index: int, source: str = "prompts") -> dict:
    if isinstance(entry, str):
        entry = {"messages": [{"role": "user", "content": entry}]}
    if not isinstance(entry, dict):
        raise ReferenceError(f"{source}: prompt {index} must be a string or an object, got {entry!r}")
    kinds = [k for k in ("messages", "text", "ids") if k in entry]
    if len(kinds) != 1:
        raise ReferenceError(f"{source}: prompt {index} needs exactly one of 'messages', 'text', 'ids' "
                             f"(has {sorted(entry)})")
    out = {"name": str(entry.get("name", f"prompt{index}")), "kind": {"messages": "chat"}.get(kinds[0], kinds[0])}
    if "messages" in entry:
        messages = entry["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ReferenceError(f"{source}: prompt {index}: 'messages' must be a non-empty list of "
                                 "{'role': ..., 'content': ...}")
        out["messages"] = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    elif "text" in entry:
        if not isinstance(entry["text"], str) or not entry["text"]:
            raise ReferenceError(f"{source}: prompt {index}: 'text' must be a non-empty string")
        out["text"] = entry["text"]
    else:
        ids = entry["ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ReferenceError(f"{source}: prompt {index}: 'ids' must be a non-empty list of token ids")
        out["ids"] = list(ids)
    if "inject_start" in entry and "anchor" in entry:
        raise ReferenceError(f"{source}: prompt {index}: give 'inject_start' or 'anchor', not both")
    if "inject_start" in entry:
        if not isinstance(entry["inject_start"], int) or entry["inject_start"] < 0:
            raise ReferenceError(f"{source}: prompt {index}: 'inject_start' must be an integer >= 0")
        out["inject_start"] = entry["inject_start"]
    if "anchor" in entry:
        out["anchor"] = str(entry["anchor"])
    return out


# --- model ------------------------------------------------------------------------------------

def torch_dtype(name: str):
    import torch
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ReferenceError(f"--dtype={name!r}: choose float32, bfloat16 or float16") from None


def _has_tokenizer_files(folder: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any(os.path.exists(os.path.join(folder, n)) for n in names)


def load_model(model_dir: str, gguf_file: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
               attn_implementation: Optional[str] = None):
    """(model, tokenizer or None). device: cpu, cuda, cuda:N, or auto (accelerate's device_map)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.isdir(model_dir):
        raise ReferenceError(f"model folder {model_dir} not found")
    if gguf_file is None and not os.path.exists(os.path.join(model_dir, "config.json")):
        raise ReferenceError(f"{model_dir} has no config.json (pass --gguf_file=NAME for a .gguf model)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ReferenceError(f"--device={device} but torch sees no CUDA device")
        # A float32 reference must be float32: no TF32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch_dtype(dtype)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if device == "auto":
        kw["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()
    if device != "auto":
        model = model.to(device)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ReferenceError(f"{type(model).__name__} has no model.layers: not a Llama-style causal LM")
    tokenizer = None
    if gguf_file or _has_tokenizer_files(model_dir):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **({"gguf_file": gguf_file} if gguf_file else {}))
    return model, tokenizer


def _layers(model):
    return model.model.layers


def _input_device(model):
    return model.get_input_embeddings().weight.device


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


class Injection:
    """Forward hooks doing jax_introspect's injection (see the module docstring). Register before
    any recorder so recorded residuals include the injection. Also the tests' torch reference
    (`with Injection(model, ...):` removes the hooks on exit); `vector` may be [B, 1, D] for one
    vector per batch row. norm_match: "raw", "mlp_out", "residual" (or a bool, True = "mlp_out").
    Injected positions: start <= p, and p < end when `end` is given (None: no end)."""

    def __init__(self, model, layer: int, vector: np.ndarray, strength: float, start: int = 0,
                 norm_match="raw", end: Optional[int] = None):
        import torch
        self.vector = torch.as_tensor(np.asarray(vector, np.float32))
        self.strength, self.start, self.norm_match = float(strength), int(start), norm_mode_name(norm_match)
        self.end = None if end is None else int(end)
        self._mlp_out = None
        decoder_layer = _layers(model)[layer]
        self._handles = [decoder_layer.register_forward_hook(self._add, with_kwargs=True)]
        if self.norm_match == "mlp_out":
            self._handles.append(decoder_layer.mlp.register_forward_hook(self._capture_mlp))

    def _capture_mlp(self, module, args, output):
        self._mlp_out = output

    def _add(self, module, args, kwargs, output):
        hidden = _hidden(output)
        positions = kwargs.get("position_ids")
        if positions is None:
            raise ReferenceError("the decoder layer was called without position_ids; this transformers "
                                 "version is not supported by the injection hooks")
        vector = self.vector.to(hidden.device)
        if self.norm_match == "raw":
            delta = self.strength * vector
        else:
            # HF's layer output is the full residual stream; vllm-lens' order of operations.
            target = self._mlp_out if self.norm_match == "mlp_out" else hidden
            target_norm = target.float().norm(dim=-1, keepdim=True)
            delta = vector * (target_norm / (vector.norm(dim=-1, keepdim=True) + NORM_EPS)) * self.strength
        positions = positions.to(hidden.device)
        inside = positions >= self.start
        if self.end is not None:
            inside = inside & (positions < self.end)
        mask = inside[..., None].float()
        # Rounded to the model's dtype before the add, as jax_introspect does.
        return _with_hidden(output, hidden + (mask * delta).to(hidden.dtype))

    def remove(self):
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class Recorder:
    """Records each chosen decoder layer's output (float32, on the CPU)."""

    def __init__(self, model, layers: Sequence[int], last_token_only: bool = False):
        self.outputs = {}
        self.last_token_only = last_token_only
        self._handles = [_layers(model)[i].register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, index):
        def hook(module, args, output):
            h = _hidden(output)[0]
            self.outputs[index] = (h[-1] if self.last_token_only else h).detach().float().cpu().numpy()
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def _cache_argument(model) -> str:
    """transformers >= 5.2x names the KV cache `cache`; older versions `past_key_values`."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def run_prompt(model, ids: Sequence[int], residual_layers: Sequence[int], max_new_tokens: int,
               eos_ids: Sequence[int], injection: Optional[dict] = None) -> dict:
    """One prompt (batch 1): residuals [len(residual_layers), T, D], logits [T, V], the greedy
    continuation and the logits of each step."""
    import torch
    hooks = [Injection(model, **injection)] if injection else []
    recorder = Recorder(model, residual_layers)
    device = _input_device(model)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(ids)], device=device),
                        position_ids=torch.arange(len(ids), device=device)[None], use_cache=True)
            recorder.remove()
            logits = out.logits[0].float().cpu().numpy()
            past, last = _cache_of(out), out.logits[0, -1].float()
            tokens, step_logits = [], []
            for step in range(max_new_tokens):
                step_logits.append(last.cpu().numpy())
                token = int(torch.argmax(last))
                tokens.append(token)
                if token in eos_ids or step == max_new_tokens - 1:
                    break
                out = model(input_ids=torch.tensor([[token]], device=device),
                            position_ids=torch.tensor([[len(ids) + step]], device=device),
                            use_cache=True, **{_cache_argument(model): past})
                past, last = _cache_of(out), out.logits[0, -1].float()
    finally:
        recorder.remove()
        for h in hooks:
            h.remove()
    residuals = np.stack([recorder.outputs[i] for i in residual_layers]) if residual_layers else \
        np.zeros((0, len(ids), model.config.hidden_size), np.float32)
    return {"residuals": residuals.astype(np.float32), "logits": logits.astype(np.float32),
            "continuation": np.asarray(tokens, np.int64),
            "continuation_logits": np.stack(step_logits).astype(np.float32)}


# --- tokenization ------------------------------------------------------------------------------

def chat_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def anchor_start(tokenizer, text: str, anchor: str) -> int:
    """The token before the one holding the anchor's first character (jax_introspect.experiment.protocols.start_at_anchor)."""
    where = text.find(anchor)
    if where < 0:
        raise ReferenceError(f"anchor {anchor!r} not found in the prompt text")
    offsets = [a for a, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    index = max(i for i, a in enumerate(offsets) if a <= where)
    return max(index - 1, 0)


def tokenize_prompts(entries: Sequence[dict], tokenizer, default_start: int = 0) -> list[dict]:
    out = []
    for i, entry in enumerate(entries):
        prompt = dict(entry)
        if prompt["kind"] in ("chat", "text") and tokenizer is None:
            raise ReferenceError(f"prompt {i} ({prompt['name']}) is {prompt['kind']} but the model has no "
                                 "tokenizer: give token ids ({\"ids\": [...]}) in the prompts file")
        if prompt["kind"] == "chat":
            prompt["text"] = chat_text(tokenizer, prompt["messages"])
        if prompt["kind"] != "ids":
            prompt["ids"] = encode(tokenizer, prompt["text"])
        if "anchor" in prompt:
            if prompt["kind"] == "ids":
                raise ReferenceError(f"prompt {i}: an 'anchor' needs a text or chat prompt")
            prompt["inject_start"] = anchor_start(tokenizer, prompt["text"], prompt["anchor"])
        prompt.setdefault("inject_start", int(default_start))
        out.append(prompt)
    return out


def eos_ids_of(model, tokenizer) -> list[int]:
    """End-of-turn ids from the generation config and the tokenizer; none without a tokenizer
    (a model without one generates exactly --max_new_tokens tokens, as jax_introspect does)."""
    if tokenizer is None:
        return []
    ids = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids += value if isinstance(value, list) else ([] if value is None else [value])
    return sorted(set(int(i) for i in ids))


# --- concept vectors ------------------------------------------------------------------------

def concept_vectors(model, tokenizer, words: Sequence[str], baseline_words: Sequence[str],
                    template: str = DEFAULT_TEMPLATE) -> np.ndarray:
    """[n_words, n_layers, d_model] float32: last-token residuals of the chat prompt
    [user: template.format(word)] (with generation header), minus the baseline words' mean."""
    import torch
    if tokenizer is None:
        raise ReferenceError("concept words need a tokenizer; this model has none (use --vector_files)")
    if "{word}" not in template:
        raise ReferenceError(f"template {template!r} has no {{word}} placeholder")
    n_layers = len(_layers(model))

    def read(word):
        ids = encode(tokenizer, chat_text(tokenizer, [{"role": "user", "content": template.format(word=word)}]))
        recorder = Recorder(model, range(n_layers), last_token_only=True)
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids], device=_input_device(model)),
                      position_ids=torch.arange(len(ids), device=_input_device(model))[None])
        finally:
            recorder.remove()
        return np.stack([recorder.outputs[i] for i in range(n_layers)])
    acts = np.stack([read(w) for w in words])
    base = np.stack([read(w) for w in baseline_words])
    return (acts - base.mean(axis=0, keepdims=True)).astype(np.float32)


def load_vector_file(path: str) -> list[tuple[str, np.ndarray, dict]]:
    """(name, vector [D] or [L, D], info) from a .pt file (the 405B replication's
    {"direction", "concept", "layer", ...} dict, a dict name -> tensor, or a bare tensor), or a
    .npz written by jax_introspect.experiment.vectors.ConceptVectors.save (names + vectors [n, L, D])."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if not os.path.isfile(path):
        raise ReferenceError(f"vector file {path} not found")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if "vectors" not in data or "names" not in data:
                raise ReferenceError(f"{path}: expected 'names' and 'vectors' arrays (ConceptVectors.save)")
            return [(str(n), np.asarray(v, np.float32), {"file": path}) for n, v in zip(data["names"], data["vectors"])]
    import torch
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "direction" in data:
        info = {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool))}
        return [(str(data.get("concept", stem)), data["direction"].float().numpy(), {"file": path, **info})]
    if isinstance(data, dict):
        out = [(str(k), v.float().numpy(), {"file": path}) for k, v in data.items() if torch.is_tensor(v)]
        if not out:
            raise ReferenceError(f"{path}: a dict without tensors")
        return out
    if torch.is_tensor(data):
        array = data.float().numpy()
        if array.ndim == 3:
            return [(f"{stem}[{i}]", a, {"file": path}) for i, a in enumerate(array)]
        return [(stem, array, {"file": path})]
    raise ReferenceError(f"{path}: expected a tensor or a dict of tensors, got {type(data).__name__}")


# --- the reference run ---------------------------------------------------------------------

def config_fingerprint(config: dict) -> tuple[dict, str]:
    subset = {k: config.get(k) for k in FINGERPRINT_KEYS if k in config}
    digest = hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()
    return subset, digest


def _versions(device: str) -> dict:
    import torch
    import transformers
    info = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}
    if device.startswith("cuda") or device == "auto":
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


def build_reference(model, tokenizer, prompts: Sequence[dict], *, words: Sequence[str] = (),
                    baseline_words: Sequence[str] = (), template: str = DEFAULT_TEMPLATE,
                    vector_files: Sequence[str] = (), layers: Sequence[int] = (), strengths: Sequence[float] = (),
                    norm_match="raw", inject_start: int = 0, max_new_tokens: int = 16,
                    residual_layers: Optional[Sequence[int]] = None, device: str = "cpu", dtype: str = "float32",
                    model_path: str = "", gguf_file: Optional[str] = None, log=print) -> tuple[dict, dict]:
    """Run everything; returns (metadata, tensors). `prompts`: entries as read_prompts_file gives."""
    t0 = time.time()
    n_layers = len(_layers(model))
    config = json.loads(json.dumps(model.config.to_dict(), default=str))
    subset, digest = config_fingerprint(config)
    residual_layers = list(range(n_layers)) if residual_layers is None else sorted(set(int(i) for i in residual_layers))
    bad = [i for i in list(residual_layers) + list(layers) if not 0 <= i < n_layers]
    if bad:
        raise ReferenceError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    if max_new_tokens < 1:
        raise ReferenceError("--max_new_tokens must be >= 1")
    words = list(words)
    if words and not baseline_words:
        baseline_words = DEFAULT_BASELINE_WORDS
    prompts = tokenize_prompts([normalize_entry(p, i) if "kind" not in p else p for i, p in enumerate(prompts)],
                               tokenizer, inject_start)
    vocab = model.get_input_embeddings().weight.shape[0]
    for i, p in enumerate(prompts):
        if max(p["ids"]) >= vocab:
            raise ReferenceError(f"prompt {i}: token id {max(p['ids'])} >= the model's vocabulary ({vocab})")
    tensors, sources = {}, []
    if words:
        log(f"concept vectors: {len(words)} words, {len(baseline_words)} baseline words")
        vectors = concept_vectors(model, tokenizer, words, baseline_words, template)
        tensors["concept_vectors"] = vectors
        sources += [(f"word:{w}", vectors[i], {}) for i, w in enumerate(words)]
    files = []
    for path in vector_files:
        loaded = load_vector_file(path)
        files.append({"path": os.path.abspath(path), "names": [n for n, _, _ in loaded],
                      "info": [i for _, _, i in loaded]})
        sources += [(f"file:{n}", v, {}) for n, v, _ in loaded]
    d_model = model.config.hidden_size
    for name, vector, _ in sources:
        if vector.shape[-1] != d_model or vector.ndim not in (1, 2) or (vector.ndim == 2 and vector.shape[0] != n_layers):
            raise ReferenceError(f"vector {name} has shape {list(vector.shape)}; expected [{d_model}] or "
                                 f"[{n_layers}, {d_model}] for this model")
    if (layers or strengths) and not (layers and strengths and sources):
        raise ReferenceError("injection needs --layers, --strengths and vectors (--words or --vector_files)")
    norm_match = norm_mode_name(norm_match)
    cases = []
    for (name, vector, _), layer, strength in itertools.product(sources, layers, strengths):
        v = vector[layer] if vector.ndim == 2 else vector
        if norm_match != "raw" and strength != 0 and not np.linalg.norm(v) > 0:
            raise ReferenceError(f"vector {name} at layer {layer} is zero: norm_match needs a direction")
        index = len(cases)
        cases.append({"name": f"{name}@L{layer}x{strength:g}", "vector": name, "layer": int(layer),
                      "strength": float(strength), "norm_match": norm_match})
        tensors[f"case{index}.vector"] = np.asarray(v, np.float32)
    eos = eos_ids_of(model, tokenizer)
    runs = [(None, "clean")] + [(c, f"case{c}") for c in range(len(cases))]
    for c, prefix in runs:
        for i, p in enumerate(prompts):
            injection = None if c is None else dict(
                layer=cases[c]["layer"], vector=tensors[f"case{c}.vector"], strength=cases[c]["strength"],
                start=p["inject_start"], norm_match=cases[c]["norm_match"])
            out = run_prompt(model, p["ids"], residual_layers, max_new_tokens, eos, injection)
            for key, value in out.items():
                tensors[f"{prefix}.p{i}.{key}"] = value
        log(f"{prefix}: {len(prompts)} prompts done ({time.time() - t0:.1f}s)")
    probe = None
    if tokenizer is not None:
        chat_probe = chat_text(tokenizer, [{"role": "user", "content": "Hi"}])
        probe = {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer), "probe_text": PROBE_TEXT,
                 "probe_ids": encode(tokenizer, PROBE_TEXT), "chat_probe_text": chat_probe,
                 "chat_probe_ids": encode(tokenizer, chat_probe)}
    meta = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": os.path.abspath(model_path) if model_path else "", "gguf_file": gguf_file,
                  "config": config, "fingerprint": subset, "config_sha256": digest,
                  "n_layers": n_layers, "d_model": d_model, "vocab_size": int(vocab)},
        "tokenizer": probe,
        "run": {"device": device, "dtype": dtype, "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "seconds": round(time.time() - t0, 2), **_versions(device)},
        "residual_layers": residual_layers,
        "prompts": prompts,
        "concepts": {"method": "mean_difference", "position": "last", "words": words,
                     "baseline_words": list(baseline_words), "template": template} if words else None,
        "vector_files": files,
        "cases": cases,
        "max_new_tokens": int(max_new_tokens),
        "eos_ids": eos,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
    }
    return meta, tensors


def write_dump(out: str, meta: dict, tensors: dict) -> str:
    from safetensors.numpy import save_file
    os.makedirs(out, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out, TENSOR_FILE))
    with open(os.path.join(out, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False, default=str)  # written last: marks the dump complete
    return out


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts_file", default=None, help="JSON prompts (see the module docstring); "
                        "default: two short chat prompts")
    parser.add_argument("--words", default="", help="concept words (comma-separated or @file)")
    parser.add_argument("--baseline_words", default="", help="baseline words (comma-separated or @file; "
                        "default: the first 20 of Lindsey's list)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="concept prompt template")
    parser.add_argument("--vector_files", default="", help="comma-separated .pt / .npz vector files to inject")
    parser.add_argument("--layers", default="", help="injection layers, e.g. 10,20")
    parser.add_argument("--strengths", default="", help="injection strengths, e.g. 2,4")
    parser.add_argument("--norm_match", nargs="?", const="mlp_out", default="raw", choices=NORM_MODES,
                        help="raw: add strength * vector; mlp_out (bare --norm_match): strength is relative to "
                        "|mlp_out| per token (vllm-lens 1.1.0); residual: to the residual stream's norm "
                        "(vllm-lens >= 1.2.0)")
    parser.add_argument("--inject_start", type=int, default=0, help="first injected position (0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--residual_layers", default="", help="layers whose residuals are stored (default: all)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model folder (config.json + safetensors, or a .gguf)")
    parser.add_argument("--gguf_file", default=None, help="name of the .gguf file inside --model")
    parser.add_argument("--out", required=True, help="output folder for the dump")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu, or auto (multi-GPU)")
    parser.add_argument("--dtype", default="float32", help="torch dtype of the model: float32 or bfloat16")
    parser.add_argument("--attn_implementation", default=None, help="e.g. eager or sdpa (default: transformers')")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_model(args.model, args.gguf_file, args.device, args.dtype, args.attn_implementation)
        meta, tensors = build_reference(
            model, tokenizer, read_prompts_file(args.prompts_file), words=split_list(args.words),
            baseline_words=split_list(args.baseline_words), template=args.template,
            vector_files=split_list(args.vector_files), layers=parse_numbers(args.layers, int, "layers"),
            strengths=parse_numbers(args.strengths, float, "strengths"), norm_match=args.norm_match,
            inject_start=args.inject_start, max_new_tokens=args.max_new_tokens,
            residual_layers=parse_numbers(args.residual_layers, int, "residual_layers") or None,
            device=args.device, dtype=args.dtype, model_path=args.model, gguf_file=args.gguf_file,
            log=lambda m: print(m, file=sys.stderr))
    except ReferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_dump(args.out, meta, tensors)
    print(f"reference dump written to {args.out} ({len(meta['prompts'])} prompts, {len(meta['cases'])} "
          f"injection cases, {len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
