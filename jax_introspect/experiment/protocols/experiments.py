"""Lindsey's other experiments as protocols: distinguishing thoughts from text, prefill detection,
intentional control (data/lindsey_experiments.json, with its sources; docs/experiments.md).

Unlike the injected-thought protocols, whose one prompt serves every trial, these prompts hold
`{sentence}` and `{word}`: each trial uses one of the paper's sentence/word pairs (the pair whose
word it injects or names), so a protocol has one prompt per pair. The sweep plans them through
`plan_trials` (`trials`) and `prompt_infos` (one `PromptInfo` per pair, keyed `prompt_key`), and
injects on the sentence's tokens only (`sentence_window`).

Which pairs a sweep uses: those whose word is in the sweep's `words` (the vectors are extracted for
exactly those words), in the order of the data file.
"""
from __future__ import annotations

import functools
import json
import os
import random
from typing import Optional

from jax_introspect.experiment.protocols import ProtocolError

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lindsey_experiments.json")
EXPERIMENTS = ("thoughts_vs_text", "prefill_detection", "intentional_control")


@functools.lru_cache(maxsize=None)
def data() -> dict:
    with open(DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


def names() -> list[str]:
    return list(data()["protocols"])


def is_experiment(name: str) -> bool:
    """Whether `name` is one of these protocols (per-pair prompts, their own graders and report)."""
    return name in data()["protocols"]


def spec(name: str) -> dict:
    if not is_experiment(name):
        raise ProtocolError(f"{name!r} is not one of Lindsey's other experiments ({names()})")
    return data()["protocols"][name]


def experiment_of(name: str) -> Optional[str]:
    return data()["protocols"][name]["experiment"] if is_experiment(name) else None


def all_pairs() -> list[tuple[str, str]]:
    """The paper's 50 (sentence, word) pairs."""
    d = data()
    return list(zip(d["sentences"], d["words"]))


def pairs_for(words) -> list[tuple[str, str]]:
    """The pairs whose word is in `words` (the data file's order). Every word must have a pair."""
    by_word = {w.lower(): (s, w) for s, w in all_pairs()}
    missing = [w for w in words if w.lower() not in by_word]
    if missing:
        raise ProtocolError(f"words {missing} have no sentence in {os.path.basename(DATA_FILE)}; the experiments "
                            f"use the paper's sentence/word pairs, whose words are: {', '.join(w for _, w in all_pairs())}")
    wanted = {w.lower() for w in words}
    return [(s, w) for s, w in all_pairs() if w.lower() in wanted]


def prompt_word(word: str) -> str:
    """How a word is written inside these prompts: lower-cased ('bread')."""
    return word.lower()


def messages(name: str, sentence: str, word: str) -> list[dict]:
    """The protocol's chat messages for one pair (placeholders filled in one pass)."""
    values = {"{sentence}": sentence, "{word}": prompt_word(word)}

    def fill(text: str) -> str:
        out, i = [], 0
        while i < len(text):
            for key, value in values.items():
                if text.startswith(key, i):
                    out.append(value)
                    i += len(key)
                    break
            else:
                out.append(text[i])
                i += 1
        return "".join(out)
    return [{"role": m["role"], "content": fill(m["content"])} for m in spec(name)["messages"]]


def prompt_key(name: str, word: str) -> str:
    """The key of a protocol's prompt for the pair of `word` (a sweep's `prompts` dict)."""
    return f"{name}|{word}"


def sentence_window(tokenizer, prompt_text: str, sentence: str, occurrence: int = 0) -> tuple[int, int]:
    """[start, end) token positions of `sentence` in `prompt_text`: from the token holding its first
    character to one past the token holding its last, by character offsets (a token merged across
    the boundary is included whole). `occurrence`: which occurrence of the sentence (0: first)."""
    from jax_introspect.tokenizer import token_index_at_char
    position = -1
    for _ in range(occurrence + 1):
        position = prompt_text.find(sentence, position + 1)
        if position < 0:
            raise ProtocolError(f"sentence {sentence!r} not found in the prompt text")
    _, offsets = tokenizer.encode_with_offsets(prompt_text)
    start = token_index_at_char(offsets, position)
    end = token_index_at_char(offsets, position + len(sentence) - 1) + 1
    return start, end


def window(tokenizer, name: str, prompt_text: str, sentence: str) -> Optional[tuple[int, int]]:
    """The protocol's injection window in this prompt, or None (no injection)."""
    kind = spec(name)["window"]
    if kind == "none":
        return None
    if kind == "sentence":
        return sentence_window(tokenizer, prompt_text, sentence)
    raise ProtocolError(f"protocol {name}: unknown window {kind!r}")


def question(name: str, sentence: str, word: str) -> str:
    """The last user turn (what graders see)."""
    return [m for m in messages(name, sentence, word) if m["role"] == "user"][-1]["content"]


def injects(name: str) -> bool:
    return spec(name)["window"] != "none"


def trials(config, name: str, layers: list[int], make_trial) -> list:
    """A protocol's trials in a fixed order (ids are the resume keys). `make_trial(trial_id, kind,
    word, layer, strength, index)` builds one.

    Injecting protocols: per (layer, strength), `trials_per_cell` trials cycling through the pairs
    in one shuffled order (seeded by the config's seed, the same order for every protocol, so the
    word and repeat tasks see the same pairs); then `control_trials` controls (no injection, the
    pair's word still named in the trial: the chance rate of naming it / of accepting it), cycling
    the same order. Intentional control (no injection): `trials_per_cell` trials per condition, the
    same pairs in the same order in every condition (trial i of 'think' and of 'dont_think' share a
    pair: the difference is paired); layers and strengths are not used (cosines are recorded at
    every layer)."""
    words = [w for _, w in pairs_for(config.words)]
    order = list(words)
    random.Random(config.seed).shuffle(order)
    out = []
    from jax_introspect.experiment.sweep_config import strength_label
    if injects(name):
        for layer in layers:
            for strength in config.strengths:
                for i in range(config.trials_per_cell):
                    word = order[i % len(order)]
                    out.append(make_trial(f"{name}/L{layer}/s{strength_label(strength)}/{word}/{i}", "injected",
                                          word, layer, float(strength), i))
        for i in range(config.control_trials):
            word = order[i % len(order)]
            out.append(make_trial(f"{name}/control/{word}/{i}", "control", word, None, 0.0, i))
    else:
        for i in range(config.trials_per_cell):
            word = order[i % len(order)]
            out.append(make_trial(f"{name}/{word}/{i}", "control", word, None, 0.0, i))
    return out


def check_config(config) -> None:
    """What the sweep config must satisfy for these protocols (no model needed)."""
    experiment_protocols = [p for p in config.protocols if is_experiment(p)]
    if experiment_protocols:
        pairs_for(config.words)
