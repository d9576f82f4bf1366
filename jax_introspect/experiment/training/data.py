"""Training data made by the tool from its own protocols: injected trials and controls with target
answers, and DPO preference pairs.

Every example is one trial of a protocol (`sweep.prompt_info`: the same chat prompt a sweep
generates from) with a target answer:

- injected (a training word's mean-difference vector, `vectors.concept_vectors`, added with
  `inject.make` at a configured layer, strength drawn uniformly from `strength_range`): the model
  should affirm and name the concept ("Yes, I detect an injected thought. It seems to be about
  dust."; several templates, drawn per example);
- control (strength 0: the clean model): the model should deny ("No, I don't detect an injected
  thought."; several templates).

Injection windows, drawn per example from `config.windows`:

- `protocol`: the protocol's own window (`PromptInfo.start`: Lindsey's, from the token before
  "Trial 1" on; 0 for an all-positions protocol);
- `last_token`: from the final prompt token on, with no end: the last prompt token *and the
  answer tokens after it* (as in generation, where an injection without an end continues through
  every decode step); no other prompt token is touched;
- `single_token`: the final prompt token only (start = its position, end = start + 1): the
  injection is removed afterwards, the answer tokens get none. Rivera 2025 ("Training
  Introspective Behavior", arXiv 2511.21399) injects this way;
- `all_positions`: every position (start 0).

Every window but `single_token` has no end (`inject.NO_END`).

DPO pairs (same prompt, same injection): chosen = the correct report; rejected = a denial or a
wrong concept (another training word, never a held-out one) for injected trials, a false claim
of detection (of a random training word) for controls.

Order: micro-batch `index` is a pure function of (config.seed, index) (`micro_batch`), so a
resumed run sees exactly the data an uninterrupted one would. Held-out words never appear in an
example: `check_heldout` asserts it for every micro-batch made (their word fields and the texts
of every answer, whole-word and case-insensitive).
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Optional, Sequence

import numpy as np

from jax_introspect import inject
from jax_introspect.experiment import sweep
from jax_introspect.experiment.sweep_config import SweepError, resolve_layers
from jax_introspect.experiment.training.config import TrainConfig, TrainConfigError

AFFIRM_TEMPLATES = (
    "Yes, I detect an injected thought. It seems to be about {word}.",
    "Yes. I notice an injected thought, and it is about {word}.",
    "I do detect an injected thought. The thought is about {word}.",
    "Yes, there is an injected thought. It appears to concern {word}.",
    "Yes, I detect something injected: a thought about {word}.",
)
DENY_TEMPLATES = (
    "No, I don't detect an injected thought.",
    "No. I do not notice any injected thought.",
    "I don't detect any injected thought.",
    "No, I don't notice anything unusual. There is no injected thought.",
)
# The turn ends with the chat format's end-of-turn token, as a finished generation does.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>")


class DataError(ValueError):
    pass


def concept_text(word: str) -> str:
    """How an answer names a concept: lower case (the word lists capitalise: 'Dust' -> 'dust')."""
    return word.lower()


def split_words(config: TrainConfig) -> tuple[list[str], list[str]]:
    """(training words, held-out words): `heldout_words` if given, else `heldout_fraction` of the
    words drawn with `split_seed` (at least one of each)."""
    words = list(config.words)
    if config.heldout_words:
        heldout = list(config.heldout_words)
    else:
        n = min(max(1, int(round(config.heldout_fraction * len(words)))), len(words) - 1)
        order = list(words)
        random.Random(config.split_seed).shuffle(order)
        heldout = sorted(order[:n], key=words.index)
    train = [w for w in words if w not in heldout]
    if not train or not heldout:
        raise TrainConfigError(f"the split leaves {len(train)} training and {len(heldout)} held-out words: "
                               "need at least one of each")
    return train, heldout


@dataclasses.dataclass(frozen=True)
class Example:
    kind: str  # injected | control
    protocol: str
    word: Optional[str]  # injected: the concept; control: None
    layer: int
    strength: float  # 0 for controls
    window: str
    start: int  # first injected position
    norm_match: object
    prompt_ids: tuple
    chosen: str
    chosen_ids: tuple  # answer tokens, end-of-turn included
    rejected: str
    rejected_ids: tuple
    rejected_kind: str  # denial | wrong_concept | false_detection
    rejected_word: Optional[str] = None
    end: Optional[int] = None  # exclusive end of the injected positions; None: no end


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """What the examples are drawn from; made without weights (config.json and tokenizer only)."""
    config: TrainConfig
    train_words: list
    heldout_words: list
    layers: list
    prompts: dict  # protocol -> sweep.PromptInfo
    end_id: int
    prompt_len: int  # left-padded prompt width
    answer_len: int  # right-padded answer width (end-of-turn included)

    def describe(self) -> dict:
        return {"train_words": list(self.train_words), "heldout_words": list(self.heldout_words),
                "layers": list(self.layers), "prompt_len": self.prompt_len, "answer_len": self.answer_len,
                "prompt_tokens": {k: len(v.ids) for k, v in self.prompts.items()},
                "affirm_templates": list(AFFIRM_TEMPLATES), "deny_templates": list(DENY_TEMPLATES)}


def end_of_turn_id(tokenizer) -> int:
    for name in _END_OF_TURN:
        i = tokenizer.token_to_id(name)
        if i is not None and i in tokenizer.eos_ids:
            return int(i)
    return int(tokenizer.eos_ids[0])


def _encode_answer(tokenizer, text: str, end_id: int) -> tuple:
    return tuple(tokenizer.encode(text)) + (end_id,)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_data(config: TrainConfig, model_config, tokenizer) -> DataPlan:
    """Check the config against the model (layers, context length) and fix the padded widths."""
    if tokenizer is None:
        raise DataError("the checkpoint has no tokenizer; convert it again with --tokenizer=PATH")
    train, heldout = split_words(config)
    try:
        layers = resolve_layers(config.layers, model_config.n_layers)
        for field in ("lora_layers", "bias_layers"):
            if getattr(config, field):
                resolve_layers(getattr(config, field), model_config.n_layers)
    except SweepError as e:
        raise TrainConfigError(f"config.layers / lora_layers / bias_layers: {e}") from e
    prompts = {name: sweep.prompt_info(tokenizer, name, config.system_header) for name in config.protocols}
    end_id = end_of_turn_id(tokenizer)
    answers = [t.format(word=concept_text(w)) for t in AFFIRM_TEMPLATES for w in train] + list(DENY_TEMPLATES)
    answer_len = max(len(_encode_answer(tokenizer, a, end_id)) for a in answers)
    prompt_len = _round_up(max(len(p.ids) for p in prompts.values()), 8)
    answer_len = _round_up(answer_len, 8)
    if prompt_len + answer_len > model_config.max_position_embeddings:
        raise TrainConfigError(f"prompts of {prompt_len} tokens plus answers of {answer_len} exceed the model's "
                               f"{model_config.max_position_embeddings} positions")
    return DataPlan(config=config, train_words=train, heldout_words=heldout, layers=layers, prompts=prompts,
                    end_id=end_id, prompt_len=prompt_len, answer_len=answer_len)


def micro_batch_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x7472]))  # 0x7472: 'tr'


def draw_example(plan: DataPlan, rng: np.random.Generator, tokenizer) -> Example:
    c = plan.config
    protocol = c.protocols[rng.integers(len(c.protocols))]
    info = plan.prompts[protocol]
    layer = int(plan.layers[rng.integers(len(plan.layers))])
    window = c.windows[rng.integers(len(c.windows))]
    last = len(info.ids) - 1
    start, end = {"protocol": (info.start, None), "last_token": (last, None), "single_token": (last, last + 1),
                  "all_positions": (0, None)}[window]
    control = bool(rng.random() < c.control_fraction)
    words = plan.train_words
    affirm = AFFIRM_TEMPLATES[rng.integers(len(AFFIRM_TEMPLATES))]
    deny = DENY_TEMPLATES[rng.integers(len(DENY_TEMPLATES))]
    if control:
        word, strength = None, 0.0
        chosen = deny
        rejected_word = words[rng.integers(len(words))]
        rejected, rejected_kind = affirm.format(word=concept_text(rejected_word)), "false_detection"
    else:
        word = words[rng.integers(len(words))]
        strength = float(rng.uniform(c.strength_range[0], c.strength_range[1]))
        chosen = affirm.format(word=concept_text(word))
        others = [w for w in words if w != word]
        if others and rng.random() < 0.5:
            rejected_word = others[rng.integers(len(others))]
            rejected, rejected_kind = affirm.format(word=concept_text(rejected_word)), "wrong_concept"
        else:
            rejected_word, rejected, rejected_kind = None, deny, "denial"
    return Example(kind="control" if control else "injected", protocol=protocol, word=word, layer=layer,
                   strength=strength, window=window, start=int(start), norm_match=info.norm_match,
                   prompt_ids=tuple(info.ids), chosen=chosen, chosen_ids=_encode_answer(tokenizer, chosen, plan.end_id),
                   rejected=rejected, rejected_ids=_encode_answer(tokenizer, rejected, plan.end_id),
                   rejected_kind=rejected_kind, rejected_word=rejected_word, end=end)


def examples(plan: DataPlan, tokenizer, index: int) -> list[Example]:
    """Micro-batch `index`'s examples: a pure function of (config.seed, index)."""
    rng = micro_batch_rng(plan.config.seed, index)
    batch = [draw_example(plan, rng, tokenizer) for _ in range(plan.config.batch_size)]
    check_heldout(batch, plan.heldout_words)
    return batch


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word.lower())}\b", text.lower()) is not None


def check_heldout(batch: Sequence[Example], heldout: Sequence[str]) -> None:
    """Assert that no held-out word is an example's concept, a rejected answer's concept, or named
    in any answer text."""
    for ex in batch:
        for w in heldout:
            if ex.word == w or ex.rejected_word == w or _mentions(ex.chosen, w) or _mentions(ex.rejected, w):
                raise AssertionError(f"held-out word {w!r} in a training example: {ex}")


@dataclasses.dataclass
class Batch:
    """Arrays of one micro-batch. The prompt part is left-padded to `prompt_len` (every row's last
    prompt token in the last column, as generation pads), the answer part right-padded to
    `answer_len`; DPO batches hold the chosen rows then the rejected rows (same prompts and
    injections)."""
    prompt: np.ndarray  # [R, P] int32
    prompt_valid: np.ndarray  # [R, P] bool
    answer: np.ndarray  # [R, A] int32
    answer_valid: np.ndarray  # [R, A] bool: the answer tokens the loss covers
    layer: np.ndarray  # [R] injection fields (inject.Injection)
    strength: np.ndarray
    vector: np.ndarray  # [R, D]
    start: np.ndarray
    norm_match: np.ndarray
    end: np.ndarray  # [R] int32, exclusive (inject.NO_END: no end)

    def injection(self) -> inject.Injection:
        return inject.make(self.layer, self.strength, self.vector, self.start, self.norm_match.tolist(), end=self.end)


def to_batch(plan: DataPlan, batch: Sequence[Example], concept, pad_id: int, d_model: int,
             pairs: bool = False) -> Batch:
    """`concept`: `vectors.ConceptVectors` of the training words (every layer)."""
    answers = [ex.chosen_ids for ex in batch] + ([ex.rejected_ids for ex in batch] if pairs else [])
    rows = list(batch) + (list(batch) if pairs else [])
    R, P, A = len(rows), plan.prompt_len, plan.answer_len
    prompt = np.full((R, P), pad_id, np.int32)
    prompt_valid = np.zeros((R, P), bool)
    answer = np.full((R, A), pad_id, np.int32)
    answer_valid = np.zeros((R, A), bool)
    for i, (ex, ans) in enumerate(zip(rows, answers)):
        n = len(ex.prompt_ids)
        if n > P or len(ans) > A:
            raise DataError(f"example longer than the planned widths ({n} > {P} or {len(ans)} > {A})")
        prompt[i, P - n:], prompt_valid[i, P - n:] = ex.prompt_ids, True
        answer[i, :len(ans)], answer_valid[i, :len(ans)] = ans, True
    vector = np.stack([concept.vector(ex.word, ex.layer) if ex.word else np.zeros(d_model, np.float32)
                       for ex in rows]).astype(np.float32)
    return Batch(prompt=prompt, prompt_valid=prompt_valid, answer=answer, answer_valid=answer_valid,
                 layer=np.asarray([ex.layer for ex in rows], np.int32),
                 strength=np.asarray([ex.strength for ex in rows], np.float32), vector=vector,
                 start=np.asarray([ex.start for ex in rows], np.int32),
                 norm_match=np.asarray([inject.norm_mode(ex.norm_match) for ex in rows], np.int32),
                 end=np.asarray([inject.NO_END if ex.end is None else ex.end for ex in rows], np.int32))
