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
from jax_introspect.experiment import files, protocols, readout, results, vectors
from jax_introspect.experiment.protocols import experiments
from jax_introspect.experiment.sweep_config import (SweepConfig, SweepError, bound_values, grader_specs,
                                                    resolve_layers, strength_label)

VECTORS_FILE = "vectors.npz"
__all__ = ["ExperimentPlan", "SweepConfig", "SweepError", "SweepPlan", "Trial", "plan_experiment", "plan_sweep",
           "plan_trials", "run_sweep"]


@dataclasses.dataclass(frozen=True)
class Trial:
    trial_id: str
    kind: str  # injected | control
    protocol: str
    word: Optional[str]
    layer: Optional[int]
    strength: float
    index: int
    prompt_key: Optional[str] = None  # its prompt in a plan's `prompts` when not the protocol's one (experiments.py)


def as_config(config) -> SweepConfig:
    """A `SweepConfig`, or a mapping of its fields (e.g. read back from a run.json)."""
    return config if isinstance(config, SweepConfig) else SweepConfig.from_dict(dict(config))


def plan_trials(config: SweepConfig, words: list[str], layers: list[int]) -> list[Trial]:
    """Every trial of the sweep, in a fixed order (the trial ids are the resume keys)."""
    trials = []
    rng = random.Random(config.seed)
    for protocol in config.protocols:
        if experiments.is_experiment(protocol):  # Lindsey's other experiments: a prompt per sentence/word pair
            trials += experiments.trials(config, protocol, layers, lambda tid, kind, w, l, s, i, p=protocol: Trial(
                tid, kind, p, w, l, s, i, experiments.prompt_key(p, w)))
            continue
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
        for layer in (layers if config.controls_per_layer else [None]):
            ids = f"{protocol}/control" if layer is None else f"{protocol}/control/L{layer}"
            for i in range(config.control_trials):
                trials.append(Trial(f"{ids}/{i}", "control", protocol, None, layer, 0.0, i))
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


def extract_vectors(lm, plan: "SweepPlan", cache_path: Optional[str], progress: bool, use_cache: bool = True):
    """Concept vectors for every layer (cached in the results folder, keyed by their recipe), or
    those of the plan's vector files."""
    config, words = plan.config, plan.words
    recipe = {k: getattr(config, k) for k in ("vector_method", "vector_position", "template", "system_header",
                                              "seed")}
    recipe.update(words=list(words), baseline_words=list(config.baseline_words), model=lm.config.name,
                  n_layers=lm.config.n_layers, d_model=lm.config.d_model, dtype=str(lm.dtype))
    if plan.prefix:  # only when set: the caches of earlier runs stay valid
        recipe["prefix"] = plan.prefix
    if plan.file_vectors is not None:
        recipe["files"] = plan.file_vectors.metadata["files"]
    if use_cache and cache_path:
        cached = _load_cached_vectors(cache_path, recipe)
        if cached is not None:
            return cached
    method = config.vector_method
    if method == "files":  # read when planned; saved below as the record of what was injected
        result = plan.file_vectors
    elif method == "contrast_pairs":
        result = vectors.contrast_vectors(lm, protocols.contrast_pairs(words), system_header=config.system_header,
                                          prefix=plan.prefix)
    else:
        result = vectors.concept_vectors(lm, words, config.baseline_words, template=config.template,
                                         system_header=config.system_header, position=config.vector_position,
                                         progress=progress, prefix=plan.prefix)
        if method == "random":
            result = vectors.random_vectors(result, seed=config.seed)
            result.names = list(words)
    result.metadata["recipe"] = recipe
    if cache_path:
        result.save(cache_path)
    return result


def prompt_prefix(tokenizer, double_bos: bool) -> str:
    """Text before every chat prompt: with `double_bos`, a second BOS (the template writes the
    first), as vLLM's generate adds one to an already templated Llama-3 string."""
    if not double_bos:
        return ""
    if tokenizer.bos_id is None:
        raise SweepError("double_bos: this tokenizer puts no BOS before text, so there is none to double "
                         "(it is a Llama-3 tokenizer's <|begin_of_text|>, as vLLM adds it)")
    return tokenizer.decode([tokenizer.bos_id])


@dataclasses.dataclass
class PromptInfo:
    text: str  # what the model reads, the doubled BOS included
    ids: list[int]
    question: str
    start: int
    norm_match: object  # the protocol's setting as written (False, "mlp_out", "residual"): inject.make reads it
    end: Optional[int] = None  # the window's exclusive end (None: through the reply); experiments.py's windows


def experiment_prompt_infos(tokenizer, name: str, config: SweepConfig, prefix: str = "") -> dict:
    """{prompt key: PromptInfo} of one of Lindsey's other experiments: one prompt per sentence/word
    pair of the sweep's words, its window the sentence's tokens (or none: start at the last token)."""
    out = {}
    for sentence, word in experiments.pairs_for(config.words):
        text = prefix + tokenizer.chat_prompt(experiments.messages(name, sentence, word),
                                              system_header=config.system_header)
        ids = tokenizer.encode(text)
        span = experiments.window(tokenizer, name, text, sentence)
        start, end = span if span is not None else (len(ids) - 1, None)
        out[experiments.prompt_key(name, word)] = PromptInfo(
            text=text, ids=ids, question=experiments.question(name, sentence, word), start=start, norm_match=False,
            end=end)
    return out


def prompt_of(prompts: dict, trial: Trial) -> PromptInfo:
    return prompts[trial.prompt_key or trial.protocol]


def prompt_info(tokenizer, name: str, system_header: bool, prefix: str = "") -> PromptInfo:
    data = protocols.protocol(name)
    text = prefix + tokenizer.chat_prompt(data["messages"], system_header=system_header)
    start = protocols.window_start(tokenizer, text, data["window"], data.get("anchor"))
    return PromptInfo(text=text, ids=tokenizer.encode(text), question=protocols.question(data), start=start,
                      norm_match=data.get("norm_match", False))


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
    prefix: str = ""  # before every chat prompt (`prompt_prefix`)
    file_vectors: Optional[vectors.ConceptVectors] = None  # vector_method "files": read and checked


def binding(config: SweepConfig, layers: list[int], model_name: str, checkpoint: str, dtype: str,
            numerics: str = config_lib.DEQUANTIZED, adapter: Optional[str] = None) -> dict:
    """The fields that decide the trials' texts (`sweep_config.bound_values`): a results folder
    holds trials of one binding. Layers are the resolved indices (0.5 and 15 are the same sweep on a
    30-layer model); the checkpoint is its real path (a symlink to it is the same checkpoint);
    vector files are their contents' digests (a copy elsewhere is the same file); `numerics` (how
    an FP8 checkpoint runs) only when not the default, so folders made before it stay bound; likewise
    `adapter`, the digest of the adapter the model runs (`adapters.digest`), only when there is one."""
    bound = bound_values(config)
    bound.update(layers=list(layers), model=model_name, dtype=str(dtype),
                 checkpoint=checkpoint if "://" in checkpoint else os.path.realpath(checkpoint))
    if numerics != config_lib.DEQUANTIZED:
        bound["numerics"] = numerics
    if adapter is not None:
        bound["adapter"] = adapter
    if "vector_files" in bound:
        bound["vector_files"] = [vectors.file_digest(p) for p in config.vector_files]
    return bound


def read_vector_files(config: SweepConfig, words: list, layers: list, model_config) -> vectors.ConceptVectors:
    """The sweep's vectors from its vector files, checked against its words, layers and the model's width."""
    try:
        return vectors.vectors_from_files(config.vector_files, words, layers, model_config.d_model)
    except vectors.VectorError as e:
        raise SweepError(f"vector_files: {e}") from e


def plan_sweep(config: SweepConfig, model_config, tokenizer, checkpoint: str, dtype: str,
               numerics: str = config_lib.DEQUANTIZED, adapter: Optional[str] = None) -> SweepPlan:
    """Check `config` against the model (layers, prompt lengths; `numerics` against its weights)
    and plan every trial. `adapter`: the digest of the adapter the model will run, if any."""
    config = as_config(config)
    if tokenizer is None:
        raise SweepError(f"the checkpoint {checkpoint} has no tokenizer; convert it again with --tokenizer=PATH")
    try:
        config_lib.with_numerics(model_config, numerics)
    except config_lib.ConfigError as e:
        raise SweepError(f"--numerics: {e}") from e
    words = list(config.words)
    layers = resolve_layers(config.layers, model_config.n_layers)
    prefix = prompt_prefix(tokenizer, config.double_bos)
    prompts = {name: prompt_info(tokenizer, name, config.system_header, prefix) for name in config.protocols
               if not experiments.is_experiment(name)}
    for name in filter(experiments.is_experiment, config.protocols):
        try:
            prompts.update(experiment_prompt_infos(tokenizer, name, config, prefix))
        except protocols.ProtocolError as e:
            raise SweepError(f"protocol {name}: {e}") from e
    for name, info in prompts.items():
        try:
            config_lib.check_context(model_config, len(info.ids), config.max_new_tokens)
        except config_lib.ContextTooLongError as e:
            raise SweepError(f"protocol {name}: {e} (--config.max_new_tokens)") from e
    file_vectors = read_vector_files(config, words, layers, model_config) if config.vector_files else None
    if config.readout:  # its token sets, before the model loads
        try:
            readout.answer_token_sets(tokenizer)
        except readout.ReadoutError as e:
            raise SweepError(f"readout: {e}") from e
    trials = plan_trials(config, words, layers)
    if config.edge_search:  # its injected trials are planned step by step (edge.py)
        trials = [t for t in trials if t.kind == "control"]
    return SweepPlan(config=config, words=words, layers=layers, trials=trials, prompts=prompts,
                     binding=binding(config, layers, model_config.name, checkpoint, dtype, numerics, adapter),
                     prefix=prefix, file_vectors=file_vectors)


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """One or more arms — each a `SweepConfig` with its own protocols, vectors, strengths and
    graders (e.g. Lindsey's protocol and the 405B replication's on the same weights) — run into one
    results folder and reported together. One arm binds a folder exactly as a lone sweep does."""
    arms: tuple  # of SweepPlan

    @property
    def binding(self) -> dict:
        return self.arms[0].binding if len(self.arms) == 1 else {"arms": [a.binding for a in self.arms]}

    @property
    def trials(self) -> list:
        return [t for arm in self.arms for t in arm.trials]

    def vectors_file(self, arm: int) -> str:
        """The concept-vector cache of an arm (one arm: vectors.npz, as a lone sweep)."""
        return VECTORS_FILE if len(self.arms) == 1 else f"vectors.arm{arm}.npz"


def as_configs(configs) -> tuple:
    """One `SweepConfig` (or a mapping of its fields), or a sequence of them: the arms."""
    if isinstance(configs, (list, tuple)):
        return tuple(as_config(c) for c in configs)
    return (as_config(configs),)


def plan_experiment(configs, model_config, tokenizer, checkpoint: str, dtype: str,
                    numerics: str = config_lib.DEQUANTIZED, adapter: Optional[str] = None) -> ExperimentPlan:
    """`plan_sweep` for every arm. A protocol runs in one arm only: its trial ids (which carry the
    protocol) stay unique across the folder."""
    arms = tuple(plan_sweep(c, model_config, tokenizer, checkpoint, dtype, numerics, adapter)
                 for c in as_configs(configs))
    seen = {}
    for i, arm in enumerate(arms):
        for protocol in arm.config.protocols:
            if protocol in seen:
                raise SweepError(f"protocol {protocol} is in arms {seen[protocol]} and {i}: give each protocol "
                                 "to one arm (its trials would share ids)")
            seen[protocol] = i
    return ExperimentPlan(arms)


def estimated_bytes(plan, model_config) -> int:
    """A generous bound on what the sweep writes (all arms): records, vector caches, the report."""
    if isinstance(plan, ExperimentPlan):
        return sum(_arm_bytes(arm, model_config) for arm in plan.arms) + (8 << 20)
    return _arm_bytes(plan, model_config) + (8 << 20)


def _arm_bytes(plan: SweepPlan, model_config) -> int:
    """A generous bound on what the sweep writes: records (prompt + response + grades), the vector
    cache and the report."""
    per_trial = {name: 2 * len(info.text.encode()) + 16 * plan.config.max_new_tokens + 2048
                 for name, info in plan.prompts.items()}
    records = sum(per_trial[t.prompt_key or t.protocol] for t in plan.trials)
    if plan.config.edge_search:  # its injected trials are planned as it goes: at most the budget per layer
        records += sum(per_trial.values()) * plan.config.edge_budget * len(plan.layers)
    cache = len(plan.words) * model_config.n_layers * model_config.d_model * 4
    return records + cache


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _injection(lm, rows: list[Trial], prompts: dict[str, PromptInfo], concept, clean_after: int):
    """The rows' injections (rows from `clean_after` on: strength 0, padding)."""
    d_model = lm.config.d_model
    return inject.make(
        layer=[t.layer or 0 for t in rows],
        strength=[t.strength if i < clean_after else 0.0 for i, t in enumerate(rows)],
        # an experiment's control names a word (layer None) but injects nothing
        vector=np.stack([concept.vector(t.word, t.layer) if t.word and t.layer is not None
                         else np.zeros(d_model, np.float32) for t in rows]),
        start=[prompt_of(prompts, t).start for t in rows],
        end=[prompt_of(prompts, t).end for t in rows],
        norm_match=[prompt_of(prompts, t).norm_match for t in rows])


def _records(batch: list[Trial], generations, config: SweepConfig, prompts: dict[str, PromptInfo], cfg_hash: str,
             began: float) -> list:
    timing = {"batch_seconds": round(time.time() - began, 3), "batch_size": len(batch), "unix_time": round(began, 3)}
    return [results.TrialRecord(
        config_hash=cfg_hash, trial_id=t.trial_id, kind=t.kind, protocol=t.protocol, word=t.word, layer=t.layer,
        strength=t.strength, vector_method=config.vector_method, trial_index=t.index, seed=config.seed,
        prompt=prompt_of(prompts, t).text, question=prompt_of(prompts, t).question, response=g.text,
        n_tokens=len(g.token_ids), finished=g.finished, grades={}, timing=timing)
        for t, g in zip(batch, generations)]


def generate_batch(lm, batch: list[Trial], config: SweepConfig, prompts: dict[str, PromptInfo], concept, cfg_hash: str,
                   reader=None):
    """Generate one batch with plain batched generation; returns its records with empty grades (and
    `reader`'s readout, a forward of its own). The batch is padded with clean rows to `batch_size`
    so every batch has the same shape."""
    rows = batch + [batch[-1]] * (config.batch_size - len(batch))
    began = time.time()
    generations = lm.generate([prompt_of(prompts, t).ids for t in rows], max_new_tokens=config.max_new_tokens,
                              injection=_injection(lm, rows, prompts, concept, len(batch)),
                              temperature=config.temperature, top_p=config.top_p,
                              seed=config.seed, trial_ids=[t.trial_id for t in rows])[:len(batch)]
    records = _records(batch, generations, config, prompts, cfg_hash, began)
    if reader is not None:
        records = reader.attach(records, batch, prompts, concept)
    return _measured(lm, batch, generations, records, prompts, concept, config)


def generate_call(lm, trials: list[Trial], config: SweepConfig, prompts: dict[str, PromptInfo], concept,
                  cfg_hash: str, reader=None):
    """Generate one engine call's trials (one protocol's; `engine.py`): the same texts as
    `generate_batch`, with the shared prefix and each cell prefilled once and finished slots
    refilled; `reader`'s readout computed in the cells' prefill. Calls are padded to
    `call_size(config)` trials, so they share one compiled program."""
    began = time.time()
    generations = lm.generate_shared([prompt_of(prompts, t).ids for t in trials], max_new_tokens=config.max_new_tokens,
                                     injection=_injection(lm, trials, prompts, concept, len(trials)),
                                     temperature=config.temperature, top_p=config.top_p, seed=config.seed,
                                     trial_ids=[t.trial_id for t in trials], slots=config.batch_size,
                                     trials=call_size(config), readout=reader and reader.request(trials),
                                     prefill_block=config.prefill_block, share_depth=config.share_depth)
    records = _records(trials, generations, config, prompts, cfg_hash, began)
    if reader is not None:
        records = reader.fill(records, trials, generations)
    return _measured(lm, trials, generations, records, prompts, concept, config)


def _measured(lm, trials: list[Trial], generations, records: list, prompts: dict, concept, config) -> list:
    """Records with the measurements their protocols ask for (intentional control: the cosine of the
    written tokens' residuals with the word's concept vector at every layer; `lindsey_experiments`)."""
    if not any(experiments.is_experiment(t.protocol) for t in trials):
        return records
    from jax_introspect.experiment import lindsey_experiments
    return lindsey_experiments.measure(lm, trials, generations, records, prompts, concept, config)


def call_size(config: SweepConfig) -> int:
    return config.batch_size * (config.batches_per_call if config.engine == "shared" else 1)


def _calls(trials: list[Trial], config: SweepConfig) -> list[list[Trial]]:
    """The pending trials as generation calls: `batch_size` trials per plain batch; with the engine,
    `call_size` trials of one protocol per call (a call shares one prompt's prefix)."""
    if config.engine == "plain":
        return list(_batches(trials, config.batch_size))
    by_protocol = {}
    for t in trials:
        by_protocol.setdefault(t.protocol, []).append(t)
    return [call for group in by_protocol.values() for call in _batches(group, call_size(config))]


def make_graders(config: SweepConfig, writer: bool) -> dict:
    """{protocol: Grader or None}: one grader per distinct spec (`sweep_config.grader_specs`). The
    writer builds them all; other processes of a pod only self-hosted judges, which run on every
    process like generation (None: that protocol is graded by the writer alone)."""
    from jax_introspect.experiment import grading
    specs = grader_specs(config)
    ordinary = {p: s for p, s in specs.items() if not experiments.is_experiment(p)}
    built = {spec: grading.make_grader(spec) for spec in dict.fromkeys(ordinary.values())
             if writer or grading.is_self_hosted(spec)}
    graders = {protocol: built.get(spec) for protocol, spec in ordinary.items()}
    if len(ordinary) < len(specs):  # Lindsey's other experiments: their own questions, the spec names the judge
        from jax_introspect.experiment.grading import experiments as experiment_grading
        graders.update(experiment_grading.make_graders({p: s for p, s in specs.items() if p not in ordinary}, writer))
    return graders


def _grade_into(grades: dict, records: list, graders: dict) -> None:
    """Fill `grades` {trial_id: grade, or None when the grader left it ungraded}, each record graded
    by its protocol's grader, one call per grader in the order of first use (a pod's processes
    agree on it). On a GradingError, `grades` holds what was graded before it."""
    from jax_introspect.experiment import grading
    for grader in dict.fromkeys(graders[r.protocol] for r in records):
        group = [r for r in records if graders[r.protocol] is grader]
        ids = [r.trial_id for r in group]
        if grader is None:  # not graded on this process (a pod's non-writer): nothing is stored here
            grades.update((i, {}) for i in ids)
            continue
        requests = [grading.GradeRequest(trial_id=r.trial_id, question=r.question, response=r.response, word=r.word,
                                         strength=r.strength, protocol=r.protocol) for r in group]
        try:
            grades.update(zip(ids, grader.grade(requests)))
        except grading.GradingError as e:
            grades.update(zip(ids, e.partial))
            raise


def _store(records: list, grades: dict, store: Optional[results.ResultsStore]) -> list:
    """Append the graded records; keep the rest (no grade, or None) in the ungraded file, once
    each. Returns the records left ungraded."""
    graded = [dataclasses.replace(r, grades=grades[r.trial_id]) for r in records if grades.get(r.trial_id) is not None]
    ungraded = [r for r in records if grades.get(r.trial_id) is None]
    if store is not None:
        if graded:
            store.append(graded)
        kept = {r.trial_id for r in store.ungraded()} if ungraded else set()
        if any(r.trial_id not in kept for r in ungraded):
            store.keep_ungraded([r for r in ungraded if r.trial_id not in kept])
    return ungraded


def grade_and_store(records: list[results.TrialRecord], graders: dict, store: Optional[results.ResultsStore]) -> int:
    """Grade records, each with its protocol's grader (`make_graders`), and append them. A record
    the grader leaves ungraded (None: a judge's reply that broke its schema after retries) is kept
    in the store's ungraded file, never guessed; so are the rest when a grader fails part-way. No
    response is lost: the next run grades them. Returns how many were left ungraded."""
    from jax_introspect.experiment import grading
    grades = {}
    try:
        _grade_into(grades, records, graders)
    except grading.GradingError as e:
        left = _store(records, grades, store)
        raise SweepError(f"grading failed at trial {e.trial_id}: {e}; {len(left)} generated responses "
                         f"kept in {store.ungraded_path if store else 'memory'}: re-run the same command to grade "
                         "them and continue") from e
    return len(_store(records, grades, store))


def run_sweep(lm, config, out: str, *, progress: bool = True, is_writer: bool = True,
              on_batch: Optional[Callable[[int], None]] = None, plan=None) -> dict:
    """Run (or resume) a sweep into `out`; returns a small summary. Only the writer process
    (process 0 on a pod) touches the results folder, which it locks against a second writer, and
    calls graders other than a self-hosted judge (which, like generation, runs on every process).
    `config`: a SweepConfig (or a mapping of its fields), or a sequence of them (arms, run one
    after the other into the folder); `plan`: from `plan_sweep` / `plan_experiment`, when the
    caller made it before loading the model."""
    if plan is None:
        plan = plan_experiment(config, lm.config, lm.tokenizer, lm.path, str(lm.dtype), lm.numerics,
                               getattr(lm, "adapter_digest", None))
    elif isinstance(plan, SweepPlan):
        plan = ExperimentPlan((plan,))
    for arm in plan.arms:
        if arm.binding["dtype"] != str(lm.dtype):
            raise SweepError(f"the plan was made for {arm.binding['dtype']} weights but the model holds {lm.dtype}")
        planned = arm.binding.get("numerics", config_lib.DEQUANTIZED)
        if planned != lm.numerics:
            raise SweepError(f"the plan was made for numerics={planned!r} but the model runs {lm.numerics!r}")
        running = getattr(lm, "adapter_digest", None)
        if arm.binding.get("adapter") != running:
            raise SweepError(f"the plan was made for adapter {arm.binding.get('adapter') or 'none'} but the model "
                             f"runs adapter {running or 'none'}")
    if not is_writer:
        return _run_arms(lm, plan, out, None, progress=False, on_batch=on_batch)
    results.check_output_folder(out, estimated_bytes(plan, lm.config))
    with files.FolderLock(out):
        return _run_arms(lm, plan, out, results.ResultsStore(out, plan.binding), progress=progress,
                         on_batch=on_batch)


def _run_arms(lm, plan: ExperimentPlan, out: str, store: Optional[results.ResultsStore], progress: bool,
              on_batch: Optional[Callable[[int], None]]) -> dict:
    from jax_introspect.experiment import edge
    summaries = [(edge.run_edge if arm.config.edge_search else _run)(
        lm, arm, out, store, progress, on_batch, vectors_path=os.path.join(out, plan.vectors_file(i)),
        config_hash=results.config_hash(plan.binding)) for i, arm in enumerate(plan.arms)]
    total = {k: sum(s[k] for s in summaries) for k in ("trials", "resumed_from", "ran", "ungraded")}
    edges = [s["edge"] for s in summaries if "edge" in s]
    return dict(total, results=os.path.join(out, results.RESULTS_FILE),
                layers=sorted({layer for s in summaries for layer in s["layers"]}), **({"edge": edges} if edges else {}))


def _run(lm, plan: SweepPlan, out: str, store: Optional[results.ResultsStore], progress: bool,
         on_batch: Optional[Callable[[int], None]], vectors_path: str, config_hash: str, graders=None) -> dict:
    """Run (or resume) `plan.trials` into `store`; `graders`: from `make_graders` (made here when None)."""
    from jax_introspect import distributed
    config = plan.config
    # Only process 0's disk has the results folder: its view of what is done decides for all, or
    # the processes would plan different batches and deadlock in their collectives.
    ungraded = [results.TrialRecord.from_dict(r) for r in distributed.broadcast_from_primary(
        [dataclasses.asdict(r) for r in store.ungraded() if r.protocol in config.protocols] if store else [])]
    done = set(distributed.broadcast_from_primary(
        sorted(store.done_ids() | {r.trial_id for r in ungraded}) if store else []))
    pending = [t for t in plan.trials if t.trial_id not in done]
    # Cached vectors are reused single-process only: on a pod every process extracts them together.
    concept = extract_vectors(lm, plan, vectors_path if store else None,
                              progress, use_cache=jax.process_count() == 1) if pending else None
    graders = graders if graders is not None else make_graders(config, writer=store is not None)
    left_ungraded = 0
    if ungraded:  # responses of an earlier run left ungraded: grade them, don't regenerate
        left_ungraded = grade_and_store(ungraded, graders, store)
        if store and not store.ungraded():  # nothing left, of this arm or another
            store.clear_ungraded()
    calls = _calls(pending, config)
    generate = generate_batch if config.engine == "plain" else generate_call
    reader = readout.record_readout(lm, config, out if store else None, plan.layers, plan.trials) if calls else None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(pending), desc="trials", unit="trial")
    for number, call in enumerate(calls):
        records = generate(lm, call, config, plan.prompts, concept, config_hash, reader)
        left_ungraded += grade_and_store(records, graders, store)
        if bar is not None:
            bar.update(len(call))
        if on_batch:
            on_batch(number)
    if bar is not None:
        bar.close()
    if left_ungraded and store:
        print(f"warning: {left_ungraded} responses were left ungraded (the judge's reply broke its schema after "
              f"its retries); they are kept in {store.ungraded_path}: re-run the same command to grade them",
              file=sys.stderr)
    return {"results": os.path.join(out, results.RESULTS_FILE), "trials": len(plan.trials),
            "resumed_from": len(plan.trials) - len(pending), "ran": len(pending), "layers": plan.layers, "ungraded": left_ungraded}
