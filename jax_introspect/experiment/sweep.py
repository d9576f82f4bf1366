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
import sys
import time
import zipfile
from typing import Callable, Optional

import jax
import numpy as np

from jax_introspect import config as config_lib
from jax_introspect import inject
from jax_introspect.experiment import files, protocols, results, vectors
from jax_introspect.experiment.sweep_config import (SweepConfig, SweepError, binding_fields, resolve_layers,
                                                    strength_label)

VECTORS_FILE = "vectors.npz"
__all__ = ["SweepConfig", "SweepError", "SweepPlan", "Trial", "plan_sweep", "plan_trials", "run_sweep"]


@dataclasses.dataclass(frozen=True)
class Trial:
    trial_id: str
    kind: str  # injected | control
    protocol: str
    word: Optional[str]
    layer: Optional[int]
    strength: float
    index: int


def as_config(config) -> SweepConfig:
    """A `SweepConfig`, or a mapping of its fields (e.g. read back from a run.json)."""
    return config if isinstance(config, SweepConfig) else SweepConfig.from_dict(dict(config))


def plan_trials(config: SweepConfig, words: list[str], layers: list[int]) -> list[Trial]:
    """Every trial of the sweep, in a fixed order (the trial ids are the resume keys)."""
    trials = []
    rng = random.Random(config.seed)
    for protocol in config.protocols:
        for layer in layers:
            for strength in config.strengths:
                if config.cell_per_word:
                    cells = [(w, i) for w in words for i in range(config.trials_per_cell)]
                else:  # the paper: one word per trial, shuffled, cycling through the list
                    order = list(words)
                    rng.shuffle(order)
                    cells = [(order[i % len(order)], i) for i in range(config.trials_per_cell)]
                for word, i in cells:
                    trials.append(Trial(f"{protocol}/L{layer}/s{strength_label(strength)}/{word}/{i}", "injected", protocol,
                                        word, layer, float(strength), i))
        for i in range(config.control_trials):
            trials.append(Trial(f"{protocol}/control/{i}", "control", protocol, None, None, 0.0, i))
    return trials


def _load_cached_vectors(path: str, recipe: dict):
    """The cached vectors if they were made by this recipe; None if absent, stale or unreadable (a
    cache: an unreadable one is said once and extracted again, nothing is lost)."""
    if not os.path.exists(path):
        return None
    try:
        cached = vectors.ConceptVectors.load(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        print(f"warning: {path} is unreadable ({type(e).__name__}: {e}); it is a cache of concept vectors: "
              "extracting them again", file=sys.stderr)
        return None
    return cached if cached.metadata.get("recipe") == recipe else None


def extract_vectors(lm, config: SweepConfig, words: list[str], cache_path: Optional[str], progress: bool,
                    use_cache: bool = True):
    """Concept vectors for every layer (cached in the results folder, keyed by their recipe)."""
    recipe = {k: getattr(config, k) for k in ("vector_method", "vector_position", "template", "system_header",
                                              "seed")}
    recipe.update(words=list(words), baseline_words=list(config.baseline_words), model=lm.config.name,
                  n_layers=lm.config.n_layers, d_model=lm.config.d_model, dtype=str(lm.dtype))
    if use_cache and cache_path:
        cached = _load_cached_vectors(cache_path, recipe)
        if cached is not None:
            return cached
    method = config.vector_method
    if method == "contrast_pairs":
        result = vectors.contrast_vectors(lm, protocols.contrast_pairs(words), system_header=config.system_header)
    else:
        result = vectors.concept_vectors(lm, words, config.baseline_words, template=config.template,
                                         system_header=config.system_header,
                                         position=config.vector_position, progress=progress)
        if method == "random":
            result = vectors.random_vectors(result, seed=config.seed)
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


def prompt_info(tokenizer, name: str, system_header: bool) -> PromptInfo:
    data = protocols.protocol(name)
    text = tokenizer.chat_prompt(data["messages"], system_header=system_header)
    start = protocols.window_start(tokenizer, text, data["window"], data.get("anchor"))
    return PromptInfo(text=text, ids=tokenizer.encode(text), question=protocols.question(data), start=start,
                      norm_match=bool(data.get("norm_match", False)))


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """What a sweep will run, worked out from the config, the model's config.json and its
    tokenizer: no weights needed, so every check it makes comes before the model loads."""
    config: SweepConfig
    words: list
    layers: list
    trials: list
    prompts: dict  # protocol -> PromptInfo
    binding: dict  # what a results folder is bound to (see `binding`)


def binding(config: SweepConfig, layers: list[int], model_name: str, checkpoint: str, dtype: str) -> dict:
    """The fields that decide the trials' texts (`sweep_config.binding_fields`): a results folder
    holds trials of one binding. Layers are the resolved indices (0.5 and 15 are the same sweep on a
    30-layer model); the checkpoint is its real path (a symlink to it is the same checkpoint)."""
    data = config.to_dict()
    bound = {k: data[k] for k in binding_fields()}
    bound.update(layers=list(layers), model=model_name, dtype=str(dtype),
                 checkpoint=checkpoint if "://" in checkpoint else os.path.realpath(checkpoint))
    return bound


def plan_sweep(config: SweepConfig, model_config, tokenizer, checkpoint: str, dtype: str) -> SweepPlan:
    """Check `config` against the model (layers, prompt lengths) and plan every trial."""
    config = as_config(config)
    if tokenizer is None:
        raise SweepError(f"the checkpoint {checkpoint} has no tokenizer; convert it again with --tokenizer=PATH")
    words = list(config.words)
    layers = resolve_layers(config.layers, model_config.n_layers)
    prompts = {name: prompt_info(tokenizer, name, config.system_header) for name in config.protocols}
    for name, info in prompts.items():
        try:
            config_lib.check_context(model_config, len(info.ids), config.max_new_tokens)
        except config_lib.ContextTooLongError as e:
            raise SweepError(f"protocol {name}: {e} (--config.max_new_tokens)") from e
    return SweepPlan(config=config, words=words, layers=layers, trials=plan_trials(config, words, layers),
                     prompts=prompts, binding=binding(config, layers, model_config.name, checkpoint, dtype))


def estimated_bytes(plan: SweepPlan, model_config) -> int:
    """A generous bound on what the sweep writes: records (prompt + response + grades), the vector
    cache and the report."""
    per_trial = {name: 2 * len(info.text.encode()) + 16 * plan.config.max_new_tokens + 2048
                 for name, info in plan.prompts.items()}
    records = sum(per_trial[t.protocol] for t in plan.trials)
    cache = len(plan.words) * model_config.n_layers * model_config.d_model * 4
    return records + cache + (8 << 20)


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def generate_batch(lm, batch: list[Trial], config: SweepConfig, prompts: dict[str, PromptInfo], concept, cfg_hash: str):
    """Generate one batch; returns its records with empty grades. The batch is padded with clean
    rows to `batch_size` so every batch has the same shape."""
    size = config.batch_size
    rows = batch + [batch[-1]] * (size - len(batch))
    d_model = lm.config.d_model
    injection = inject.make(
        layer=[t.layer or 0 for t in rows],
        strength=[t.strength if i < len(batch) else 0.0 for i, t in enumerate(rows)],
        vector=np.stack([concept.vector(t.word, t.layer) if t.word else np.zeros(d_model, np.float32) for t in rows]),
        start=[prompts[t.protocol].start for t in rows],
        norm_match=[prompts[t.protocol].norm_match for t in rows])
    began = time.time()
    generations = lm.generate([prompts[t.protocol].ids for t in rows], max_new_tokens=config.max_new_tokens,
                              injection=injection, temperature=config.temperature, top_p=config.top_p,
                              seed=config.seed, trial_ids=[t.trial_id for t in rows])[:len(batch)]
    timing = {"batch_seconds": round(time.time() - began, 3), "batch_size": len(batch), "unix_time": round(began, 3)}
    return [results.TrialRecord(
        config_hash=cfg_hash, trial_id=t.trial_id, kind=t.kind, protocol=t.protocol, word=t.word, layer=t.layer,
        strength=t.strength, vector_method=config.vector_method, trial_index=t.index, seed=config.seed,
        prompt=prompts[t.protocol].text, question=prompts[t.protocol].question, response=g.text,
        n_tokens=len(g.token_ids), finished=g.finished, grades={}, timing=timing)
        for t, g in zip(batch, generations)]


def grade_and_store(records: list[results.TrialRecord], grader, store: Optional[results.ResultsStore]) -> None:
    """Grade records and append them. If the grader fails part-way, the graded ones are stored and
    the rest kept in the store's ungraded file, so no response is lost; the next run grades them."""
    from jax_introspect.experiment import grading
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


def run_sweep(lm, config: SweepConfig, out: str, *, progress: bool = True, is_writer: bool = True,
              on_batch: Optional[Callable[[int], None]] = None, plan: Optional[SweepPlan] = None) -> dict:
    """Run (or resume) a sweep into `out`; returns a small summary. Only the writer process
    (process 0 on a pod) touches the results folder, which it locks against a second writer, and
    calls graders other than a self-hosted LLM judge (which, like generation, runs on every
    process). `config`: a SweepConfig (or a mapping of its fields); `plan`: from `plan_sweep`, when
    the caller made it before loading the model."""
    plan = plan or plan_sweep(as_config(config), lm.config, lm.tokenizer, lm.path, str(lm.dtype))
    if plan.binding["dtype"] != str(lm.dtype):
        raise SweepError(f"the plan was made for {plan.binding['dtype']} weights but the model holds {lm.dtype}")
    if not is_writer:
        return _run(lm, plan, out, None, progress=False, on_batch=on_batch)
    results.check_output_folder(out, estimated_bytes(plan, lm.config))
    with files.FolderLock(out):
        return _run(lm, plan, out, results.ResultsStore(out, plan.binding), progress=progress, on_batch=on_batch)


def _run(lm, plan: SweepPlan, out: str, store: Optional[results.ResultsStore], progress: bool,
         on_batch: Optional[Callable[[int], None]]) -> dict:
    from jax_introspect import distributed
    from jax_introspect.experiment import grading
    config = plan.config
    # Only process 0's disk has the results folder: its view of what is done decides for all, or
    # the processes would plan different batches and deadlock in their collectives.
    ungraded = [results.TrialRecord.from_dict(r) for r in distributed.broadcast_from_primary(
        [dataclasses.asdict(r) for r in store.ungraded()] if store else [])]
    done = set(distributed.broadcast_from_primary(
        sorted(store.done_ids() | {r.trial_id for r in ungraded}) if store else []))
    pending = [t for t in plan.trials if t.trial_id not in done]
    # Cached vectors are reused single-process only: on a pod every process extracts them together.
    concept = extract_vectors(lm, config, plan.words, os.path.join(out, VECTORS_FILE) if store else None,
                              progress, use_cache=jax.process_count() == 1) if pending else None
    grades_here = store is not None or grading.parse_spec(config.grader)[0] == "llm"
    grader = grading.make_grader(config.grader) if grades_here else None
    if ungraded:  # responses of an earlier run whose grading failed: grade them, don't regenerate
        grade_and_store(ungraded, grader, store)
        if store:
            store.clear_ungraded()
    batches = list(_batches(pending, config.batch_size))
    iterator = batches
    if progress:
        from tqdm import tqdm
        iterator = tqdm(batches, desc="trials", unit="batch", postfix={"trials": len(pending)})
    config_hash = results.config_hash(plan.binding)
    for number, batch in enumerate(iterator):
        grade_and_store(generate_batch(lm, batch, config, plan.prompts, concept, config_hash), grader, store)
        if on_batch:
            on_batch(number)
    return {"results": os.path.join(out, results.RESULTS_FILE), "trials": len(plan.trials),
            "resumed_from": len(done), "ran": len(pending), "layers": plan.layers}
