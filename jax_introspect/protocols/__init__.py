"""Protocol data (prompts, word lists), each file citing its source."""
from __future__ import annotations

import json
import os

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _read(name: str) -> dict:
    with open(os.path.join(_DATA, name)) as f:
        return json.load(f)


def concept_words() -> list[str]:
    """Lindsey's 50 test concepts."""
    return list(_read("concept_words.json")["words"])


def baseline_words() -> list[str]:
    """Lindsey's 100 baseline words (the published list, 'Butterflies' twice)."""
    return list(_read("baseline_words.json")["words"])


def protocol(name: str) -> dict:
    protocols = _read("prompts.json")["protocols"]
    if name not in protocols:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(protocols)}")
    return protocols[name]


def contrast_pairs(names=None) -> dict[str, list[tuple[str, str]]]:
    """Positive/negative sentence pairs per concept (see the data file's source note)."""
    pairs = {k: [tuple(p) for p in v] for k, v in _read("contrast_pairs.json")["pairs"].items()}
    if names is None:
        return pairs
    unknown = sorted(set(names) - set(pairs))
    if unknown:
        raise ValueError(f"no contrast pairs for {unknown}; known: {sorted(pairs)}")
    return {n: pairs[n] for n in names}


def question(protocol_data: dict) -> str:
    """The last user turn: the question the model answers (what graders see)."""
    return [m for m in protocol_data["messages"] if m["role"] == "user"][-1]["content"]
