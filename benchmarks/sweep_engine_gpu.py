"""The sweep engine on one GPU: jax[cuda] (engine and plain batches) against an HF-generate-with-hooks
loop (torch) on the same GPU, at Llama-3.1-8B's shapes, in one prepared run.

    python -m benchmarks.sweep_engine_gpu --out=DIR [--shape=llama3.1-8b] [--runs=2] \
        [--cases=quickstart/lindsey,grid/lindsey,quickstart/replication] [--tokenizer_model=PATH]

No checkpoint travels to the GPU machine (its working tree is limited to 64 MiB), so both models are
random draws at the real shapes, in bfloat16: the JAX parameters drawn with jax.random, HF's with
torch's default init. The weights differ, so texts are not compared across frameworks; the work is
the same: every arm runs the grid's prompts (Meta's Llama-3 tokenizer and chat template), the same
injection windows, norm matching, vectors (extracted by the JAX model), sampling settings, EOS ids and
max_new_tokens. With random weights an EOS is drawn about once in 10^4 steps, so (as for the real
model's answers on the CPU, benchmarks/results.md) every answer runs to max_new_tokens and slot
refill saves nothing here: the figures measure the shared prefix, per-cell prefill and the compiled
program against HF's per-step Python. Within JAX, the engine's texts are compared with plain
generation's trial by trial (bfloat16: a different slot layout may round differently; counted).

Grids and arms as in benchmarks/sweep_engine.py (which has the CPU figures): medians of `--runs`
after one compiling run; every case's result is written to OUT/sweep_engine_gpu.json as soon as it
is done, the markdown to OUT/sweep_engine_gpu.md at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

from benchmarks import common
from benchmarks import sweep_engine

# Llama-3.1-8B's config.json (the fields our config reads); vocab = Meta's tokenizer's 128256 ids.
SHAPES = {
    "llama3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16"),
    # The same family at test size, to check the script on a CPU before a GPU run.
    "tiny": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=False,
        hidden_act="silu", attention_bias=False, mlp_bias=False, rope_scaling=None,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16"),
}


def random_params(cfg, layout, seed: int = 0, dtype: str = "bfloat16"):
    """Every leaf drawn on the devices, in `dtype`: weights N(0, 0.02) (HF's initializer_range),
    norm scales 1 (HF's init)."""
    import jax
    import jax.numpy as jnp

    from jax_introspect import model as model_lib
    leaves = []
    model_lib.params_tree(cfg, lambda leaf: leaves.append(leaf))

    def draw():
        keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
        return model_lib.params_tree(cfg, lambda leaf: (
            jnp.ones(leaf.param_shape(cfg), dtype) if "norm" in leaf.name else
            (0.02 * jax.random.normal(next(keys), leaf.param_shape(cfg), jnp.float32)).astype(dtype)))
    return jax.jit(draw, out_shardings=layout.params(cfg))()


def build_models(shape: str, tokenizer_model: Optional[str], device: str, dtype: str = "bfloat16", hf: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import jax_introspect
    from jax_introspect import config as config_lib, sharding as sharding_lib, tokenizer as tokenizer_lib
    hf_config = SHAPES[shape]
    cfg = config_lib.from_hf_dict(hf_config, source=f"{shape} (benchmarks/sweep_engine_gpu.py)")
    layout = sharding_lib.Layout.for_model(sharding_lib.one_device_mesh(), cfg)
    tok = tokenizer_lib.from_tiktoken_model(tokenizer_model or tokenizer_lib.llama3_tokenizer_model_path())
    t = time.perf_counter()
    lm = jax_introspect.LanguageModel(cfg, random_params(cfg, layout, dtype=dtype), tok, path=f"random-{shape}", layout=layout)
    common.log(f"JAX params drawn in {time.perf_counter() - t:.1f} s")
    if not hf:
        return lm, None
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**hf_config), dtype=getattr(torch, dtype)).eval()
    common.log(f"HF model drawn in {time.perf_counter() - t:.1f} s on {device}")
    return lm, model


def run_case(lm, model, grid: str, protocol: str, runs: int, device: str) -> dict:
    """The grid's arms; without an HF `model` only the JAX arms (engine vs plain texts)."""
    import shutil
    import tempfile

    from jax_introspect.experiment import sweep
    config = sweep_engine.grid_config(grid, protocol)  # the CPU run's grids and batch sizes
    plan = sweep.plan_sweep(config, lm.config, lm.tokenizer, lm.path, str(lm.dtype))
    scratch = tempfile.mkdtemp(prefix="bench_engine_gpu_")
    vectors_file = os.path.join(scratch, sweep.VECTORS_FILE)
    t = time.perf_counter()
    concept = sweep.extract_vectors(lm, plan, vectors_file, progress=False)
    common.log(f"{grid}/{protocol}: vectors in {time.perf_counter() - t:.1f} s")
    arms = {"engine": [], "plain batches": [], **({"HF loop": []} if model is not None else {})}
    compile_s = {}
    for r in range(runs + 1):  # run 0 compiles: timed apart, not counted
        for name, engine in (("engine", "shared"), ("plain batches", "plain")):
            with common.CompileCounter() as compiles:
                result = sweep_engine.run_arm(lm, config.replace(engine=engine), vectors_file)
            if r:
                arms[name].append(result)
            else:
                compile_s[name] = dict(wall=result["wall"], compile=compiles.seconds(), n=compiles.count())
        if model is not None:
            hf = sweep_engine.run_hf(model, lm, config, plan, concept, device=device)
            if r:
                arms["HF loop"].append(hf)
            else:
                compile_s["HF loop"] = dict(wall=hf["wall"])
        common.log(f"{grid}/{protocol} run {r}: " + ", ".join(
            f"{n} {(a[-1] if r else compile_s[n])['wall']:.2f}s" for n, a in arms.items()))
    shutil.rmtree(scratch, ignore_errors=True)
    reference = arms["plain batches"][0]["texts"]
    engine_texts = arms["engine"][0]["texts"]
    differ = sum(engine_texts[k] != v for k, v in reference.items())
    return dict(grid=grid, protocol=protocol, config=config, arms=arms, first_run=compile_s,
                same_texts={"engine": differ == 0, "plain batches": True}, engine_texts_differ=differ,
                trials=len(plan.trials), prompt_tokens=len(plan.prompts[config.protocols[0]].ids),
                window_start=plan.prompts[config.protocols[0]].start, load=(0.0, 0.0))


def summary(res: dict) -> dict:
    med = common.median
    out = {k: res[k] for k in ("grid", "protocol", "trials", "prompt_tokens", "window_start", "engine_texts_differ",
                               "first_run")}
    for name, rs in res["arms"].items():
        out[name] = dict(generation_s=[a.get("generation", a["wall"]) for a in rs], wall_s=[a["wall"] for a in rs],
                         trials_per_s=res["trials"] / med([a.get("generation", a["wall"]) for a in rs]))
    if "HF loop" in out:
        for name in res["arms"]:
            out[name]["vs_hf_loop"] = out[name]["trials_per_s"] / out["HF loop"]["trials_per_s"]
    return out


def environment(device: str) -> dict:
    import jax
    import torch
    import transformers
    return dict(jax=jax.__version__, jax_devices=[str(d) for d in jax.devices()], torch=torch.__version__,
                transformers=transformers.__version__,
                gpu=torch.cuda.get_device_name(0) if device == "cuda" else "none",
                mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cases", default="quickstart/lindsey,grid/lindsey,quickstart/replication,grid/replication")
    parser.add_argument("--tokenizer_model", default=None)
    parser.add_argument("--device", default="cuda", help="torch device of the HF loop")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--no_hf", action="store_true", help="JAX arms only (the engine-vs-plain texts check)")
    args = parser.parse_args(argv)
    common.quiet_libraries()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    lm, model = build_models(args.shape, args.tokenizer_model, args.device, args.dtype, hf=not args.no_hf)
    record = dict(shape=args.shape, runs=args.runs, dtype=args.dtype,
                  matmul_precision=str(__import__("jax").config.jax_default_matmul_precision), environment=environment(args.device), cases=[])
    results = []
    for case in args.cases.split(","):
        grid, protocol = case.split("/")
        res = run_case(lm, model, grid, protocol, args.runs, args.device)
        results.append(res)
        record["cases"].append(summary(res))
        record["elapsed_s"] = time.perf_counter() - t0
        with open(os.path.join(args.out, f"sweep_engine_gpu_{args.dtype}.json"), "w") as f:
            json.dump(record, f, indent=1, default=str)
        common.log(json.dumps(record["cases"][-1], default=str)[:2000])
    if args.no_hf:
        return
    text = sweep_engine.markdown(results, replication_note=None)
    with open(os.path.join(args.out, "sweep_engine_gpu.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
