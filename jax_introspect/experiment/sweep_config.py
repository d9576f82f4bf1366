"""The sweep's configuration, declared once: `SweepConfig`, a typed and frozen dataclass.

Each field carries its default, its help text and whether it decides the trials' texts (a
results folder is bound to those: `binding_fields`; a field added after results folders existed
binds only when set, so those folders still resume: `bound_values`). Everything that can be
checked without a model is checked when a `SweepConfig` is made, so a bad config fails before
any compute. Config files (`configs/sweeps/*.py`) build one in `get_config()`; the command line
overrides fields with `--config.FIELD=VALUE`, parsed by the field's type (`parse_field`): list
fields all take the same forms (comma-separated, a list literal, or one value).
"""
from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import Sequence

from jax_introspect.experiment import protocols, vectors

VECTOR_METHODS = ("mean_difference", "contrast_pairs", "random", "files")
ENGINES = ("shared", "plain")  # see the field `engine`


class SweepError(ValueError):
    pass


def _field(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, help: str, binds: bool = True,
           bound_when_set: bool = False):
    """A config field with its help text; `binds`: it decides the trials' texts; `bound_when_set`:
    it binds only at a value other than its default (a field added after results folders existed:
    at its default, the texts are what they were, and those folders resume)."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={"help": help, "binds": binds, "bound_when_set": bound_when_set})


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    protocols: tuple[str, ...] = _field(
        ("lindsey_injected_thought",),
        help="protocol names (experiment/protocols/data/prompts.json); injected and control trials run on each")
    words: tuple[str, ...] = _field(factory=lambda: tuple(protocols.concept_words()),
                                    help="concept words (default: Lindsey's 50)")
    baseline_words: tuple[str, ...] = _field(factory=lambda: tuple(protocols.baseline_words()),
                                             help="baseline words of mean-difference vectors (Lindsey's 100)")
    vector_method: str = _field("mean_difference", help=f"one of {VECTOR_METHODS} ('files': vector_files)")
    vector_files: tuple[str, ...] = _field(
        (), bound_when_set=True,
        help="vector_method='files': .pt files in the 405B replication's format ({direction, concept, layer, ...}: "
             "one concept at one layer each) and/or our .npz vector sets; every word needs a vector at every "
             "layer, of the model's width (checked before the weights load); bound by content, not path; "
             "on a pod, every host reads them")
    vector_position: str = _field("last", help="mean_difference: 'last' (the paper) or 'word'")
    template: str = _field("Tell me about {word}", help="concept prompt of mean-difference vectors")
    layers: tuple = _field((0.5,), help="ints: layer indices; floats in [0, 1]: fractions of depth")
    strengths: tuple[float, ...] = _field((1.0, 2.0, 4.0, 8.0), help="injection strengths")
    trials_per_cell: int = _field(50, help="injected trials per (protocol, layer, strength[, word]) cell")
    cell_per_word: bool = _field(False, help="False: words cycle through a cell's trials (the paper)")
    control_trials: int = _field(100, help="control trials (no injection) per protocol (per layer too with "
                                           "controls_per_layer)")
    controls_per_layer: bool = _field(False, bound_when_set=True,
                                      help="control_trials controls for each layer (ids PROTOCOL/control/L<layer>/i, "
                                           "as the replication's layer sweep ran them) instead of once per protocol")
    temperature: float = _field(1.0, help="sampling temperature (0: greedy)")
    top_p: float = _field(1.0, help="nucleus sampling mass, in (0, 1]")
    max_new_tokens: int = _field(100, help="generated tokens per trial")
    seed: int = _field(0, help="run seed: with the trial id it decides each trial's sampling key")
    grader: str = _field("heuristic", binds=False,
                         help="one grader spec for every protocol (heuristic | llm:<checkpoint> | "
                              "api:<anthropic|openai>:<model> | replication:api:<provider>:<model> | "
                              "replication:llm:<checkpoint>), or PROTOCOL=SPEC pairs separated by commas, one for "
                              "each protocol of the sweep")
    batch_size: int = _field(32, binds=False, help="rows decoded together (the engine's slots; the plain path's "
                                                   "batch)")
    engine: str = _field("shared", binds=False,
                         help="how trials are generated (the same texts either way): 'shared' (the sweep engine: "
                              "the prompt's prefix before the injection prefilled once, one prefill per distinct "
                              "(prompt, injection), finished rows' slots refilled; docs/performance.md) or 'plain' "
                              "(one batched generate per batch_size trials, the reference)")
    batches_per_call: int = _field(4, binds=False,
                                   help="engine 'shared': trials per engine call = batch_size x this; each call's "
                                        "trials are graded and saved before the next call starts")
    prefill_block: int = _field(0, binds=False,
                                help="engine 'shared': cells (distinct (prompt, injection)) prefilled together, a "
                                     "divisor of batch_size; 0: the fewest that hold 1024 prompt tokens "
                                     "(engine.prefill_block). A call's last block is padded with cells that are "
                                     "computed: a smaller block pads less (docs/performance.md)")
    share_depth: bool = _field(True, binds=False,
                               help="engine 'shared', calls of one prompt: each cell's layers below its injection "
                                    "layer taken from the prompt's clean forward, computed once per call (the same "
                                    "texts; saves prefill in proportion to the injection layers' depth, for about "
                                    "1 s more compile per program on a CPU; docs/performance.md)")
    system_header: bool = _field(True, help="the chat template's default system block")
    double_bos: bool = _field(False, bound_when_set=True,
                              help="a second BOS before every prompt, trials and vector extraction alike: what "
                                   "vLLM's generate does to an already templated Llama-3 string (the 405B "
                                   "replication's 173 prompt tokens where one BOS gives 172)")
    # Readouts at the first answer token (experiment/readout.py): they change no text, so bind nothing.
    readout: bool = _field(True, binds=False,
                           help="record p_yes / p_no (probability of yes-like / no-like first answer tokens) and "
                                "the logit lens of the injected layer in every trial record: one extra batched "
                                "forward per distinct (prompt, injection) of a call (readout.py)")
    readout_top_k: int = _field(10, binds=False, help="tokens kept of the logit lens (its top-k)")
    # Edge search (experiment/edge.py): which trials run depends on the grades, so it binds when set.
    edge_search: bool = _field(False, bound_when_set=True,
                               help="instead of the strengths grid: per layer, bisect [min(strengths), "
                                    "max(strengths)] for the strength where the coherent rate falls to edge_target, "
                                    "then spend the rest of edge_budget densely around it (edge.json)")
    edge_target: float = _field(0.5, bound_when_set=True, help="edge search: the coherent rate to find")
    edge_tolerance: float = _field(1.0, bound_when_set=True,
                                   help="edge search: bisect until the bracket is this narrow (strength units)")
    edge_probe_trials: int = _field(8, bound_when_set=True, help="edge search: injected trials per bisection probe")
    edge_budget: int = _field(96, bound_when_set=True,
                              help="edge search: injected trials per layer, probes and dense phase together")
    edge_dense_strengths: int = _field(5, bound_when_set=True,
                                       help="edge search: strengths of the dense phase, over the final bracket "
                                            "widened by edge_tolerance on each side")

    def __post_init__(self):
        for f in dataclasses.fields(self):  # lists become tuples: the config stays hashable and frozen
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        validate(self)
        # A strength is a float however it was written (4 and 4.0 are one sweep, one binding).
        object.__setattr__(self, "strengths", tuple(float(s) for s in self.strengths))

    def replace(self, **changes) -> "SweepConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "SweepConfig":
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise SweepError(f"sweep config: unknown fields {unknown}; fields: {', '.join(FIELDS)}")
        return cls(**data)


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


FIELDS = tuple(f.name for f in dataclasses.fields(SweepConfig))
_TYPES = {f.name: f.type for f in dataclasses.fields(SweepConfig)}
TEXT_LIST_FIELDS = tuple(n for n in FIELDS if _TYPES[n] == "tuple[str, ...]")
NUMBER_LIST_FIELDS = tuple(n for n in FIELDS if _TYPES[n] in ("tuple", "tuple[float, ...]"))
LIST_FIELDS = TEXT_LIST_FIELDS + NUMBER_LIST_FIELDS


def binding_fields() -> tuple[str, ...]:
    """The fields that decide the trials' texts (not the grader, not the batch size)."""
    return tuple(f.name for f in dataclasses.fields(SweepConfig) if f.metadata["binds"])


def bound_values(config: SweepConfig) -> dict:
    """The binding fields' values (JSON-able), less those bound only when set that are at their default."""
    data = config.to_dict()
    return {name: data[name] for name in binding_fields() if not _unset_late_field(config, name)}


def _unset_late_field(config: SweepConfig, name: str) -> bool:
    field = SweepConfig.__dataclass_fields__[name]
    return field.metadata["bound_when_set"] and getattr(config, name) == field.default


def field_help(name: str) -> str:
    return SweepConfig.__dataclass_fields__[name].metadata["help"]


# --- checks: everything that needs no model ---------------------------------------------------

def _is_number(value, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool)


def _repeats(values, key=lambda v: v) -> list:
    seen, repeated = set(), []
    for v in values:
        k = key(v)
        if k in seen and v not in repeated:
            repeated.append(v)
        seen.add(k)
    return repeated


def strength_label(strength: float) -> str:
    """How a strength appears in trial ids (so two strengths with one label would share ids)."""
    return f"{strength:g}"


def check_words(words, what: str, allow_duplicates: bool = False) -> list[str]:
    if isinstance(words, str):
        raise SweepError(f"the {what} list must be a list of words, got the string {words!r}")
    try:
        words = vectors.check_words(words, what, allow_duplicates=allow_duplicates)
    except vectors.VectorError as e:
        raise SweepError(str(e)) from e
    with_comma = [w for w in words if "," in w]
    if with_comma:
        raise SweepError(f"{what} {with_comma[0]!r} contains a comma: give words as a list, e.g. "
                         f"--config.words=Dust,Oceans (a word may not contain a comma)")
    return words


def _check_layer_spec(spec) -> None:
    if isinstance(spec, str) or not len(spec):
        raise SweepError(f"layers must be a non-empty list of layer indices or depth fractions, got {spec!r}")
    for item in spec:
        if not _is_number(item):
            raise SweepError(f"layer {item!r} is neither an index nor a depth fraction")
        if isinstance(item, float) and not 0.0 <= item <= 1.0:
            raise SweepError(f"layer {item} is a float outside [0, 1]; give an integer index or a depth fraction")
        if isinstance(item, int) and item < 0:
            raise SweepError(f"layer {item} is negative")
    repeated = _repeats(list(spec))
    if repeated:
        raise SweepError(f"layers repeat {repeated}; give each layer once")


def resolve_layers(spec: Sequence, n_layers: int) -> list[int]:
    """Ints are layer indices; floats in [0, 1] are fractions of depth. Two entries naming the same
    layer are refused (their trials would share ids)."""
    _check_layer_spec(spec)
    layers = {}
    for item in spec:
        index = min(int(round(item * n_layers)), n_layers - 1) if isinstance(item, float) else item
        if not 0 <= index < n_layers:
            raise SweepError(f"layer {index} is beyond the model: it has layers 0..{n_layers - 1}")
        if int(index) in layers:
            raise SweepError(f"layers {layers[int(index)]!r} and {item!r} are both layer {index} of this "
                             f"{n_layers}-layer model; give each layer once")
        layers[int(index)] = item
    return sorted(layers)


def _check_strengths(strengths) -> None:
    if isinstance(strengths, str) or not len(strengths):
        raise SweepError(f"strengths must be a non-empty list of finite numbers, got {strengths!r}")
    for s in strengths:
        if not _is_number(s):
            raise SweepError(f"strength {s!r} is not a number")
        if not math.isfinite(s):
            raise SweepError(f"strengths must be finite numbers, got {s}")
    repeated = _repeats(list(strengths), key=lambda s: strength_label(float(s)))
    if repeated:
        raise SweepError(f"strengths repeat {[strength_label(float(s)) for s in repeated]} (as trial ids "
                         f"print them); give each strength once")


def _check_number(config: SweepConfig, field: str, low: float, high: float = math.inf, integer: bool = False,
                  low_inclusive: bool = True) -> None:
    value = getattr(config, field)
    if not _is_number(value, integer) or not math.isfinite(value):
        raise SweepError(f"{field} must be {'an integer' if integer else 'a finite number'}, got {value!r}")
    if value < low or (value == low and not low_inclusive) or value > high:
        bounds = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise SweepError(f"{field} must be {bounds}, got {value}")


def validate(config: SweepConfig) -> None:
    """Every check that needs no model and no files."""
    names = config.protocols
    if isinstance(names, str) or not len(names):
        raise SweepError(f"protocols must be a non-empty list of protocol names, got {names!r}")
    for name in names:
        try:
            protocols.protocol(name)
        except ValueError as e:
            raise SweepError(str(e)) from e
    if _repeats(list(names)):
        raise SweepError(f"protocols repeat {_repeats(list(names))}; give each protocol once")
    words = check_words(config.words, "concept word")
    check_words(config.baseline_words, "baseline word", allow_duplicates=True)  # Lindsey's list repeats one
    if config.vector_method not in VECTOR_METHODS:
        raise SweepError(f"vector_method {config.vector_method!r}: choose one of {VECTOR_METHODS}")
    if config.vector_method == "contrast_pairs":
        try:
            protocols.contrast_pairs(words)
        except ValueError as e:
            raise SweepError(str(e)) from e
    _check_vector_files(config)
    if config.vector_position not in vectors.POSITIONS:
        raise SweepError(f"vector_position {config.vector_position!r}: choose one of {vectors.POSITIONS}")
    if "{word}" not in str(config.template):
        raise SweepError(f"template {config.template!r} has no {{word}} placeholder")
    _check_layer_spec(config.layers)
    _check_strengths(config.strengths)
    if config.engine not in ENGINES:
        raise SweepError(f"engine {config.engine!r}: choose one of {ENGINES}")
    for field in ("trials_per_cell", "batch_size", "max_new_tokens", "batches_per_call", "readout_top_k"):
        _check_number(config, field, 1, integer=True)
    _check_number(config, "control_trials", 0, integer=True)
    _check_number(config, "prefill_block", 0, integer=True)
    if config.prefill_block and config.batch_size % config.prefill_block:
        raise SweepError(f"prefill_block={config.prefill_block} must divide batch_size={config.batch_size} "
                         "(or be 0: batch_size)")
    _check_number(config, "seed", 0, integer=True)
    _check_number(config, "temperature", 0.0)
    _check_number(config, "top_p", 0.0, 1.0, low_inclusive=False)
    for field in (n for n in FIELDS if _TYPES[n] == "bool"):
        if not isinstance(getattr(config, field), bool):
            raise SweepError(f"{field} must be True or False, got {getattr(config, field)!r}")
    if config.edge_search:
        _check_edge(config)
    grader_specs(config)
    _check_experiments(config)


def _check_experiments(config: SweepConfig) -> None:
    """Lindsey's other experiments (protocols/experiments.py): every word needs its sentence."""
    from jax_introspect.experiment.protocols import ProtocolError, experiments
    from jax_introspect.experiment.grading import experiments as experiment_grading
    try:
        experiments.check_config(config)
        for name, spec in grader_specs(config).items():
            if experiments.is_experiment(name):
                experiment_grading.check_spec(name, spec)
    except (ProtocolError, ValueError) as e:
        raise SweepError(str(e)) from e


def _check_edge(config: SweepConfig) -> None:
    for field in ("edge_probe_trials", "edge_budget", "edge_dense_strengths"):
        _check_number(config, field, 1, integer=True)
    _check_number(config, "edge_target", 0.0, 1.0, low_inclusive=False)
    _check_number(config, "edge_tolerance", 1e-3)
    if config.cell_per_word:
        raise SweepError("edge_search counts trials per strength: set cell_per_word=False (words cycle)")
    if len(config.strengths) < 2 or max(config.strengths) - min(config.strengths) <= config.edge_tolerance:
        raise SweepError(f"edge_search brackets [min(strengths), max(strengths)] = {list(config.strengths)}: give two "
                         f"strengths further apart than edge_tolerance={config.edge_tolerance}, e.g. "
                         "--config.strengths=1,32")
    if min(config.strengths) < 0:
        raise SweepError("edge_search: strengths must be >= 0")


def _check_vector_files(config: SweepConfig) -> None:
    """The file list's form (the files themselves are read when the sweep is planned)."""
    paths = config.vector_files
    if isinstance(paths, str) or any(not isinstance(p, str) or not p.strip() for p in paths):
        raise SweepError(f"vector_files must be a list of file paths, got {paths!r}")
    if (config.vector_method == "files") != bool(paths):
        raise SweepError("vector_method='files' needs vector_files" if not paths else
                         f"vector_files are given but vector_method is {config.vector_method!r}: set "
                         "vector_method='files' to inject them")
    wrong = [p for p in paths if not p.endswith(vectors.VECTOR_FILE_TYPES)]
    if wrong:
        raise SweepError(f"vector file {wrong[0]!r}: expected one of {vectors.VECTOR_FILE_TYPES}")
    if _repeats(list(paths)):
        raise SweepError(f"vector_files repeat {_repeats(list(paths))}; give each file once")


def grader_specs(config: SweepConfig) -> dict[str, str]:
    """{protocol: grader spec} for every protocol of the sweep. `grader` is one spec for all of
    them, or PROTOCOL=SPEC pairs separated by commas (specs hold colons, never commas or '='); a
    pair for a known protocol the sweep does not run is allowed (a config's grader map outlives
    a narrower --config.protocols), an unknown protocol is refused."""
    from jax_introspect.experiment import grading
    text = config.grader
    if not isinstance(text, str) or not text.strip():
        raise SweepError(f"grader must be a grader spec or PROTOCOL=SPEC pairs, got {text!r}")
    specs = {}
    if "=" not in text:
        specs = {name: text.strip() for name in config.protocols}
    else:
        for item in text.split(","):
            name, equals, spec = (part.strip() for part in item.partition("="))
            if not (equals and name and spec):
                raise SweepError(f"grader entry {item.strip()!r}: write PROTOCOL=SPEC, pairs separated by commas")
            if name in specs:
                raise SweepError(f"grader: protocol {name!r} is given two graders; give it one")
            try:
                protocols.protocol(name)
            except ValueError as e:
                raise SweepError(f"grader: {e}") from e
            specs[name] = spec
        missing = [name for name in config.protocols if name not in specs]
        if missing:
            raise SweepError(f"grader: no grader for protocols {missing}; give PROTOCOL=SPEC for each")
    for spec in dict.fromkeys(specs.values()):
        try:
            grading.parse_spec(spec)
        except ValueError as e:
            raise SweepError(str(e)) from e
    ours = {name: specs[name] for name in config.protocols}
    _check_replication_judged(ours)
    return ours


def _check_replication_judged(specs: dict) -> None:
    """The replication's judge knows its two questions only: a protocol asking another is refused
    here, before any compute, rather than misdescribed to the judge."""
    from jax_introspect.experiment import grading
    from jax_introspect.experiment.grading import replication_judge
    for name, spec in specs.items():
        if grading.parse_spec(spec)[0].startswith("replication_"):
            try:
                replication_judge.prompt_kind(name, protocols.question(protocols.protocol(name)))
            except replication_judge.UnknownQuestion as e:
                raise SweepError(f"grader for protocol {name}: {e}") from e


# --- the command line: config files and --config.FIELD=VALUE overrides ------------------------------

def load_config_file(path: str) -> tuple[SweepConfig, ...]:
    """The arms `get_config()` of a config file (configs/sweeps/*.py) returns: one SweepConfig, or a
    sequence of them (e.g. Lindsey's protocol and the replication's, run into one folder)."""
    from jax_introspect.experiment import files
    config = files.run_get_config(path, "sweep configs are in configs/sweeps/", SweepError)
    arms = tuple(config) if isinstance(config, (list, tuple)) else (config,)
    if not arms or not all(isinstance(arm, SweepConfig) for arm in arms):
        raise SweepError(f"--config={path}: get_config() must return a SweepConfig or a list of them, got "
                         f"{type(config).__name__}")
    return arms


def _number(text: str, field: str):
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError as e:
        raise SweepError(f"--config.{field}: {text!r} is not a number") from e


def parse_list(field: str, text: str) -> tuple:
    """One command-line value of a list field -> a tuple. Every list field accepts the same forms:
    comma-separated (`Dust,Oceans` or `0.5,0.67`), a Python list or tuple literal
    (`('Dust','Oceans')`, `[0.5, 0.67]`, `'Dust','Oceans'`) or a single value."""
    text = text.strip()
    if text[:1] in ("(", "[", "'", '"'):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise SweepError(f"--config.{field}={text!r} is not a valid list literal ({e}); write it comma-separated, "
                             f"e.g. --config.{field}=a,b") from e
        items = list(value) if isinstance(value, (list, tuple)) else [value]
    else:
        items = [item.strip() for item in text.split(",")]
    if not items or any(item == "" for item in items):
        raise SweepError(f"--config.{field}={text!r} has an empty entry")
    if field in TEXT_LIST_FIELDS:
        bad = [item for item in items if not isinstance(item, str)]
        if bad:
            raise SweepError(f"--config.{field}: {bad[0]!r} is not text; quote it or write the list comma-separated")
        return tuple(items)
    out = []
    for item in items:
        if isinstance(item, str):
            item = _number(item, field)
        if not _is_number(item):
            raise SweepError(f"--config.{field}: {item!r} is not a number")
        out.append(item)
    return tuple(out)


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_field(field: str, text: str):
    """A command-line value of `field`, parsed by the field's type."""
    if field not in FIELDS:
        raise SweepError(f"unknown config field {field!r}; fields: {', '.join(FIELDS)}")
    if field in LIST_FIELDS:
        return parse_list(field, text)
    kind = _TYPES[field]
    if kind == "str":
        return text
    if kind == "bool":
        if text.strip().lower() not in _BOOLS:
            raise SweepError(f"--config.{field}={text!r}: write true or false")
        return _BOOLS[text.strip().lower()]
    value = _number(text, field)
    if kind == "int" and not isinstance(value, int):
        raise SweepError(f"--config.{field}={text!r} is not an integer")
    return float(value) if kind == "float" else value


def with_overrides(config, overrides: Sequence[tuple[str, str]]):
    """`config` (a SweepConfig, or a tuple of them: the arms, each changed alike) with command-line
    values [(field, text), ...]; a repeated field: the last wins."""
    changes = {}
    for field, text in overrides:
        changes[field] = parse_field(field, text)
    if isinstance(config, tuple):
        return tuple(arm.replace(**changes) if changes else arm for arm in config)
    return config.replace(**changes) if changes else config


def describe_fields() -> str:
    """Help text: every field with its default."""
    defaults = SweepConfig()
    return "\n".join(f"  --config.{n}  {field_help(n)} (default: {_short(getattr(defaults, n))})" for n in FIELDS)


def _short(value, limit: int = 60) -> str:
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return text if len(text) <= limit else text[:limit] + "…"


__all__ = ["FIELDS", "LIST_FIELDS", "SweepConfig", "SweepError", "binding_fields", "bound_values", "grader_specs",
           "load_config_file", "parse_field", "parse_list", "resolve_layers", "strength_label", "with_overrides"]
