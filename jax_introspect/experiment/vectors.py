"""Concept vectors, for every layer at once, from one batched forward pass per prompt set.

- `concept_vectors` (Lindsey's method): the residual stream at the last prompt token of the chat
  prompt "Tell me about {word}" (the token just before the assistant's reply), minus the mean of
  the same over the baseline words. Not normalised: strength multiplies the natural vector.
- `contrast_vectors` (the 405B replication's RepE variant): mean over sentence pairs of
  act(positive) - act(negative) at the last token of each chat-templated sentence.
- `random_vectors`: Gaussian directions with the norm of given vectors (a control).

Vectors are saved as `.npz` (numpy-readable) with their metadata as JSON.
"""
from __future__ import annotations

import dataclasses
import json
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

    def vector(self, name: str, layer: int) -> np.ndarray:
        try:
            return self.vectors[self.names.index(name), layer]
        except ValueError as e:
            raise VectorError(f"no vector for {name!r}; have {self.names[:5]}...") from e

    def save(self, path: str) -> None:
        """Written atomically: a kill mid-save leaves the previous file (or none), never a torn one."""
        from jax_introspect.experiment.files import atomic_write
        atomic_write(path, lambda f: np.savez(f, vectors=self.vectors, names=np.asarray(self.names),
                                              metadata=np.asarray(json.dumps(self.metadata))))

    @classmethod
    def load(cls, path: str) -> "ConceptVectors":
        with np.load(path, allow_pickle=False) as data:
            return cls(names=[str(n) for n in data["names"]], vectors=data["vectors"],
                       metadata=json.loads(str(data["metadata"])))


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
                     read_at: Optional[Sequence[str]] = None, progress: Optional[str] = None) -> np.ndarray:
    """[n_texts, n_layers, d_model] float32: the residual after each layer of each text's chat
    prompt (with the assistant generation header). By default at the last token, the one just
    before the reply; with `read_at[i]` (a substring of text i), at the token holding its last
    character."""
    from jax_introspect.tokenizer import token_index_at_char
    prompts, indices = [], []
    for i, text in enumerate(user_texts):
        chat = lm.tokenizer.chat_prompt([{"role": "user", "content": text}], system_header=system_header)
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
                    system_header: bool = True, position: str = "last", progress: bool = False) -> ConceptVectors:
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
                                progress=label if progress else None)
    acts, base = read(words, "concept prompts"), read(baseline_words, "baseline prompts")
    return ConceptVectors(names=words, vectors=(acts - base.mean(axis=0, keepdims=True)).astype(np.float32),
                          metadata=_metadata(lm, "mean_difference", template=template, words=words,
                                             baseline_words=list(baseline_words), system_header=system_header,
                                             position=position))


def contrast_vectors(lm, pairs: dict[str, Sequence[tuple[str, str]]], normalize: bool = True,
                     system_header: bool = True) -> ConceptVectors:
    """`pairs`: concept name -> [(positive text, negative text), ...]. With `normalize`, each
    layer's vector has unit norm (the replication's vectors are unit vectors)."""
    if not pairs:
        raise VectorError("no contrast pairs given")
    names, vectors = [], []
    for name, concept_pairs in pairs.items():
        if not concept_pairs:
            raise VectorError(f"concept {name!r} has no contrast pairs")
        pos = prompt_residuals(lm, [p for p, _ in concept_pairs], system_header)
        neg = prompt_residuals(lm, [n for _, n in concept_pairs], system_header)
        vec = (pos - neg).mean(axis=0)
        if normalize:
            vec = vec / np.maximum(np.linalg.norm(vec, axis=-1, keepdims=True), 1e-30)
        names.append(name)
        vectors.append(vec)
    return ConceptVectors(names=names, vectors=np.stack(vectors).astype(np.float32),
                          metadata=_metadata(lm, "contrast_pairs", normalize=normalize,
                                             pairs={k: [list(p) for p in v] for k, v in pairs.items()},
                                             system_header=system_header))


def random_vectors(like: ConceptVectors, seed: int = 0) -> ConceptVectors:
    """Random Gaussian directions with, per name and layer, the norm of `like`'s vector."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal(like.vectors.shape).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    norms = np.linalg.norm(like.vectors, axis=-1, keepdims=True)
    return ConceptVectors(names=[f"random:{n}" for n in like.names], vectors=(directions * norms).astype(np.float32),
                          metadata={**like.metadata, "method": "random_matched_norm", "seed": seed,
                                    "matched_to": like.metadata.get("method")})
