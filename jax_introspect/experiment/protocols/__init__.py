"""Protocol data (prompts, word lists), each file citing its source."""
from __future__ import annotations

import json
import os
from typing import Optional

class ProtocolError(ValueError):
    """A protocol whose prompt or window cannot be used; the message names the fix."""


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
    """A protocol's data: prompts.json's, or one of Lindsey's other experiments (`experiments.py`,
    data/lindsey_experiments.json: per-sentence prompts, marked by an "experiment" key)."""
    protocols = dict(_read("prompts.json")["protocols"], **_read("lindsey_experiments.json")["protocols"])
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


# --- where a protocol's injection starts (a token position of its prompt) ----------------------

def start_at_anchor(tokenizer, prompt_text: str, anchor: str, *, token_before: bool = True,
                    occurrence: int = 0) -> int:
    """Token position where injection starts: the token just before the one holding `anchor`
    (Lindsey's window starts at the token before "Trial 1"). Works on character offsets, so a
    tokenizer that merges ".\\n\\n" into one token still finds it."""
    from jax_introspect.tokenizer import token_index_at_char
    position = -1
    for _ in range(occurrence + 1):
        position = prompt_text.find(anchor, position + 1)
        if position < 0:
            raise ProtocolError(f"anchor {anchor!r} not found in the prompt text "
                                f"(occurrence {occurrence}); check the protocol's anchor string")
    ids, offsets = tokenizer.encode_with_offsets(prompt_text)
    index = token_index_at_char(offsets, position)
    return max(index - 1, 0) if token_before else index


ALL_POSITIONS = 0


def window_start(tokenizer, prompt_text: str, window: str, anchor: Optional[str] = None) -> int:
    """First injected position for a protocol's window: 'anchor' (Lindsey: from the token before
    `anchor` on) or 'all_positions'."""
    if window == "all_positions":
        return ALL_POSITIONS
    if window == "anchor":
        if not anchor:
            raise ProtocolError("an 'anchor' window needs an anchor string")
        return start_at_anchor(tokenizer, prompt_text, anchor)
    raise ProtocolError(f"unknown injection window {window!r}; use 'anchor' or 'all_positions'")
