"""The training configuration as data: `TrainConfig`, a frozen dataclass checked when it is made.

Config files (`configs/train/*.py`) return one from `get_config()`; the command line overrides
fields with `--config.FIELD=VALUE` (`parse_field`: by the field's type; tuple fields take a
comma-separated list or a Python literal). Everything that needs no model is checked in
`__post_init__`, so a bad config fails before any weight loads; what needs the model's
config.json (layers, prompt lengths) is checked by `data.plan_data`.
"""
from __future__ import annotations

import ast
import dataclasses
import math
from typing import Sequence

from jax_introspect.experiment import protocols

OBJECTIVES = ("sft", "dpo")
TRAINABLE = ("lora", "bias", "lora+bias")
# Injection windows of the training data (see data.py): the protocol's own (Lindsey: from the token
# before "Trial 1" on), the last prompt token on (no end: one prompt token, then the answer
# tokens), the last prompt token only (end = start + 1: Rivera 2025's recipe, the answer tokens
# are not injected), every position.
WINDOWS = ("protocol", "last_token", "single_token", "all_positions")
# The default draw: the three windows of the runs measured before `single_token` existed (a
# default that changed would change the data, and the config, of those runs).
DEFAULT_WINDOWS = ("protocol", "last_token", "all_positions")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class TrainConfigError(ValueError):
    pass


def _field(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, help: str):
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # --- data
    words: tuple = _field(factory=lambda: tuple(protocols.concept_words()),
                          help="all concept words, split into training and held-out (default: Lindsey's 50)")
    heldout_words: tuple = _field((), help="held-out words (never in training data); empty: heldout_fraction of "
                                           "`words`, drawn with split_seed")
    heldout_fraction: float = _field(0.4, help="share of `words` held out when heldout_words is empty")
    split_seed: int = _field(0, help="seed of the train / held-out split")
    baseline_words: tuple = _field(factory=lambda: tuple(protocols.baseline_words()),
                                   help="baseline words of the mean-difference vectors (Lindsey's 100)")
    vector_template: str = _field("Tell me about {word}", help="concept prompt of the mean-difference vectors")
    vector_position: str = _field("last", help="mean-difference vectors read at 'last' (the paper) or 'word'")
    protocols: tuple = _field(("lindsey_injected_thought",), help="protocols whose prompts the examples use")
    system_header: bool = _field(True, help="the chat template's default system block")
    layers: tuple = _field((0.5,), help="injection layers: ints, or floats in [0, 1] (fractions of depth)")
    strength_range: tuple = _field((2.0, 8.0), help="(low, high): strengths drawn uniformly per example")
    windows: tuple = _field(DEFAULT_WINDOWS, help=f"injection windows drawn per example, from {WINDOWS} "
                                                  "(protocol: the protocol's, through the answer; last_token: "
                                                  "the final prompt token and the answer; single_token: the "
                                                  "final prompt token only, Rivera 2025; all_positions: every "
                                                  "token)")
    control_fraction: float = _field(0.5, help="share of examples with no injection (controls)")
    # --- adapter
    trainable: str = _field("lora", help=f"what is trained: one of {TRAINABLE}")
    lora_rank: int = _field(8, help="LoRA rank")
    lora_alpha: float = _field(16.0, help="LoRA alpha (scale alpha / rank)")
    lora_targets: tuple = _field(("wq", "wv"), help=f"LoRA'd weights, from {LORA_TARGETS}")
    lora_layers: tuple = _field((), help="layers with LoRA (ints or depth fractions); empty: every layer")
    bias_layers: tuple = _field((), help="layers with a trained residual bias (trainable 'bias' / 'lora+bias'); "
                                         "empty: the injection layers")
    # --- objective
    objective: str = _field("sft", help=f"one of {OBJECTIVES}")
    dpo_beta: float = _field(0.1, help="DPO beta")
    # --- optimization
    steps: int = _field(100, help="optimizer steps")
    batch_size: int = _field(8, help="examples per micro-batch (DPO: pairs)")
    grad_accum: int = _field(1, help="micro-batches per optimizer step (optax.MultiSteps)")
    learning_rate: float = _field(2e-4, help="peak learning rate")
    warmup_steps: int = _field(10, help="linear warmup steps (from 0 to the peak)")
    end_lr_fraction: float = _field(0.1, help="cosine decay ends at this fraction of the peak")
    weight_decay: float = _field(0.0, help="adamw weight decay")
    clip_norm: float = _field(1.0, help="global-norm gradient clipping (0: none)")
    seed: int = _field(0, help="seed: the adapter init and the data (each micro-batch a pure function of "
                               "(seed, index))")
    checkpoint_every: int = _field(25, help="optimizer steps between orbax checkpoints")
    keep_checkpoints: int = _field(2, help="checkpoints kept")
    crash_after_step: int = _field(0, help="tests only: SIGKILL this process after this step (0: never)")

    def __post_init__(self):
        # Normalise list fields to tuples (a config file may write lists).
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        validate(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def train_lora(self) -> bool:
        return "lora" in self.trainable

    @property
    def train_bias(self) -> bool:
        return "bias" in self.trainable


def _err(field: str, message: str):
    raise TrainConfigError(f"config.{field}: {message}")


def _words(field, words, allow_duplicates=False):
    if isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words):
        _err(field, f"must be a list of non-empty strings, got {words!r}")
    if not allow_duplicates and len(set(words)) != len(words):
        _err(field, f"repeats {sorted({w for w in words if list(words).count(w) > 1})}")


def _layer_spec(field, spec):
    for item in spec:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            _err(field, f"{item!r} is not a layer index (int) or a depth fraction (float in [0, 1])")
        if isinstance(item, float) and not 0.0 <= item <= 1.0:
            _err(field, f"{item} is a float outside [0, 1]")
        if isinstance(item, int) and item < 0:
            _err(field, f"{item} is negative")


def validate(c: TrainConfig) -> None:
    _words("words", c.words)
    _words("heldout_words", c.heldout_words)
    _words("baseline_words", c.baseline_words, allow_duplicates=True)
    unknown = sorted(set(c.heldout_words) - set(c.words))
    if unknown:
        _err("heldout_words", f"{unknown} are not among config.words")
    if not c.heldout_words and not 0.0 < c.heldout_fraction < 1.0:
        _err("heldout_fraction", f"must lie in (0, 1), got {c.heldout_fraction}")
    if c.heldout_words and len(c.heldout_words) >= len(c.words):
        _err("heldout_words", "holds every word: nothing is left to train on")
    if "{word}" not in c.vector_template:
        _err("vector_template", f"{c.vector_template!r} has no {{word}} placeholder")
    if c.vector_position not in ("last", "word"):
        _err("vector_position", f"{c.vector_position!r}: choose 'last' or 'word'")
    if not c.protocols:
        _err("protocols", "is empty")
    for name in c.protocols:
        try:
            protocols.protocol(name)
        except ValueError as e:
            _err("protocols", str(e))
    if not c.layers:
        _err("layers", "is empty")
    _layer_spec("layers", c.layers)
    _layer_spec("lora_layers", c.lora_layers)
    _layer_spec("bias_layers", c.bias_layers)
    if len(c.strength_range) != 2 or not all(isinstance(s, (int, float)) and math.isfinite(s)
                                              for s in c.strength_range):
        _err("strength_range", f"must be (low, high), two finite numbers, got {c.strength_range!r}")
    if not 0 <= c.strength_range[0] <= c.strength_range[1]:
        _err("strength_range", f"needs 0 <= low <= high, got {c.strength_range!r}")
    if not c.windows or any(w not in WINDOWS for w in c.windows):
        _err("windows", f"{c.windows!r}: choose from {WINDOWS}")
    if not 0.0 <= c.control_fraction < 1.0:
        _err("control_fraction", f"must lie in [0, 1), got {c.control_fraction}")
    if c.trainable not in TRAINABLE:
        _err("trainable", f"{c.trainable!r}: choose one of {TRAINABLE}")
    if c.train_lora:
        if not c.lora_targets or any(t not in LORA_TARGETS for t in c.lora_targets):
            _err("lora_targets", f"{c.lora_targets!r}: choose from {LORA_TARGETS}")
        if c.lora_rank < 1:
            _err("lora_rank", "must be >= 1")
        if not c.lora_alpha > 0:
            _err("lora_alpha", "must be > 0")
    if c.objective not in OBJECTIVES:
        _err("objective", f"{c.objective!r}: choose one of {OBJECTIVES}")
    if not c.dpo_beta > 0:
        _err("dpo_beta", "must be > 0")
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            _err(name, f"must be an integer >= 1, got {getattr(c, name)!r}")
    if not c.learning_rate > 0 or not math.isfinite(c.learning_rate):
        _err("learning_rate", "must be a finite number > 0")
    if not 0 <= c.warmup_steps < c.steps:
        _err("warmup_steps", f"must lie in [0, steps={c.steps}), got {c.warmup_steps}")
    if not 0.0 <= c.end_lr_fraction <= 1.0:
        _err("end_lr_fraction", "must lie in [0, 1]")
    if c.weight_decay < 0 or c.clip_norm < 0:
        _err("weight_decay" if c.weight_decay < 0 else "clip_norm", "must be >= 0")
    if c.crash_after_step < 0:
        _err("crash_after_step", "must be >= 0")


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def load_config_file(path: str) -> TrainConfig:
    from jax_introspect.experiment import files
    config = files.run_get_config(path, "training configs are in configs/train/", TrainConfigError)
    if not isinstance(config, TrainConfig):
        raise TrainConfigError(f"--config={path}: get_config() must return a TrainConfig, got {type(config).__name__}")
    return config


def _scalar(text: str):
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_field(field: str, text: str):
    """A command-line value of `field`, parsed by the type of its default."""
    if field not in FIELDS:
        raise TrainConfigError(f"unknown config field {field!r}; fields: {', '.join(FIELDS)}")
    kind = _FIELD_TYPES[field]
    if kind == "tuple":
        value = _scalar(text)
        if isinstance(value, (list, tuple)):
            return tuple(value)
        return tuple(_scalar(t) for t in text.split(",") if t.strip()) if text.strip() else ()
    if kind == "bool":
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0"):
            raise TrainConfigError(f"--config.{field}={text!r}: write true or false")
        return low in ("true", "1")
    if kind == "str":
        return text
    value = _scalar(text)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"--config.{field}={text!r} is not an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"--config.{field}={text!r} is not a number")
        return float(value)
    return value


def with_overrides(config: TrainConfig, overrides: Sequence[tuple[str, str]]) -> TrainConfig:
    changes = {field: parse_field(field, text) for field, text in overrides}
    return config.replace(**changes) if changes else config


def describe_fields() -> str:
    defaults = TrainConfig()
    def short(v):
        t = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return t if len(t) <= 50 else t[:50] + "…"
    return "\n".join(f"  --config.{f.name}  {f.metadata['help']} (default: {short(getattr(defaults, f.name))})"
                     for f in dataclasses.fields(TrainConfig))
