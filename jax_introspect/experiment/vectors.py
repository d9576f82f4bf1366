"""Concept vectors, for every layer at once, from one batched forward pass per prompt set.

- `concept_vectors` (Lindsey's method): the residual stream at the last prompt token of the chat
  prompt "Tell me about {word}" (the token just before the assistant's reply), minus the mean of
  the same over the baseline words. Not normalised: strength multiplies the natural vector.
- `contrast_vectors` (the 405B replication's recipe, `build_vector` of its
  lindsey_full_sweep.py): each sentence alone as one user turn of the chat template with the
  generation prompt, the residual after each decoder layer at the last prompt token,
  mean(positives) - mean(negatives), unit-normalised.
- `random_vectors`: Gaussian directions with the norm of given vectors (a control).
- `vectors_from_files`: vectors computed elsewhere, e.g. the replication's torch `.pt` files
  (`read_pt_vectors`) or our `.npz`, checked against a sweep's words, layers and width.

Every extraction takes a `prefix`, text put before each chat prompt: the doubled BOS of a
vLLM run (`vllm.LLM.generate` on an already templated Llama-3 string adds a second
`<|begin_of_text|>`) is `prefix="<|begin_of_text|>"`.

Vectors are saved as `.npz` (numpy-readable) with their metadata as JSON.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional, Sequence

import numpy as np

DEFAULT_TEMPLATE = "Tell me about {word}"
_BATCH = 16


class VectorError(ValueError):
    pass


@dataclasses.dataclass
class ConceptVectors:
    names: list[str]
    vectors: np.ndarray  # float32 [n_names, n_layers, d_model]
    metadata: dict
    # The model layer of each column of `vectors`; None: column i is layer i (every layer).
    layers: Optional[list[int]] = None

    def vector(self, name: str, layer: int) -> np.ndarray:
        try:
            row = self.names.index(name)
        except ValueError as e:
            raise VectorError(f"no vector for {name!r}; have {self.names[:5]}...") from e
        if self.layers is None:
            return self.vectors[row, layer]
        if layer not in self.layers:
            raise VectorError(f"no vector at layer {layer}; these vectors are for layers {self.layers}")
        return self.vectors[row, self.layers.index(layer)]

    def save(self, path: str) -> None:
        """Written atomically: a kill mid-save leaves the previous file (or none), never a torn one."""
        from jax_introspect.experiment.files import atomic_write
        layers = {} if self.layers is None else {"layers": np.asarray(self.layers, np.int64)}
        atomic_write(path, lambda f: np.savez(f, vectors=self.vectors, names=np.asarray(self.names),
                                              metadata=np.asarray(json.dumps(self.metadata)), **layers))

    @classmethod
    def load(cls, path: str) -> "ConceptVectors":
        with np.load(path, allow_pickle=False) as data:
            return cls(names=[str(n) for n in data["names"]], vectors=data["vectors"],
                       metadata=json.loads(str(data["metadata"])),
                       layers=[int(l) for l in data["layers"]] if "layers" in data.files else None)


def check_words(words: Sequence[str], what: str, allow_duplicates: bool = False) -> list[str]:
    words = list(words)
    if not words:
        raise VectorError(f"the {what} list is empty")
    if any(not isinstance(w, str) or not w.strip() for w in words):
        raise VectorError(f"the {what} list holds empty or non-string entries")
    if not allow_duplicates:
        seen, dupes = set(), []
        for w in words:
            (dupes.append(w) if w in seen else seen.add(w))
        if dupes:
            raise VectorError(f"the {what} list repeats {sorted(set(dupes))}; remove the duplicates")
    return words


def prompt_residuals(lm, user_texts: Sequence[str], system_header: bool = True,
                     read_at: Optional[Sequence[str]] = None, progress: Optional[str] = None,
                     prefix: str = "") -> np.ndarray:
    """[n_texts, n_layers, d_model] float32: the residual after each layer of each text's chat
    prompt (one user turn with the assistant generation header, after `prefix`). By default at
    the last token, the one just before the reply; with `read_at[i]` (a substring of text i), at
    the token holding its last character."""
    from jax_introspect.tokenizer import token_index_at_char
    prompts, indices = [], []
    for i, text in enumerate(user_texts):
        chat = prefix + lm.tokenizer.chat_prompt([{"role": "user", "content": text}], system_header=system_header)
        ids, offsets = lm.tokenizer.encode_with_offsets(chat)
        index = len(ids) - 1
        if read_at is not None:
            where = chat.rfind(read_at[i])
            if where < 0:
                raise VectorError(f"{read_at[i]!r} not found in prompt {text!r}")
            index = token_index_at_char(offsets, where + len(read_at[i]) - 1)
        prompts.append(ids)
        indices.append(index - len(ids))  # from the end: rows are left-padded
    chunks = range(0, len(prompts), _BATCH)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc=progress, unit="batch")
    out = []
    for i in chunks:
        residuals = lm.residuals(prompts[i:i + _BATCH])  # [L, b, T, D]
        cols = np.asarray(indices[i:i + _BATCH]) + residuals.shape[2]
        out.append(np.transpose(residuals[:, np.arange(len(cols)), cols, :], (1, 0, 2)))
    return np.concatenate(out, axis=0)


def _metadata(lm, method: str, **extra) -> dict:
    return {"method": method, "model": lm.path, "model_name": lm.config.name, "n_layers": lm.config.n_layers,
            "d_model": lm.config.d_model, "dtype": str(lm.dtype), "layers": list(range(lm.config.n_layers)),
            **extra}


POSITIONS = ("last", "word")


def concept_vectors(lm, words: Sequence[str], baseline_words: Sequence[str], template: str = DEFAULT_TEMPLATE,
                    system_header: bool = True, position: str = "last", progress: bool = False,
                    prefix: str = "") -> ConceptVectors:
    """Lindsey's mean-difference vectors for every layer. `position="last"` reads the token
    before the reply (the paper's choice); `"word"` reads the word's own last token, a variant
    that steers small models (e.g. SmolLM2-135M) far more strongly."""
    words = check_words(words, "concept word")
    baseline_words = check_words(baseline_words, "baseline word", allow_duplicates=True)
    if "{word}" not in template:
        raise VectorError(f"template {template!r} has no {{word}} placeholder")
    if position not in POSITIONS:
        raise VectorError(f"position {position!r}: choose one of {POSITIONS}")

    def read(word_list, label):
        return prompt_residuals(lm, [template.format(word=w) for w in word_list], system_header,
                                read_at=list(word_list) if position == "word" else None,
                                progress=label if progress else None, prefix=prefix)
    acts, base = read(words, "concept prompts"), read(baseline_words, "baseline prompts")
    return ConceptVectors(names=words, vectors=(acts - base.mean(axis=0, keepdims=True)).astype(np.float32),
                          metadata=_metadata(lm, "mean_difference", template=template, words=words,
                                             baseline_words=list(baseline_words), system_header=system_header,
                                             position=position, prefix=prefix))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def contrast_vectors(lm, pairs: dict[str, Sequence[tuple[str, str]]], normalize: bool = True,
                     system_header: bool = True, prefix: str = "") -> ConceptVectors:
    """`pairs`: concept name -> [(positive text, negative text), ...]. The replication's recipe:
    mean over positives minus mean over negatives of the residual after each layer at the last
    token of each sentence's chat prompt; with `normalize`, unit norm per layer (its `.pt`
    directions). The metadata keeps, per concept and layer, the raw difference's norm and the
    cosine of the two means (its `raw_norm` and `pos_neg_cosine`)."""
    if not pairs:
        raise VectorError("no contrast pairs given")
    names, vectors, raw_norms, cosines = [], [], {}, {}
    for name, concept_pairs in pairs.items():
        if not concept_pairs:
            raise VectorError(f"concept {name!r} has no contrast pairs")
        pos = prompt_residuals(lm, [p for p, _ in concept_pairs], system_header, prefix=prefix).mean(axis=0)
        neg = prompt_residuals(lm, [n for _, n in concept_pairs], system_header, prefix=prefix).mean(axis=0)
        raw = pos - neg  # [n_layers, d_model]
        names.append(name)
        vectors.append(_unit(raw) if normalize else raw)
        raw_norms[name] = np.linalg.norm(raw, axis=-1).tolist()
        cosines[name] = (_unit(pos) * _unit(neg)).sum(-1).tolist()
    return ConceptVectors(names=names, vectors=np.stack(vectors).astype(np.float32),
                          metadata=_metadata(lm, "contrast_pairs", normalize=normalize,
                                             pairs={k: [list(p) for p in v] for k, v in pairs.items()},
                                             system_header=system_header, prefix=prefix, raw_norm=raw_norms,
                                             pos_neg_cosine=cosines))


def random_vectors(like: ConceptVectors, seed: int = 0) -> ConceptVectors:
    """Random Gaussian directions with, per name and layer, the norm of `like`'s vector."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal(like.vectors.shape).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    norms = np.linalg.norm(like.vectors, axis=-1, keepdims=True)
    return ConceptVectors(names=[f"random:{n}" for n in like.names], vectors=(directions * norms).astype(np.float32),
                          metadata={**like.metadata, "method": "random_matched_norm", "seed": seed,
                                    "matched_to": like.metadata.get("method")}, layers=like.layers)


# --- vectors made elsewhere: the 405B replication's torch .pt files, our .npz ---------------------

VECTOR_FILE_TYPES = (".pt", ".npz")


def file_digest(path: str) -> str:
    """sha256 of a file's bytes: what binds a sweep to its vector files (not their paths)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_pt_vectors(path: str) -> list[dict]:
    """A torch .pt vector file: the replication's {"direction", "concept", "layer", ...} dict, a
    dict name -> tensor, or a bare tensor. Returns [{"name", "vector" (float32), "file", and the
    dict's scalar fields: "layer", "raw_norm", ...}]."""
    if not os.path.isfile(path):
        raise VectorError(f"vector file {path} not found")
    try:
        import torch
    except ImportError as e:
        raise VectorError("reading .pt vector files needs torch (pip install torch)") from e
    import pickle
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise VectorError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from e
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
    raise VectorError(f"{path}: expected a tensor, a dict of tensors or a replication vector dict")


def read_npz_vectors(path: str) -> list[dict]:
    """Our `.npz` vectors (`ConceptVectors.save`): one row per name and layer, like `read_pt_vectors`."""
    import zipfile
    if not os.path.isfile(path):
        raise VectorError(f"vector file {path} not found")
    try:
        saved = ConceptVectors.load(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise VectorError(f"{path} is not a readable vector file ({type(e).__name__}: {e})") from e
    layers = saved.layers if saved.layers is not None else range(saved.vectors.shape[1])
    return [{"name": name, "vector": saved.vectors[i, j], "layer": int(layer), "file": path}
            for i, name in enumerate(saved.names) for j, layer in enumerate(layers)]


def read_vector_file(path: str) -> list[dict]:
    if path.endswith(".pt"):
        return read_pt_vectors(path)
    if path.endswith(".npz"):
        return read_npz_vectors(path)
    raise VectorError(f"vector file {path}: expected one of {VECTOR_FILE_TYPES} (the replication's torch "
                      "files or ours)")


def _is_layer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def vectors_from_files(paths: Sequence[str], words: Sequence[str], layers: Sequence[int],
                       d_model: int) -> ConceptVectors:
    """The vector of every (word, layer) of a sweep, from `.pt` files (the replication's: one
    concept at one layer each) and `.npz` sets (ours: names x layers). Refused: a vector of width
    other than `d_model`; a (word, layer) with no vector, or with two; a `.pt` vector that names
    no layer, or whose concept or layer the sweep does not run (it was made for that one use: a
    mismatch is a mistake); a file none of whose vectors the sweep uses (an `.npz` may hold more
    words and layers than it uses). The vectors are injected as stored (the replication's are
    unit vectors)."""
    words, layers = list(words), [int(l) for l in layers]
    if not paths:
        raise VectorError("no vector files given")
    found = {}  # (word, layer) -> row
    for path in paths:
        used = 0
        for row in read_vector_file(path):
            name, layer = row["name"], row.get("layer")
            where = f"{path}: the vector of {name!r}" + (f" at layer {layer}" if layer is not None else "")
            if not _is_layer(layer):
                raise VectorError(f"{where} names no layer (a .pt needs the replication's 'layer' field)")
            if row["vector"].shape != (d_model,):
                raise VectorError(f"{where} has shape {tuple(row['vector'].shape)}, but this model's d_model is "
                                  f"{d_model}: it was made for another model")
            if path.endswith(".pt") and name not in words:
                raise VectorError(f"{where}: {name!r} is not among the sweep's words {words}")
            if path.endswith(".pt") and layer not in layers:
                raise VectorError(f"{where}: layer {layer} is not one of the sweep's layers {layers}; a vector "
                                  "is injected at the layer it was read from")
            if name not in words or layer not in layers:
                continue
            if (name, layer) in found:
                raise VectorError(f"{where}: a second vector for {name!r} at layer {layer} (the first is in "
                                  f"{found[(name, layer)]['file']}); give each once")
            found[(name, int(layer))] = row
            used += 1
        if not used:
            raise VectorError(f"{path} holds no vector for the sweep's words {words} at its layers {layers}")
    missing = [f"{w!r} at layer {l}" for w in words for l in layers if (w, l) not in found]
    if missing:
        raise VectorError(f"no vector for {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} in "
                          f"{list(paths)}: every word needs a vector at every layer of the sweep")
    return ConceptVectors(
        names=words, layers=layers,
        vectors=np.stack([[found[(w, l)]["vector"] for l in layers] for w in words]).astype(np.float32),
        metadata={"method": "files", "d_model": d_model, "layers": layers,
                  "files": [{"path": os.path.abspath(p), "sha256": file_digest(p)} for p in paths],
                  "sources": {f"{w}/L{l}": {k: v for k, v in found[(w, l)].items() if k != "vector"}
                              for w in words for l in layers}})
