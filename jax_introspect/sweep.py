"""The introspection experiment as a sweep: plan trials, extract vectors, run, grade, record.

Trials of the whole grid (protocol x layer x strength x word, plus controls) are batched
together: rows of one batch differ in all of these, and every batch is padded to the same size,
so a sweep compiles one program per prompt-length bucket. Each batch is graded and appended to
the results file before the next starts; re-running resumes where the file ends.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from jax_introspect import inject, protocols, results, vectors

VECTOR_METHODS = ("mean_difference", "contrast_pairs", "random")
CONFIG_FIELDS = ("protocols", "words", "baseline_words", "vector_method", "vector_position", "template", "layers",
                 "strengths", "trials_per_cell", "cell_per_word", "control_trials", "temperature", "top_p",
                 "max_new_tokens", "seed", "grader", "batch_size", "system_header")


class SweepError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Trial:
    trial_id: str
    kind: str  # injected | control
    protocol: str
    word: Optional[str]
    layer: Optional[int]
    strength: float
    index: int


def resolve_words(spec, what: str, allow_duplicates: bool = False) -> list[str]:
    if isinstance(spec, str):
        raise SweepError(f"{what}s must be a list of words, got the string {spec!r}")
    try:
        return vectors.check_words(list(spec), what, allow_duplicates=allow_duplicates)
    except vectors.VectorError as e:
        raise SweepError(str(e)) from None


def resolve_layers(spec: Sequence, n_layers: int) -> list[int]:
    """Ints are layer indices; floats in [0, 1] are fractions of depth."""
    layers = []
    for item in spec:
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, float, np.integer, np.floating)):
            raise SweepError(f"layer {item!r} is neither an index nor a depth fraction")
        if isinstance(item, (float, np.floating)):
            if not 0.0 <= item <= 1.0:
                raise SweepError(f"layer {item} is a float outside [0, 1]; give an integer index or a depth fraction")
            item = min(int(round(item * n_layers)), n_layers - 1)
        if not 0 <= item < n_layers:
            raise SweepError(f"layer {item} is beyond the model: it has layers 0..{n_layers - 1}")
        layers.append(int(item))
    if not layers:
        raise SweepError("no layers given")
    return sorted(set(layers))


def validate_config(config: dict) -> None:
    unknown = sorted(set(config) - set(CONFIG_FIELDS))
    missing = sorted(set(CONFIG_FIELDS) - set(config))
    if unknown or missing:
        raise SweepError(f"sweep config: unknown fields {unknown}, missing fields {missing}")
    for name in config["protocols"]:
        try:
            protocols.protocol(name)
        except ValueError as e:
            raise SweepError(str(e)) from None
    if config["vector_method"] not in VECTOR_METHODS:
        raise SweepError(f"vector_method {config['vector_method']!r}: choose one of {VECTOR_METHODS}")
    if not config["strengths"] or not all(np.isfinite(config["strengths"])):
        raise SweepError(f"strengths must be a non-empty list of finite numbers, got {config['strengths']}")
    for field in ("trials_per_cell", "batch_size", "max_new_tokens"):
        if int(config[field]) < 1:
            raise SweepError(f"{field} must be >= 1")
    if int(config["control_trials"]) < 0:
        raise SweepError("control_trials must be >= 0")


def plan_trials(config: dict, words: list[str], layers: list[int]) -> list[Trial]:
    """Every trial of the sweep, in a fixed order (the trial ids are the resume keys)."""
    trials = []
    rng = random.Random(config["seed"])
    for protocol in config["protocols"]:
        for layer in layers:
            for strength in config["strengths"]:
                if config["cell_per_word"]:
                    cells = [(w, i) for w in words for i in range(config["trials_per_cell"])]
                else:  # the paper: one word per trial, shuffled, cycling through the list
                    order = list(words)
                    rng.shuffle(order)
                    cells = [(order[i % len(order)], i) for i in range(config["trials_per_cell"])]
                for word, i in cells:
                    trials.append(Trial(f"{protocol}/L{layer}/s{strength:g}/{word}/{i}", "injected", protocol,
                                        word, layer, float(strength), i))
        for i in range(config["control_trials"]):
            trials.append(Trial(f"{protocol}/control/{i}", "control", protocol, None, None, 0.0, i))
    return trials


def extract_vectors(lm, config: dict, words: list[str], cache_path: Optional[str], progress: bool,
                    use_cache: bool = True):
    """Concept vectors for every layer (cached in the results folder, keyed by their recipe)."""
    recipe = {k: config[k] for k in ("vector_method", "vector_position", "template", "system_header", "seed")}
    recipe.update(words=list(words), baseline_words=config["baseline_words"], model=lm.config.name,
                  n_layers=lm.config.n_layers, d_model=lm.config.d_model)
    if use_cache and cache_path and os.path.exists(cache_path):
        cached = vectors.ConceptVectors.load(cache_path)
        if cached.metadata.get("recipe") == recipe:
            return cached
    method = config["vector_method"]
    if method == "contrast_pairs":
        try:
            pairs = protocols.contrast_pairs(words)
        except ValueError as e:
            raise SweepError(str(e)) from None
        result = vectors.contrast_vectors(lm, pairs, system_header=config["system_header"])
    else:
        baseline = resolve_words(config["baseline_words"], "baseline word", allow_duplicates=True)
        result = vectors.concept_vectors(lm, words, baseline, template=config["template"],
                                         system_header=config["system_header"],
                                         position=config["vector_position"], progress=progress)
        if method == "random":
            result = vectors.random_vectors(result, seed=config["seed"])
            result.names = list(words)
    result.metadata["recipe"] = recipe
    if cache_path:
        result.save(cache_path)
    return result


@dataclasses.dataclass
class PromptInfo:
    text: str
    ids: list[int]
    question: str
    start: int
    norm_match: bool


def prompt_info(lm, name: str, system_header: bool) -> PromptInfo:
    data = protocols.protocol(name)
    text = lm.tokenizer.chat_prompt(data["messages"], system_header=system_header)
    start = inject.window_start(lm.tokenizer, text, data["window"], data.get("anchor"))
    return PromptInfo(text=text, ids=lm.tokenizer.encode(text), question=protocols.question(data), start=start,
                      norm_match=bool(data.get("norm_match", False)))


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def generate_batch(lm, batch: list[Trial], config: dict, prompts: dict[str, PromptInfo], concept, cfg_hash: str):
    """Generate one batch; returns its records with empty grades. The batch is padded with clean
    rows to `batch_size` so every batch has the same shape."""
    size = config["batch_size"]
    rows = batch + [batch[-1]] * (size - len(batch))
    d_model = lm.config.d_model
    injection = inject.make(
        layer=[t.layer or 0 for t in rows],
        strength=[t.strength if i < len(batch) else 0.0 for i, t in enumerate(rows)],
        vector=np.stack([concept.vector(t.word, t.layer) if t.word else np.zeros(d_model, np.float32) for t in rows]),
        start=[prompts[t.protocol].start for t in rows],
        norm_match=[prompts[t.protocol].norm_match for t in rows])
    began = time.time()
    generations = lm.generate([prompts[t.protocol].ids for t in rows], max_new_tokens=config["max_new_tokens"],
                              injection=injection, temperature=config["temperature"], top_p=config["top_p"],
                              seed=config["seed"], trial_ids=[t.trial_id for t in rows])[:len(batch)]
    timing = {"batch_seconds": round(time.time() - began, 3), "batch_size": len(batch), "unix_time": round(began, 3)}
    return [results.TrialRecord(
        config_hash=cfg_hash, trial_id=t.trial_id, kind=t.kind, protocol=t.protocol, word=t.word, layer=t.layer,
        strength=t.strength, vector_method=config["vector_method"], trial_index=t.index, seed=config["seed"],
        prompt=prompts[t.protocol].text, question=prompts[t.protocol].question, response=g.text,
        n_tokens=len(g.token_ids), finished=g.finished, grades={}, timing=timing)
        for t, g in zip(batch, generations)]


def grade_and_store(records: list[results.TrialRecord], grader, store: Optional[results.ResultsStore]) -> None:
    """Grade records and append them. If the grader fails part-way, the graded ones are stored and
    the rest kept in the store's ungraded file, so no response is lost; the next run grades them."""
    from jax_introspect import grading
    requests = [grading.GradeRequest(trial_id=r.trial_id, question=r.question, response=r.response, word=r.word)
                for r in records]
    try:
        grades = grader.grade(requests) if grader is not None else [{}] * len(records)
    except grading.GradingError as e:
        done = len(e.partial)
        if store is not None:
            store.append([dataclasses.replace(r, grades=g) for r, g in zip(records, e.partial)])
            store.keep_ungraded(records[done:])
        raise SweepError(f"grading failed at trial {e.trial_id}: {e}; {len(records) - done} generated responses "
                         f"kept in {store.ungraded_path if store else 'memory'}: re-run the same command to grade "
                         "them and continue") from e
    if store is not None:
        store.append([dataclasses.replace(r, grades=g) for r, g in zip(records, grades)])


def config_to_dict(config) -> dict:
    """An ml_collections ConfigDict (or dict) -> a plain JSON-able dict (tuples become lists)."""
    def plain(value):
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: plain(v) for k, v in data.items()}


def run_sweep(lm, config: dict, out: str, *, progress: bool = True, is_writer: bool = True,
              on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Run (or resume) a sweep into `out`; returns a small summary. Only the writer process
    (process 0 on a pod) touches the results folder and calls graders other than a self-hosted
    LLM judge (which, like generation, runs on every process)."""
    from jax_introspect import grading
    validate_config(config)
    if lm.tokenizer is None:
        raise SweepError("the checkpoint has no tokenizer")
    words = resolve_words(config["words"], "concept word")
    layers = resolve_layers(config["layers"], lm.config.n_layers)
    resolved = dict(config, resolved_layers=layers, model=lm.config.name, checkpoint=lm.path)
    from jax_introspect import distributed
    store = results.ResultsStore(out, resolved, writable=is_writer)
    trials = plan_trials(config, words, layers)
    # Only process 0's disk has the results folder: its view of what is done decides for all, or
    # the processes would plan different batches and deadlock in their collectives.
    ungraded = [results.TrialRecord.from_dict(r) for r in distributed.broadcast_from_primary(
        [dataclasses.asdict(r) for r in store.ungraded()] if is_writer else [])]
    done = set(distributed.broadcast_from_primary(sorted(store.done_ids() | {r.trial_id for r in ungraded})))
    pending = [t for t in trials if t.trial_id not in done]
    prompts = {name: prompt_info(lm, name, config["system_header"]) for name in config["protocols"]}
    # Cached vectors are reused single-process only: on a pod every process extracts them together.
    concept = extract_vectors(lm, config, words, os.path.join(out, "vectors.npz") if is_writer else None,
                              progress and is_writer, use_cache=jax.process_count() == 1)
    grades_here = is_writer or config["grader"].startswith("llm:")
    grader = grading.make_grader(config["grader"]) if grades_here else None
    writer_store = store if is_writer else None
    if ungraded:  # responses of an earlier run whose grading failed: grade them, don't regenerate
        grade_and_store(ungraded, grader, writer_store)
        if is_writer:
            store.clear_ungraded()
    batches = list(_batches(pending, config["batch_size"]))
    iterator = batches
    if progress and is_writer:
        from tqdm import tqdm
        iterator = tqdm(batches, desc="trials", unit="batch", postfix={"trials": len(pending)})
    for number, batch in enumerate(iterator):
        grade_and_store(generate_batch(lm, batch, config, prompts, concept, store.hash), grader, writer_store)
        if on_batch:
            on_batch(number)
    return {"results": store.path, "trials": len(trials), "resumed_from": len(done), "ran": len(pending),
            "layers": layers}
