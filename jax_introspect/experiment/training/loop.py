"""The training loop: optax adamw (warmup + cosine), global-norm clipping, gradient accumulation
(optax.MultiSteps), one jitted train step, orbax checkpoints, metrics.jsonl, a loss-curve PNG.

Only the adapter is differentiated: the base params are an ordinary (non-differentiated) argument
of the jitted step, and the leaves that are not trained (the adapter's layer masks; the LoRA
factors when only the bias is trained, the bias when only LoRA is) get zero updates through
`optax.multi_transform` (clipping and adamw see the trained leaves only).

Determinism and resume: micro-batch i is a pure function of (config.seed, i) (`data.examples`),
the adapter init of config.seed, and a checkpoint (every `checkpoint_every` optimizer steps,
written synchronously by an orbax CheckpointManager, atomically: a kill mid-save leaves the
previous one) holds the adapter, the optimizer state (MultiSteps' accumulators and adam's
moments included) and the step. A run killed at any point and started again with the same
command restores the latest checkpoint, drops the metrics lines after it and recomputes the same
steps: the same loss curve (tests/test_training.py: equal within 1e-6 in float32 on CPU).

Output folder: run.json (config, words, checkpoint, objective, figures), metrics.jsonl (one line
per optimizer step), checkpoints/ (orbax), vectors.npz (the training words' concept vectors),
loss.png, adapter/ (`adapters.save`, at the end).
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_introspect import adapters as adapters_lib
from jax_introspect import sharding as sharding_lib
from jax_introspect.experiment import vectors as vectors_lib
from jax_introspect.experiment.sweep_config import resolve_layers
from jax_introspect.experiment.training import data as data_lib
from jax_introspect.experiment.training import objectives
from jax_introspect.experiment.training.config import TrainConfig, TrainConfigError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
VECTORS_FILE = "vectors.npz"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
LOSS_PNG = "loss.png"
# Fields that may change between a run and its resumption (they do not change what is computed).
_RESUMABLE_CHANGES = ("crash_after_step", "steps", "checkpoint_every", "keep_checkpoints")


class TrainError(ValueError):
    pass


# --- the adapter spec and the optimizer ------------------------------------------------------------

def adapter_spec(config: TrainConfig, model_config, injection_layers) -> adapters_lib.AdapterSpec:
    n = model_config.n_layers
    bias_layers = ()
    if config.train_bias:
        bias_layers = tuple(resolve_layers(config.bias_layers, n)) if config.bias_layers else tuple(injection_layers)
    return adapters_lib.AdapterSpec(
        rank=config.lora_rank, alpha=config.lora_alpha,
        targets=tuple(config.lora_targets) if config.train_lora else (),
        layers=tuple(resolve_layers(config.lora_layers, n)) if config.lora_layers else (),
        bias_layers=bias_layers)


def labels(adapter: adapters_lib.Adapter, config: TrainConfig) -> adapters_lib.Adapter:
    """'train' / 'frozen' per leaf of the adapter."""
    mask = adapters_lib.trainable(adapter)
    lora = {t: adapters_lib.LoRA(a="train" if config.train_lora else "frozen",
                                 b="train" if config.train_lora else "frozen") for t in mask.lora}
    return adapters_lib.Adapter(lora=lora, lora_mask="frozen", bias="train" if config.train_bias else "frozen",
                                bias_mask="frozen", scale=adapter.scale)


def schedule(config: TrainConfig):
    peak = config.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if config.warmup_steps else peak, peak_value=peak, warmup_steps=config.warmup_steps,
        decay_steps=config.steps, end_value=peak * config.end_lr_fraction)


def optimizer(config: TrainConfig, label_tree) -> optax.MultiSteps:
    inner = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []
    inner.append(optax.adamw(schedule(config), weight_decay=config.weight_decay))
    tx = optax.multi_transform({"train": optax.chain(*inner), "frozen": optax.set_to_zero()},
                               lambda _: label_tree)
    return optax.MultiSteps(tx, every_k_schedule=config.grad_accum)


# --- the jitted step --------------------------------------------------------------------------------

def make_train_step(config: TrainConfig, cfg, layout, label_tree, tx):
    """jit(step)(adapter, opt_state, params, arrays) -> (adapter, opt_state, metrics)."""
    if config.objective == "sft":
        def loss_fn(adapter, params, arrays):
            return objectives.sft_loss(adapter, params, cfg, arrays, layout=layout)
    else:
        def loss_fn(adapter, params, arrays):
            return objectives.dpo_loss(adapter, params, cfg, arrays, layout=layout, beta=config.dpo_beta)

    def step(adapter, opt_state, params, arrays):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapter, params, arrays)
        grads = jax.tree.map(lambda g, lab: g if lab == "train" else jnp.zeros_like(g), grads, label_tree)
        # The gradient MultiSteps hands to the inner optimizer at this micro-step (its running mean);
        # on the last micro-step of an optimizer step this is the norm that clipping sees.
        n = opt_state.mini_step.astype(jnp.float32)
        mean = jax.tree.map(lambda g, acc: acc + (g - acc) / (n + 1.0), grads, opt_state.acc_grads)
        metrics = dict(metrics, grad_norm=optax.global_norm(mean))
        updates, opt_state = tx.update(grads, opt_state, adapter)
        adapter = optax.apply_updates(adapter, updates)
        return adapter, opt_state, metrics
    return jax.jit(step)


def place_arrays(batch: data_lib.Batch, layout) -> dict:
    tokens = layout.of("tokens")
    injection = batch.injection()
    placed = layout.put((batch.prompt, batch.prompt_valid, batch.answer, batch.answer_valid, injection),
                        (tokens, tokens, tokens, tokens, layout.injection()))
    return dict(zip(("prompt", "prompt_valid", "answer", "answer_valid", "injection"), placed))


# --- checkpoints ------------------------------------------------------------------------------------

def _manager(out: str, config: TrainConfig):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out, CHECKPOINTS)), options=options,
                                 item_names=("state", "meta"))


def _state_dict(adapter, opt_state) -> dict:
    leaves = jax.tree.leaves((adapter, opt_state))
    return {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}


def save_checkpoint(manager, step: int, adapter, opt_state, meta: dict) -> None:
    import orbax.checkpoint as ocp
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(adapter, opt_state)),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def restore_checkpoint(manager, adapter, opt_state):
    """(step, adapter, opt_state, meta) of the latest checkpoint, or None."""
    import orbax.checkpoint as ocp
    step = manager.latest_step()
    if step is None:
        return None
    template = _state_dict(adapter, opt_state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template),
                                                             meta=ocp.args.JsonRestore()))
    state = restored["state"]
    leaves = [state[k] for k in sorted(template)]
    adapter, opt_state = jax.tree.unflatten(jax.tree.structure((adapter, opt_state)), leaves)
    return step, adapter, opt_state, restored["meta"]


# --- files ------------------------------------------------------------------------------------------

def _write_json(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(out: str) -> list[dict]:
    path = os.path.join(out, METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: it and what follows are recomputed
    return rows


def _truncate_metrics(out: str, step: int) -> None:
    kept = [r for r in read_metrics(out) if r["step"] <= step]
    path = os.path.join(out, METRICS_FILE)
    with open(path + ".tmp", "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def plot_loss(out: str) -> Optional[str]:
    rows = read_metrics(out)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    run = json.load(open(os.path.join(out, RUN_FILE))) if os.path.exists(os.path.join(out, RUN_FILE)) else {}
    ax.set_title(f"{run.get('objective', '')} {run.get('trainable', '')} {run.get('model_name', '')}".strip())
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, LOSS_PNG)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def concept_vectors(lm, plan: data_lib.DataPlan, out: str) -> vectors_lib.ConceptVectors:
    """The training words' mean-difference vectors (every layer), cached in out/vectors.npz. Only
    training words: held-out words are never read here."""
    c = plan.config
    recipe = {"words": list(plan.train_words), "baseline_words": list(c.baseline_words),
              "template": c.vector_template, "position": c.vector_position, "system_header": c.system_header,
              "model": lm.config.name, "dtype": str(lm.dtype)}
    path = os.path.join(out, VECTORS_FILE)
    if os.path.exists(path):
        try:
            cached = vectors_lib.ConceptVectors.load(path)
            if cached.metadata.get("recipe") == recipe:
                return cached
        except (OSError, ValueError, KeyError):
            pass
    result = vectors_lib.concept_vectors(lm, plan.train_words, c.baseline_words, template=c.vector_template,
                                         system_header=c.system_header, position=c.vector_position)
    result.metadata["recipe"] = recipe
    result.save(path)
    return result


def _check_resumable(out: str, config: TrainConfig, checkpoint: str) -> Optional[dict]:
    path = os.path.join(out, RUN_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        run = json.load(f)
    old = dict(run["config"])
    new = config.to_dict()
    differs = sorted(k for k in set(old) | set(new) if k not in _RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if differs:
        raise TrainError(f"{out} holds a run of another config (fields {differs} differ); choose another --out")
    if os.path.realpath(run["checkpoint"]) != os.path.realpath(checkpoint):
        raise TrainError(f"{out} holds a run on {run['checkpoint']}, not {checkpoint}; choose another --out")
    return run


# --- the loop ---------------------------------------------------------------------------------------

def check_before_load(config: TrainConfig, checkpoint: str, out: str, model_config, tokenizer) -> data_lib.DataPlan:
    """Everything that needs no weights: the data plan (layers, prompt lengths), the adapter spec,
    the out folder against an earlier run."""
    plan = data_lib.plan_data(config, model_config, tokenizer)
    spec = adapter_spec(config, model_config, plan.layers)
    try:
        spec.validate(model_config)
    except adapters_lib.AdapterError as e:
        raise TrainConfigError(str(e)) from e
    _check_resumable(out, config, checkpoint)
    return plan


def train(lm, config: TrainConfig, out: str, *, checkpoint: str, plan: Optional[data_lib.DataPlan] = None,
          progress: bool = True) -> dict:
    """Train (or resume) into `out`; returns the summary also written to run.json."""
    os.makedirs(out, exist_ok=True)
    tokenizer = lm.tokenizer
    if plan is None:
        plan = check_before_load(config, checkpoint, out, lm.config, tokenizer)
    layout, cfg = lm.layout, lm.run_config
    rows = config.batch_size * (2 if config.objective == "dpo" else 1)
    if rows % layout.data_size:
        raise TrainError(f"{rows} rows per micro-batch do not split over the mesh's data axis of {layout.data_size}")
    spec = adapter_spec(config, lm.config, plan.layers)
    if cfg.n_kv_heads != lm.config.n_kv_heads and any(t in ("wk", "wv") for t in spec.targets):
        raise TrainError("the mesh duplicates KV heads (tensor axis > n_kv_heads): training LoRA on wk/wv there is "
                         "not supported; leave them out of lora_targets or use a smaller tensor axis")
    started = time.time()
    run = _check_resumable(out, config, checkpoint) or {}
    run.update(config=config.to_dict(), checkpoint=os.path.realpath(checkpoint) if "://" not in checkpoint
               else checkpoint, model_name=lm.config.name, dtype=str(lm.dtype), objective=config.objective,
               trainable=config.trainable, adapter_spec=spec.to_dict(), mesh=dict(layout.mesh.shape),
               heldout_check="data.check_heldout asserts on every micro-batch that no held-out word is an "
                             "example's concept, a rejected answer's concept, or named in an answer",
               finished=False, **plan.describe())
    assert not set(plan.train_words) & set(plan.heldout_words)
    _write_json(os.path.join(out, RUN_FILE), run)

    concept = concept_vectors(lm, plan, out)
    assert set(concept.names) == set(plan.train_words)
    adapter = adapters_lib.init(spec, lm.config, jax.random.PRNGKey(config.seed))
    adapter = adapters_lib.place(adapter, lm.config, layout)
    label_tree = labels(adapter, config)
    tx = optimizer(config, label_tree)
    # Scalars (step counts) on the mesh too, as the step returns them: one compiled step, not two.
    opt_state = jax.tree.map(lambda x: jax.device_put(x, layout.replicated) if np.ndim(x) == 0 else x,
                             tx.init(adapter))
    manager = _manager(out, config)
    start = 0
    restored = restore_checkpoint(manager, adapter, opt_state)
    if restored is not None:
        start, adapter, opt_state, meta = restored
        if meta.get("micro_index") != start * config.grad_accum:
            raise TrainError(f"checkpoint {start} is at micro-batch {meta.get('micro_index')}, expected "
                             f"{start * config.grad_accum}: grad_accum changed?")
    _truncate_metrics(out, start)
    step_fn = make_train_step(config, cfg, layout, label_tree, tx)
    lr_at = schedule(config)
    pad_id = tokenizer.pad_id
    iterator = range(start, config.steps)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(iterator, initial=start, total=config.steps, desc=f"train {config.objective}", unit="step")
        iterator = bar
    metrics_file = open(os.path.join(out, METRICS_FILE), "a")
    last = {}
    try:
        for step in iterator:
            micro = []
            t0 = time.time()
            for k in range(config.grad_accum):
                index = step * config.grad_accum + k
                batch = data_lib.to_batch(plan, data_lib.examples(plan, tokenizer, index), concept, pad_id,
                                          lm.config.d_model, pairs=config.objective == "dpo")
                adapter, opt_state, m = step_fn(adapter, opt_state, lm.params, place_arrays(batch, layout))
                micro.append(m)
            micro = jax.device_get(micro)
            record = {"step": step + 1, "lr": float(lr_at(step)),
                      "grad_norm": float(micro[-1]["grad_norm"]), "seconds": round(time.time() - t0, 3)}
            for key in micro[0]:
                if key != "grad_norm":
                    record[key] = float(np.mean([m[key] for m in micro]))
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            os.fsync(metrics_file.fileno())
            last = record
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            done = step + 1
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_checkpoint(manager, done, adapter, opt_state,
                                {"step": done, "micro_index": done * config.grad_accum, "seed": config.seed})
            if config.crash_after_step and done == config.crash_after_step:
                metrics_file.close()
                os.kill(os.getpid(), signal.SIGKILL)  # tests: a crash right here
    finally:
        metrics_file.close()
        if bar is not None:
            bar.close()
    manager.close()
    host_adapter = jax.tree.map(lambda x: np.asarray(sharding_lib.to_host(x), np.float32), adapter)
    rows_all = read_metrics(out)
    summary = {"steps": config.steps, "first_loss": rows_all[0]["loss"] if rows_all else None,
               "final_loss": last.get("loss", rows_all[-1]["loss"] if rows_all else None),
               "resumed_from_step": start, "seconds_this_session": round(time.time() - started, 1)}
    adapters_lib.save(os.path.join(out, ADAPTER), host_adapter, spec,
                      metadata={"trained_by": "jax_introspect.experiment.training", "objective": config.objective,
                                "trainable": config.trainable, "base_checkpoint": run["checkpoint"],
                                "model_name": lm.config.name, "train_words": list(plan.train_words),
                                "heldout_words": list(plan.heldout_words), "layers": list(plan.layers),
                                "steps": config.steps, "seed": config.seed})
    run.update(finished=True, summary=summary, adapter=os.path.join(out, ADAPTER),
               adapter_digest=adapters_lib.digest(host_adapter))
    _write_json(os.path.join(out, RUN_FILE), run)
    png = plot_loss(out)
    summary["loss_png"] = png
    return summary
