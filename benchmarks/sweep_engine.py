"""Whole sweeps with the sweep engine against plain batches and an HF-generate-with-hooks loop,
side by side in one run (SmolLM2-135M float32, 2 CPU cores), and what each part of the engine saves.

    python -m benchmarks.sweep_engine [--runs=3] [--grids=quickstart,grid] [--protocols=lindsey,replication] \
        [--ablations=quickstart]

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
- engine: `run_sweep` with engine 'shared' (the default); its ablations (on the `--ablations` grids): no slot refill
  (refill_min = slots: a refill waits for every slot, i.e. batches), no shared prefix, no per-cell
  prefill (every trial its own prefill);
- plain: `run_sweep` with engine 'plain' (one `generate` per batch);
- HF loop: what an HF-hooks user writes: one `generate` per (layer, strength) cell on its trials
  (per-row vectors, `launch/gpu_reference.Injection`), one call for the controls; same prompt ids,
  window start, norm_match, vectors, sampling settings and EOS ids; no grading or files.
Throughput = trials / seconds: "generation" sums the calls' own time (records' timing; the HF
loop's calls), "whole" is run_sweep's wall time (grading and files included). Medians of the runs.
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
PROTOCOLS = {"lindsey": "lindsey_injected_thought", "replication": "replication_405b_injected_thought"}
ENGINE_ARMS = {  # name -> (config engine, generate_shared keyword overrides)
    "engine": ("shared", {}),
    "engine, no refill": ("shared", {"refill_min": None}),  # None here: filled with the slot count
    "engine, no shared prefix": ("shared", {"share_prefix": False}),
    "engine, no per-cell prefill": ("shared", {"share_cells": False}),
    "plain batches": ("plain", {}),
}


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


def run_hf(model, lm, config, plan, concept, device: str = "cpu") -> dict:
    """One HF `generate` per (layer, strength) on its trials, one for the controls (on torch `device`)."""
    import torch

    from launch.gpu_reference import Injection
    info = plan.prompts[config.protocols[0]]
    eos = list(lm.tokenizer.eos_ids)
    kw = dict(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0,
              max_new_tokens=config.max_new_tokens, eos_token_id=eos, pad_token_id=lm.tokenizer.pad_id)
    prompt = torch.tensor([info.ids], dtype=torch.long, device=device)
    cells = {}
    for t in plan.trials:
        cells.setdefault((t.layer, t.strength) if t.word else None, []).append(t)
    calls = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for key, trials in cells.items():
            ids = prompt.repeat(len(trials), 1)
            if key is None:
                model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            else:
                vecs = np.stack([concept.vector(t.word, t.layer) for t in trials])[:, None, :]
                with Injection(model, key[0], vecs, key[1], start=info.start, norm_match=info.norm_match):
                    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            calls += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return dict(wall=time.perf_counter() - t0, calls=calls, trials=len(plan.trials))


def run_grid(lm, model, grid: str, protocol: str, runs: int, ablations: bool = True) -> dict:
    from jax_introspect.experiment import sweep, vectors
    config = grid_config(grid, protocol)
    plan = sweep.plan_sweep(config, lm.config, lm.tokenizer, lm.path, str(lm.dtype))
    scratch = tempfile.mkdtemp(prefix="bench_engine_vectors_")
    vectors_file = os.path.join(scratch, sweep.VECTORS_FILE)
    concept = sweep.extract_vectors(lm, plan, vectors_file, progress=False)
    engine_arms = {n: a for n, a in ENGINE_ARMS.items() if ablations or not n.startswith("engine, ")}
    arms = {name: [] for name in list(engine_arms) + ["HF loop"]}
    load_before = common.load_average()[0]
    for r in range(runs + 1):  # run 0 compiles every program: not counted
        for name, (engine, overrides) in engine_arms.items():
            result = run_arm(_model_for(lm, overrides, config.batch_size), config.replace(engine=engine), vectors_file)
            if r:
                arms[name].append(result)
        if r:
            arms["HF loop"].append(run_hf(model, lm, config, plan, concept))
        common.log(f"{grid}/{protocol} run {r}: " + ", ".join(
            f"{n} {a[-1]['wall']:.1f}s" for n, a in arms.items() if a) + f"; load {common.load_text()}")
    shutil.rmtree(scratch, ignore_errors=True)
    reference = arms["plain batches"][0]["texts"]
    same = {name: all(a["texts"] == reference for a in results) for name, results in arms.items() if name != "HF loop"}
    return dict(grid=grid, protocol=protocol, config=config, arms=arms, same_texts=same, trials=len(plan.trials),
                prompt_tokens=len(plan.prompts[config.protocols[0]].ids),
                window_start=plan.prompts[config.protocols[0]].start,
                load=(load_before, common.load_average()[0]))


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
    n = np.asarray([len(tok.encode(r["response"])) for r in data["results"]])
    cap = data["max_new_tokens"]
    return (f"{len(n)} responses (max_new_tokens {cap}), text tokens: median {np.median(n):.0f}, p10 "
            f"{np.percentile(n, 10):.0f}, p90 {np.percentile(n, 90):.0f}; {np.mean(n < 0.95 * cap):.0%} ended "
            f"early (under {0.95 * cap:.0f} tokens), mean {n.mean():.0f} tokens = {n.mean() / cap:.0%} of the cap")


def markdown(results: list, replication_note: str) -> str:
    med = common.median
    lines = ["### Sweep engine: whole sweeps, engine vs plain batches vs HF generate + hooks", "",
             "Trials/s (median of the runs; in brackets the range); generation = the calls' own seconds, "
             "whole = run_sweep's wall time with grading and files (the HF loop has neither). Ratio = the arm's "
             "trials/s over the HF loop's, generation only.", ""]
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
            gen = [res["trials"] / a.get("generation", a["wall"]) for a in rs]
            whole = [res["trials"] / a["wall"] for a in rs]
            rows.append([name, f"{med(gen):.2f} ({min(gen):.2f}-{max(gen):.2f})",
                         "-" if name == "HF loop" else f"{med(whole):.2f}",
                         f"{(res['trials'] / med([a.get('generation', a['wall']) for a in rs])) / (res['trials'] / hf):.2f}x",
                         "-" if name == "HF loop" else ("yes" if res["same_texts"][name] else "**no**")])
        lines += [common.table(["arm", "trials/s, generation", "trials/s, whole", "vs HF loop", "texts = plain's"],
                               rows, "lrrrl"), ""]
    if replication_note:
        lines += [f"Answer lengths of the public 405B replication's responses: {replication_note}.", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--grids", default=",".join(GRIDS))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--ablations", default="quickstart", help="grids whose sweeps also run the ablations")
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    common.quiet_libraries()
    common.set_torch_threads()
    import jax_introspect
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint(args.checkpoint or common.SMOLLM2_CHECKPOINT))
    model, _ = common.load_hf_smollm2()
    results = [run_grid(lm, model, grid, protocol, args.runs, ablations=grid in args.ablations.split(","))
               for grid in args.grids.split(",") for protocol in args.protocols.split(",")]
    note = replication_lengths(os.path.join(common.REPO, "..", "shared", "data",
                                            "replication_405b_layer84_canonical.judged.json"))
    print(markdown(results, note))


if __name__ == "__main__":
    main()
