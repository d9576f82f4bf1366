"""Whole sweeps with the sweep engine against plain batches, an HF-generate-with-hooks loop and the
same loop in nnsight, side by side in one run (SmolLM2-135M float32, 2 CPU cores), and what each
part of the engine saves.

    python -m benchmarks.sweep_engine [--runs=3] [--grids=quickstart,grid] [--protocols=lindsey,replication] \
        [--ablations=quickstart] [--ablation_arms="no depth sharing"] [--prefill_blocks=8,16] \
        [--no_nnsight]

Grids (the trials of `sweep.plan_trials`, temperature 1, top_p 1, the heuristic grader):
- quickstart: configs/sweeps/quickstart.py (6 words, 2 layers, 3 strengths, 6 trials per cell,
  12 controls = 120 trials, 48 new tokens, batch 24);
- grid: 4 layers x 4 strengths x 8 words (one trial each) + 32 controls = 160 trials, 32 new
  tokens, batch 32 (benchmarks/sweep_grid.py's).
Protocols: Lindsey's (`lindsey_injected_thought`: raw injection from the token before "Trial 1")
and the replication's (`replication_405b_injected_thought`: norm-matched to the MLP output,
injected at every position: nothing before the injection to share, so its saving is per cell).

Arms, interleaved run by run (run r does every arm once), each timed on a fresh results folder
holding the sweep's vectors (extracted once beforehand, so no arm pays for extraction):
- engine: `run_sweep` with engine 'shared' (the default); its ablations (on the `--ablations` grids;
  `--ablation_arms`: which): no slot refill (refill_min = slots: a refill waits for every slot, i.e.
  batches), no shared prefix, no per-cell prefill (every trial its own prefill), no depth sharing
  (the sweep config's `share_depth`, on by default since 2026-12-01: layers below each cell's
  injection layer from the prompt's clean cell); with `--prefill_blocks`, the engine with its cells prefilled
  that many at a time (the sweep config's `prefill_block`; the engine arm: its default);
- plain: `run_sweep` with engine 'plain' (one `generate` per batch);
- HF loop: what an HF-hooks user writes: one `generate` per (layer, strength) cell on its trials
  (per-row vectors, `launch/gpu_reference.Injection`), one call for the controls; same prompt ids,
  window start, norm_match, vectors, sampling settings and EOS ids; no grading or files.
- nnsight loop: the same calls written for nnsight (`nnsight.TransformersModel` around a copy of the
  same HF model): one `with model.generate(...)` per cell whose intervention (`nnsight_inject`)
  edits the decoder layer's output at every step (`tracer.all()`), as the hooks do; tests/
  test_nnsight_arm.py checks it against `launch/gpu_reference.Injection`.
- 1 new token (engine and HF loop): the same sweep with max_new_tokens 1, so that each arm splits
  into decode and the rest, and the engine's ceiling (HF loop / engine decode) is measured.
Throughput = trials / seconds: "generation" sums the calls' own time (records' timing; the HF and
nnsight loops' calls), "whole" is run_sweep's wall time (grading and files included). Medians of the runs.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import shutil
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from benchmarks import common

GRIDS = ("quickstart", "grid")
LOOPS = ("HF loop", "nnsight loop")  # arms outside run_sweep: no grading, files or texts to compare
# The same sweep with one new token per trial (prefill, first token, readout, grading, files): with
# the full arm's time it splits each arm into decode and the rest (`decode_split`).
ONE_TOKEN = {"engine": "engine, 1 new token", "HF loop": "HF loop, 1 new token"}
NOT_COMPARED = set(LOOPS) | set(ONE_TOKEN.values())  # arms whose texts are not compared with plain's
PROTOCOLS = {"lindsey": "lindsey_injected_thought", "replication": "replication_405b_injected_thought"}
ENGINE_ARMS = {  # name -> (sweep config overrides, generate_shared keyword overrides)
    "engine": ({}, {}),
    "engine, no refill": ({}, {"refill_min": None}),  # None here: filled with the slot count
    "engine, no shared prefix": ({}, {"share_prefix": False}),
    "engine, no per-cell prefill": ({}, {"share_cells": False}),
    "engine, no depth sharing": ({"share_depth": False}, {}),
    "plain batches": ({"engine": "plain"}, {}),
}


def block_arm(block: int) -> str:
    """The engine arm with cells prefilled `block` at a time (`--prefill_blocks`)."""
    return f"engine, prefill block {block}"


def grid_config(grid: str, protocol: str):
    from configs.sweeps import quickstart
    from jax_introspect.experiment.sweep_config import SweepConfig
    if grid == "quickstart":
        config = quickstart.get_config()
    else:
        config = SweepConfig(words=SweepConfig().words[:8], layers=(0.3, 0.45, 0.6, 0.75),
                             strengths=(1.0, 2.0, 4.0, 8.0), trials_per_cell=1, cell_per_word=True,
                             control_trials=32, max_new_tokens=32, batch_size=32)
    return config.replace(protocols=(PROTOCOLS[protocol],), temperature=1.0, top_p=1.0, grader="heuristic")


def _model_for(lm, overrides: dict, slots: int):
    """`lm` whose generate_shared runs with `overrides` (the ablations); the same weights."""
    if not overrides:
        return lm
    overrides = {k: (slots if k == "refill_min" and v is None else v) for k, v in overrides.items()}
    model = copy.copy(lm)
    model.generate_shared = functools.partial(lm.generate_shared, **overrides)
    return model


def run_arm(lm, config, vectors_file: str) -> dict:
    from jax_introspect.experiment import results, sweep
    out = tempfile.mkdtemp(prefix="bench_engine_")
    try:
        shutil.copy(vectors_file, os.path.join(out, sweep.VECTORS_FILE))
        t = time.perf_counter()
        summary = sweep.run_sweep(lm, config, out, progress=False)
        wall = time.perf_counter() - t
        records = list(results.read_records(summary["results"]))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    calls = {r.timing["unix_time"]: r.timing["batch_seconds"] for r in records}
    return dict(wall=wall, generation=sum(calls.values()), trials=len(records),
                texts={r.trial_id: r.response for r in records}, n_tokens=[r.n_tokens for r in records],
                finished=[r.finished for r in records])


def _generate_kwargs(lm, config) -> dict:
    """HF `generate` keywords of the sweep's sampling (the HF and nnsight loops)."""
    return dict(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0,
                max_new_tokens=config.max_new_tokens, eos_token_id=list(lm.tokenizer.eos_ids),
                pad_token_id=lm.tokenizer.pad_id)


def _run_cells(generate_cell, config, plan, concept, device: str = "cpu") -> dict:
    """One `generate_cell(ids, injection)` per (layer, strength) on its trials (injection: the
    keywords of `launch/gpu_reference.Injection` after the model: layer, vector [B, 1, D], strength,
    start, norm_match), one for the controls (injection None); timed."""
    import torch
    info = plan.prompts[config.protocols[0]]
    prompt = torch.tensor([info.ids], dtype=torch.long, device=device)
    cells = {}
    for t in plan.trials:
        cells.setdefault((t.layer, t.strength) if t.word else None, []).append(t)
    calls = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for key, trials in cells.items():
            injection = None if key is None else dict(
                layer=key[0], vector=np.stack([concept.vector(t.word, t.layer) for t in trials])[:, None, :],
                strength=key[1], start=info.start, norm_match=info.norm_match)
            generate_cell(prompt.repeat(len(trials), 1), injection)
            calls += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return dict(wall=time.perf_counter() - t0, calls=calls, trials=len(plan.trials))


def run_hf(model, lm, config, plan, concept, device: str = "cpu") -> dict:
    """One HF `generate` per (layer, strength) on its trials, one for the controls (on torch `device`)."""
    import contextlib

    import torch

    from launch.gpu_reference import Injection
    kw = _generate_kwargs(lm, config)

    def generate_cell(ids, injection):
        with (contextlib.nullcontext() if injection is None else Injection(model, **injection)):
            model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    return _run_cells(generate_cell, config, plan, concept, device)


def wrap_nnsight(model, tokenizer):
    """nnsight's model (`TransformersModel`, 0.8.1's name for `LanguageModel`, which it deprecates)
    around a copy of the HF model: wrapping installs nnsight's controller as every module's
    `forward` for good (inert outside a trace, but a Python layer per module call), so the HF loop
    keeps the unwrapped original. The weights are the same values."""
    import nnsight
    return nnsight.TransformersModel(copy.deepcopy(model), tokenizer=tokenizer, task="text-generation")


def nnsight_inject(nn_model, tracer, layer: int, vector, strength: float, start: int, norm_match) -> None:
    """`launch/gpu_reference.Injection` written as nnsight interventions, inside an invoke of
    `with nn_model.generate(...) as tracer`: at every forward of the generation (`tracer.all()`:
    the prompt, then one per new token) decoder layer `layer`'s output gets, at the positions
    >= `start` (read from the layer's position_ids: the prompt step's tail, every new token),
    strength * vector ("raw"), or the vector scaled to the norm of the layer's MLP output
    ("mlp_out") or of the layer output itself ("residual") per position: vector * |target| /
    (|vector| + 1e-6) * strength. `vector` is [D] or one per row, [B, 1, D]. The loop is open, so
    it ends only when the generation does: nothing after this call in the same invoke runs."""
    import torch

    from launch.gpu_reference import NORM_EPS, norm_mode_name
    mode = norm_mode_name(norm_match)
    vector = torch.as_tensor(np.asarray(vector, np.float32))
    block = nn_model.model.layers[layer]
    for _ in tracer.all():
        positions = block.inputs[1]["position_ids"]  # read in the order the model runs: inputs, MLP, output
        target = block.mlp.output if mode == "mlp_out" else None
        hidden = block.output
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"decoder layer {layer} returned {type(hidden).__name__}, not the hidden states "
                            "tensor (transformers >= 5): nnsight_inject does not support this version")
        vector = vector.to(hidden.device)
        if mode == "raw":
            delta = strength * vector
        else:
            norm = (hidden if mode == "residual" else target).float().norm(dim=-1, keepdim=True)
            delta = vector * (norm / (vector.norm(dim=-1, keepdim=True) + NORM_EPS)) * strength
        inside = (positions >= start)[..., None]
        block.output = hidden + torch.where(inside, delta, 0.0).to(hidden.dtype)


def nnsight_generate(nn_model, ids, injection: Optional[dict] = None, **kw):
    """One nnsight `generate` on the prompt rows `ids` ([B, T]), with `nnsight_inject(**injection)`
    at every step (None: no intervention); `kw` go to HF's generate. Returns its output
    (`tracer.result`: token ids, or the GenerateOutput with return_dict_in_generate)."""
    import warnings

    import torch
    with warnings.catch_warnings():
        # An open tracer.all() loop ends at a step the generation never makes; nnsight warns, by design.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with nn_model.generate(**kw) as tracer:
            with tracer.invoke(ids, attention_mask=torch.ones_like(ids)):
                if injection is not None:
                    nnsight_inject(nn_model, tracer, **injection)
            with tracer.invoke():  # after the open loop, so in an invoke of its own
                result = tracer.result.save()
    return result


def warm_nnsight(nn_model) -> None:
    """One short injected nnsight generation, so the first timed call pays no first-trace costs."""
    import torch
    nnsight_generate(nn_model, torch.ones(1, 4, dtype=torch.long), dict(
        layer=0, vector=np.ones(nn_model.config.hidden_size, np.float32), strength=1.0, start=0,
        norm_match="mlp_out"), max_new_tokens=2, do_sample=False)


def run_nnsight(nn_model, lm, config, plan, concept) -> dict:
    """The HF loop's calls through nnsight (`wrap_nnsight`'s model): one `generate` per cell with
    the injection as nnsight interventions (`nnsight_inject`), one for the controls."""
    kw = _generate_kwargs(lm, config)
    return _run_cells(lambda ids, injection: nnsight_generate(nn_model, ids, injection, **kw),
                      config, plan, concept)


def run_grid(lm, model, nn_model, grid: str, protocol: str, runs: int, ablations: Sequence[str] = (),
             prefill_blocks: Sequence[int] = ()) -> dict:
    from jax_introspect.experiment import sweep
    config = grid_config(grid, protocol)
    plan = sweep.plan_sweep(config, lm.config, lm.tokenizer, lm.path, str(lm.dtype))
    scratch = tempfile.mkdtemp(prefix="bench_engine_vectors_")
    vectors_file = os.path.join(scratch, sweep.VECTORS_FILE)
    concept = sweep.extract_vectors(lm, plan, vectors_file, progress=False)
    engine_arms = {n: a for n, a in ENGINE_ARMS.items() if n in ablations or not n.startswith("engine, ")}
    engine_arms.update({block_arm(b): ({"prefill_block": b}, {}) for b in prefill_blocks})
    loops = ["HF loop"] + (["nnsight loop"] if nn_model is not None else [])
    arms = {name: [] for name in list(engine_arms) + loops + list(ONE_TOKEN.values())}
    one_token = config.replace(max_new_tokens=1)
    load_before = common.load_average()[0]
    for r in range(runs + 1):  # run 0 compiles every program: not counted
        for name, (config_overrides, overrides) in engine_arms.items():
            result = run_arm(_model_for(lm, overrides, config.batch_size), config.replace(**config_overrides),
                             vectors_file)
            if r:
                arms[name].append(result)
        short = run_arm(lm, one_token, vectors_file)  # run 0 compiles its programs too
        if r:
            arms[ONE_TOKEN["engine"]].append(short)
            arms["HF loop"].append(run_hf(model, lm, config, plan, concept))
            if nn_model is not None:
                arms["nnsight loop"].append(run_nnsight(nn_model, lm, config, plan, concept))
            arms[ONE_TOKEN["HF loop"]].append(run_hf(model, lm, one_token, plan, concept))
        common.log(f"{grid}/{protocol} run {r}: " + ", ".join(
            f"{n} {a[-1]['wall']:.1f}s" for n, a in arms.items() if a) + f"; load {common.load_text()}")
    shutil.rmtree(scratch, ignore_errors=True)
    reference = arms["plain batches"][0]["texts"]
    same = {name: all(a["texts"] == reference for a in results) for name, results in arms.items()
            if name not in NOT_COMPARED}
    return dict(grid=grid, protocol=protocol, config=config, arms=arms, same_texts=same, trials=len(plan.trials),
                prompt_tokens=len(plan.prompts[config.protocols[0]].ids),
                window_start=plan.prompts[config.protocols[0]].start,
                load=(load_before, common.load_average()[0]))


def decode_split(arms: dict) -> dict:
    """Median seconds of decode (the full arm less its 1-new-token twin: every step after the first
    token) and of the rest, for the engine (whole run_sweep) and the HF loop (its generate calls);
    `ceiling`: the HF loop's seconds over the engine's decode alone, the ratio the engine would reach
    if prefill, readout, grading and files took no time; `step_ratio`: HF decode / engine decode (the
    same new tokens; the HF loop's also decode rows that already ended)."""
    med = common.median
    split = {}
    for name, short in ONE_TOKEN.items():
        total, rest = med([a["wall"] for a in arms[name]]), med([a["wall"] for a in arms[short]])
        split[name] = dict(total=total, rest=rest, decode=total - rest)
    engine, hf = split["engine"], split["HF loop"]
    return dict(split, ceiling=hf["total"] / engine["decode"], step_ratio=hf["decode"] / engine["decode"])


def length_distribution(n_tokens: Sequence[int], max_new: int) -> str:
    n = np.asarray(n_tokens)
    return (f"median {np.median(n):.0f}, p90 {np.percentile(n, 90):.0f}, max {n.max()} of {max_new}; "
            f"{np.mean(n < max_new):.0%} end before max_new_tokens")


def replication_lengths(path: str) -> str:
    """Answer lengths of the public 405B run's responses: their texts re-tokenized with Meta's
    Llama-3 tokenizer (the file keeps no token counts; re-tokenizing can differ from the sampled
    tokens by a few, so "ended early" counts answers under 95% of max_new_tokens)."""
    import json

    from jax_introspect import tokenizer
    data = json.load(open(path))
    tok = tokenizer.from_tiktoken_model(tokenizer.llama3_tokenizer_model_path())
    ids = [tok.encode(r["response"]) for r in data["results"]]
    n = np.asarray([len(i) for i in ids])
    cap = data["max_new_tokens"]
    cells = {}
    for r, i in zip(data["results"], ids):
        cells.setdefault((r["label"], r["magnitude"]), []).append(i)
    steps, distinct = shared_decode_steps(cells.values(), cap)
    return (f"{len(n)} responses (max_new_tokens {cap}), text tokens: median {np.median(n):.0f}, p10 "
            f"{np.percentile(n, 10):.0f}, p90 {np.percentile(n, 90):.0f}; {np.mean(n < 0.95 * cap):.0%} ended "
            f"early (under {0.95 * cap:.0f} tokens), mean {n.mean():.0f} tokens = {n.mean() / cap:.0%} of the cap. "
            f"Decoding a cell's trials together while their sampled tokens agree (a token trie per "
            f"(prompt, concept, magnitude) cell) would take {distinct} steps instead of {steps} "
            f"({steps / distinct:.2f}x fewer)")


def shared_decode_steps(cells, cap: int) -> tuple[int, int]:
    """(decode steps of every trial on its own, distinct steps when a cell's trials share each step
    while their tokens so far agree): each trial's tokens, plus the EOS step if it ended before
    `cap`; a cell's trials read the same prompt and injection, so equal tokens mean equal states."""
    steps, distinct = 0, 0
    for trials in cells:
        prefixes = set()
        for tokens in trials:
            sampled = list(tokens) + ([None] if len(tokens) < cap else [])  # None: the EOS step
            steps += len(sampled)
            prefixes.update(tuple(sampled[:k]) for k in range(1, len(sampled) + 1))
        distinct += len(prefixes)
    return steps, distinct


def markdown(results: list, replication_note: str, nnsight_version: str) -> str:
    med = common.median
    lines = ["### Sweep engine: whole sweeps, engine vs plain batches vs HF generate + hooks vs nnsight", "",
             "Trials/s (median of the runs; in brackets the range); generation = the calls' own seconds, "
             "whole = run_sweep's wall time with grading and files (the HF and nnsight loops have neither). Ratio = "
             f"the arm's trials/s over the HF loop's, generation only. nnsight {nnsight_version}.", ""]
    for res in results:
        cfg, arms = res["config"], res["arms"]
        hf = med([a["wall"] for a in arms["HF loop"]])
        lines += [f"**{res['grid']}, {cfg.protocols[0]}**: {res['trials']} trials, prompt {res['prompt_tokens']} "
                  f"tokens (window start {res['window_start']}), {cfg.max_new_tokens} new tokens, batch "
                  f"{cfg.batch_size}, {len(arms['HF loop'])} runs; load before/after {res['load'][0]:.2f} / "
                  f"{res['load'][1]:.2f}. Answer lengths (engine run): "
                  f"{length_distribution(arms['engine'][0]['n_tokens'], cfg.max_new_tokens)}.", ""]
        rows = []
        for name, rs in arms.items():
            if name in ONE_TOKEN.values():
                continue
            gen = [res["trials"] / a.get("generation", a["wall"]) for a in rs]
            whole = [res["trials"] / a["wall"] for a in rs]
            rows.append([name, f"{med(gen):.2f} ({min(gen):.2f}-{max(gen):.2f})",
                         "-" if name in LOOPS else f"{med(whole):.2f}",
                         f"{(res['trials'] / med([a.get('generation', a['wall']) for a in rs])) / (res['trials'] / hf):.2f}x",
                         "-" if name in LOOPS else ("yes" if res["same_texts"][name] else "**no**")])
        lines += [common.table(["arm", "trials/s, generation", "trials/s, whole", "vs HF loop", "texts = plain's"],
                               rows, "lrrrl"), ""]
        split = decode_split(arms)
        e, h = split["engine"], split["HF loop"]
        lines += [f"Decode vs the rest (medians; the same sweep with 1 new token per trial gives the rest): engine "
                  f"{e['decode']:.1f} s decode + {e['rest']:.1f} s rest (prefill, first token, readout, grading, "
                  f"files) = {e['total']:.1f} s; HF loop {h['decode']:.1f} s decode + {h['rest']:.1f} s prefill and "
                  f"first token = {h['total']:.1f} s. HF decode / engine decode = {split['step_ratio']:.2f}x; "
                  f"**ceiling** with everything but decode free: HF loop / engine decode = {split['ceiling']:.2f}x.", ""]
    if replication_note:
        lines += [f"Answer lengths of the public 405B replication's responses: {replication_note}.", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--grids", default=",".join(GRIDS))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--ablations", default="quickstart", help="grids whose sweeps also run the ablations")
    parser.add_argument("--ablation_arms", default="",
                        help="comma-separated ablations to run on the --ablations grids, named without 'engine, ' "
                             "(e.g. 'depth sharing,no refill'; default: every one)")
    parser.add_argument("--prefill_blocks", default="",
                        help="comma-separated cell-prefill blocks (divisors of the grids' batch), extra engine arms")
    parser.add_argument("--no_nnsight", action="store_true",
                        help="leave out the nnsight loop (on the 4x4x8 grid it ran within 3%% of the HF loop)")
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    # Checked before any model loads. The arms' names hold a comma ("engine, no refill"), so the
    # option names them without their "engine, " (a comma-separated list of full names cannot parse).
    ablation_names = {n[len("engine, "):]: n for n in ENGINE_ARMS if n.startswith("engine, ")}
    chosen = [name.strip() for name in args.ablation_arms.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in ablation_names]
    if unknown:
        parser.error(f"--ablation_arms: no ablation {unknown}; choose from {sorted(ablation_names)}")
    ablations = [ablation_names[name] for name in chosen] or list(ablation_names.values())
    common.quiet_libraries()
    common.set_torch_threads()
    import jax_introspect
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint(args.checkpoint or common.SMOLLM2_CHECKPOINT))
    import nnsight
    model, hf_tokenizer = common.load_hf_smollm2()
    nn_model = None
    if not args.no_nnsight:
        nn_model = wrap_nnsight(model, hf_tokenizer)
        warm_nnsight(nn_model)
    blocks = [int(b) for b in args.prefill_blocks.split(",") if b]
    results = [run_grid(lm, model, nn_model, grid, protocol, args.runs,
                        ablations=ablations if grid in args.ablations.split(",") else (), prefill_blocks=blocks)
               for grid in args.grids.split(",") for protocol in args.protocols.split(",")]
    note = replication_lengths(os.path.join(common.REPO, "..", "shared", "data",
                                            "replication_405b_layer84_canonical.judged.json"))
    print(markdown(results, note, "not run" if args.no_nnsight else nnsight.__version__))


if __name__ == "__main__":
    main()
