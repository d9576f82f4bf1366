"""A whole sweep grid on SmolLM2-135M float32: compilations and wall time, jax_introspect's
`run_sweep` against a loop of HF `generate` calls with forward-hook injection doing the same trials.
`run_sweep` runs plain batches (`engine='plain'`) here; benchmarks/sweep_engine.py measures the
sweep engine, the default, against both.

    python -m benchmarks.sweep_grid [--new_tokens=32] [--batch=32] [--runs=2]

The grid: Lindsey's injected-thought prompt, 4 layers x 4 strengths x 8 words (one trial each,
`cell_per_word`) + 32 controls = 160 trials, temperature 1, top_p 1, the heuristic grader.

- jax_introspect: `sweep.run_sweep` in a fresh results folder: vector extraction (8 words and
  the 100 baseline words), 5 batches of 32 mixed trials (rows differ in layer, strength and
  vector), grading and the results file. XLA compilations are counted with jax.monitoring's
  backend-compile event for the whole call.
- HF loop: what an HF-hooks user writes: for each (layer, strength) cell one `generate` call on
  its 8 words (one row per word, per-row vectors in `Injection` from launch/gpu_reference.py),
  then one call for the 32 controls without hooks: 17 calls. Same prompt ids, injection start,
  vectors (those run_sweep extracted), sampling settings and EOS ids; no grading or files.

Rows stop at EOS in both, so the sampled texts decide the lengths: the tables give the new
tokens each side produced and the calls' wall time. The two run interleaved (ours, HF, ours, ...).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from benchmarks import common

WORDS = 8
LAYERS = (0.3, 0.45, 0.6, 0.75)
STRENGTHS = (1.0, 2.0, 4.0, 8.0)
CONTROLS = 32


def grid_config(new_tokens: int, batch: int):
    from jax_introspect.experiment.sweep_config import SweepConfig
    return SweepConfig(protocols=("lindsey_injected_thought",), words=SweepConfig().words[:WORDS], layers=LAYERS,
                       strengths=STRENGTHS, trials_per_cell=1, cell_per_word=True, control_trials=CONTROLS,
                       max_new_tokens=new_tokens, batch_size=batch, temperature=1.0, top_p=1.0, grader="heuristic",
                       engine="plain")  # plain batches: what this table has measured since before the engine


def run_ours(lm, config) -> dict:
    from jax_introspect.experiment import results, sweep
    out = tempfile.mkdtemp(prefix="bench_sweep_")
    try:
        with common.CompileCounter() as compiles:
            t = time.perf_counter()
            summary = sweep.run_sweep(lm, config, out, progress=False)
            wall = time.perf_counter() - t
        records = list(results.read_records(summary["results"]))
        batches = {}
        for r in records:
            batches[r.timing["unix_time"]] = r.timing["batch_seconds"]
        from jax_introspect.experiment import vectors
        concept = vectors.ConceptVectors.load(os.path.join(out, "vectors.npz"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    gen_name = "_generate"  # the jitted function behind generate.generate_tokens
    return dict(wall=wall, trials=len(records), generation_s=sum(batches.values()), batches=len(batches),
                batch_seconds=sorted(batches.items()), new_tokens=sum(r.n_tokens for r in records),
                compiles=compiles.count(), compile_s=compiles.seconds(),
                generate_compiles=compiles.count(gen_name), generate_compile_s=compiles.seconds(gen_name),
                compiles_by_name=compiles.by_name(), layers=summary["layers"], concept=concept)


def run_hf(model, lm, config, layers: Sequence[int], concept) -> dict:
    import torch

    from jax_introspect.experiment import sweep
    from launch.gpu_reference import Injection
    info = sweep.prompt_info(lm.tokenizer, config.protocols[0], config.system_header)
    assert not info.norm_match  # Injection's per-row vectors below are for raw injection
    eos = list(lm.tokenizer.eos_ids)
    kw = dict(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0,
              max_new_tokens=config.max_new_tokens, eos_token_id=eos, pad_token_id=lm.tokenizer.pad_id)
    words = list(config.words)
    prompt = torch.tensor([info.ids], dtype=torch.long)
    new_tokens, calls = 0, 0

    def count(out):
        new = out[:, prompt.shape[1]:]
        lengths = []
        for row in new.tolist():
            n = len(row)
            for i, tok in enumerate(row):
                if tok in eos:
                    n = i + 1
                    break
            lengths.append(n)
        return sum(lengths)

    t = time.perf_counter()
    with torch.no_grad():
        for layer in layers:
            for strength in config.strengths:
                vecs = np.stack([concept.vector(w, layer) for w in words])[:, None, :]  # [B, 1, D]
                ids = prompt.repeat(len(words), 1)
                with Injection(model, layer, vecs, strength, start=info.start):
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
                new_tokens += count(out)
                calls += 1
        ids = prompt.repeat(config.control_trials, 1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        new_tokens += count(out)
        calls += 1
    return dict(wall=time.perf_counter() - t, calls=calls, new_tokens=new_tokens)


def run(new_tokens: int = 32, batch: int = 32, runs: int = 2, checkpoint: Optional[str] = None) -> dict:
    common.quiet_libraries()
    threads = common.set_torch_threads()
    import jax_introspect
    from jax_introspect import generate as generate_lib
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint(checkpoint or common.SMOLLM2_CHECKPOINT))
    model, _ = common.load_hf_smollm2()
    config = grid_config(new_tokens, batch)
    ours, hf = [], []
    load_before = common.load_average()[0]
    for r in range(runs):
        if r == 0:  # the first run compiles; jit caches would hide that in later runs
            cache_before = generate_lib.generate_tokens._cache_size()
        ours.append(run_ours(lm, config))
        if r == 0:
            ours[0]["generate_cache_entries"] = generate_lib.generate_tokens._cache_size() - cache_before
        common.log(f"run {r}: ours {ours[-1]['wall']:.1f} s ({ours[-1]['compiles']} compiles), load {common.load_text()}")
        hf.append(run_hf(model, lm, config, ours[-1]["layers"], ours[-1]["concept"]))
        common.log(f"run {r}: HF loop {hf[-1]['wall']:.1f} s, load {common.load_text()}")
    return dict(ours=ours, hf=hf, config=config, threads=threads, load=(load_before, common.load_average()[0]))


def markdown(result: dict) -> str:
    ours, hf, config = result["ours"], result["hf"], result["config"]
    first, later = ours[0], ours[1:] or ours
    n_trials = first["trials"]
    med = lambda rows, key: common.median([r[key] for r in rows])
    lines = [f"### 2. A sweep grid: {len(LAYERS)} layers x {len(STRENGTHS)} strengths x {WORDS} words + "
             f"{CONTROLS} controls = {n_trials} trials (SmolLM2-135M float32)", "",
             f"Up to {config.max_new_tokens} new tokens (EOS stops a row), temperature 1, top_p 1, batch "
             f"{config.batch_size}; HF loop = one `generate` per (layer, strength) cell on its {WORDS} words with "
             f"`gpu_reference.Injection` hooks + one call for the controls ({hf[0]['calls']} calls). Load before/after: "
             f"{result['load'][0]:.2f} / {result['load'][1]:.2f}.", ""]
    rows = [["XLA compilations, whole `run_sweep` (first run, cold)", first["compiles"], ""],
            ["... of them the generation program", first["generate_compiles"],
             f"{first['generate_compile_s']:.1f} s; batch shapes: 1 (all {first['batches']} batches are "
             f"[{config.batch_size}, prompt bucket])"],
            ["... the rest (vector extraction prefills, small host-side ops)",
             first["compiles"] - first["generate_compiles"], f"{first['compile_s'] - first['generate_compile_s']:.1f} s"],
            ["compilations in later runs (warm caches)", ", ".join(str(r["compiles"]) for r in ours[1:]) or "-", ""],
            ["target: one generation compile per batch shape",
             "met" if first["generate_compiles"] == 1 else "**not met**", ""]]
    lines.append(common.table(["", "count", "notes"], rows, "lrl"))
    lines.append("")
    rows = []
    groups = [("first run (compiles)", [first])] + ([(f"warm runs (median of {len(later)})", later)] if ours[1:] else [])
    for label, rs in groups:
        rows.append([f"jax_introspect `run_sweep`, {label}", f"{med(rs, 'wall'):.1f}", f"{med(rs, 'generation_s'):.1f}",
                     f"{med(rs, 'new_tokens'):.0f}", f"{med(rs, 'new_tokens') / med(rs, 'generation_s'):.0f}"])
    rows.append([f"HF generate + hooks loop (median of {len(hf)})", f"{med(hf, 'wall'):.1f}", f"{med(hf, 'wall'):.1f}",
                 f"{med(hf, 'new_tokens'):.0f}", f"{med(hf, 'new_tokens') / med(hf, 'wall'):.0f}"])
    lines.append(common.table(["", "wall s (all)", "generation s", "new tokens", "new tokens/s in generation"], rows))
    speed = med(hf, "wall") / med(later, "wall")
    per_token = (med(later, "new_tokens") / med(later, "generation_s")) / (med(hf, "new_tokens") / med(hf, "wall"))
    lines += ["", f"HF loop's generation time / {'warm' if ours[1:] else 'cold'} `run_sweep`'s whole time (vector extraction, grading and files "
              f"included): **{speed:.2f}x**; new tokens/s in generation, jax_introspect / HF: **{per_token:.2f}x** "
              "(above 1: jax_introspect is faster)."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    print(markdown(run(args.new_tokens, args.batch, args.runs, args.checkpoint)))


if __name__ == "__main__":
    main()
