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
        except ValueError:
            raise VectorError(f"no vector for {name!r}; have {self.names[:5]}...") from None

    def save(self, path: str) -> None:
        np.savez(path, vectors=self.vectors, names=np.asarray(self.names),
                 metadata=np.asarray(json.dumps(self.metadata)))

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


def last_token_residuals(lm, user_texts: Sequence[str], system_header: bool = True,
                         progress: Optional[str] = None) -> np.ndarray:
    """[n_texts, n_layers, d_model] float32: the residual after each layer at the last token of
    each text's chat prompt (with the assistant generation header, so the last token is the one
    just before the reply)."""
    prompts = [lm.tokenizer.encode_chat([{"role": "user", "content": t}], system_header=system_header)
               for t in user_texts]
    chunks = range(0, len(prompts), _BATCH)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc=progress, unit="batch")
    out = []
    for i in chunks:
        residuals = lm.residuals(prompts[i:i + _BATCH])  # [L, b, T, D], left-padded: last column is last token
        out.append(np.transpose(residuals[:, :, -1, :], (1, 0, 2)))
    return np.concatenate(out, axis=0)


def _metadata(lm, method: str, **extra) -> dict:
    return {"method": method, "model": lm.path, "model_name": lm.config.name, "n_layers": lm.config.n_layers,
            "d_model": lm.config.d_model, "dtype": str(lm.dtype), "layers": list(range(lm.config.n_layers)),
            **extra}


def concept_vectors(lm, words: Sequence[str], baseline_words: Sequence[str], template: str = DEFAULT_TEMPLATE,
                    system_header: bool = True, progress: bool = False) -> ConceptVectors:
    words = check_words(words, "concept word")
    baseline_words = check_words(baseline_words, "baseline word", allow_duplicates=True)
    if "{word}" not in template:
        raise VectorError(f"template {template!r} has no {{word}} placeholder")
    acts = last_token_residuals(lm, [template.format(word=w) for w in words], system_header,
                                "concept prompts" if progress else None)
    base = last_token_residuals(lm, [template.format(word=w) for w in baseline_words], system_header,
                                "baseline prompts" if progress else None)
    return ConceptVectors(names=words, vectors=(acts - base.mean(axis=0, keepdims=True)).astype(np.float32),
                          metadata=_metadata(lm, "mean_difference", template=template, words=words,
                                             baseline_words=list(baseline_words), system_header=system_header))


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
        pos = last_token_residuals(lm, [p for p, _ in concept_pairs], system_header)
        neg = last_token_residuals(lm, [n for _, n in concept_pairs], system_header)
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
