"""Whole-weight-stack copies on TPU: checkpoint format v1's weight layout against v2's (params.py),
for Llama-3.1-405B generation compiled for Cloud TPU slices on this CPU host (libtpu).

    python -m benchmarks.tpu_layouts [--slices=v5p:2x2x4/1x16,v5p:2x4x4/1x32,v6e:8x8/1x64,v5e:16x16/2x128]
        [--model=llama-3.1-405b] [--batch=32 --prompt_len=192 --max_new_tokens=100] [--layers=N] [--d_ff=F]

tests/test_tpu_compile.py's small Llama at its shapes (v1: 6 whole-stack copies; v2: none):

    python -m benchmarks.tpu_layouts --model=llama-3.1-8b --layers=16 --d_ff=3328 --slices=v6e:2x2/1x4 \
        --batch=8 --prompt_len=64 --max_new_tokens=16

Format v1 stored wq/wk/wv as [L, D, heads, hd] and w_gate/w_up as [L, D, F]; it is put back here by
patching `params.LAYER` and the model's einsums (the checkpoint never matters: parameters are
abstract). Per slice and layout: XLA's per-chip `memory_analysis()` (arguments, temp, total), the
whole-stack buffers in the compiled HLO (`compile_only.stacked_weight_copies`) and compile seconds.
docs/tpu.md has the table. Needs the `tpu` extra (libtpu).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

import jax.numpy as jnp

from jax_introspect import compile_only, config, model as model_lib, params as params_lib, sharding

V1_AXES = {"wq": ("embed", "heads", "head_dim"), "wk": ("embed", "kv_heads", "head_dim"),
           "wv": ("embed", "kv_heads", "head_dim"), "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp")}
V1_SPECS = {"wq": "btd,dhk->bthk", "wk": "btd,dhk->bthk", "wv": "btd,dhk->bthk",
            "w_gate": "btd,df->btf", "w_up": "btd,df->btf"}


@contextlib.contextmanager
def format_v1():
    """params.LAYER and model._projection as checkpoint format v1 had them."""
    layer, projection = params_lib.LAYER, model_lib._projection
    params_lib.LAYER = tuple(dataclasses.replace(leaf, axes=V1_AXES[leaf.name]) if leaf.name in V1_AXES else leaf
                             for leaf in layer)
    model_lib._projection = lambda name, spec, *a, **k: projection(name, V1_SPECS.get(name, spec), *a, **k)
    try:
        yield
    finally:
        params_lib.LAYER, model_lib._projection = layer, projection


def measure(cfg, topology: str, mesh: str, batch: int, prompt_len: int, new: int) -> dict:
    devices = compile_only.tpu_devices(topology)
    layout = sharding.Layout.for_model(sharding.make_mesh(mesh, devices), cfg)
    run_cfg = layout.run_config(cfg)
    params = compile_only.abstract_params(run_cfg, layout, jnp.bfloat16)
    start = time.time()
    compiled = compile_only.compile_generation(params, run_cfg, layout, batch, prompt_len, new)
    seconds = time.time() - start
    memory = compile_only.ProgramMemory.of(compiled)
    copies = compile_only.stacked_weight_copies(compiled.as_text(), params)
    return {"memory": memory, "copies": copies, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", default="v5p:2x2x4/1x16,v5p:2x4x4/1x32,v6e:8x8/1x64,v5e:16x16/2x128")
    ap.add_argument("--model", default="llama-3.1-405b")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the model's (0: all)")
    ap.add_argument("--d_ff", type=int, default=0, help="another MLP width than the model's (0: its own)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt_len", type=int, default=192)
    ap.add_argument("--max_new_tokens", type=int, default=100)
    args = ap.parse_args()
    cfg = config.preset(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, n_layers=args.layers)
    if args.d_ff:
        cfg = dataclasses.replace(cfg, d_ff=args.d_ff)
    print(f"{args.model}: generation, bf16, batch {args.batch}, prompt {args.prompt_len} + {args.max_new_tokens} new")
    print("| slice (mesh) | arguments GB | XLA temp GB v1 -> v2 | total GB v1 -> v2 | temp / arguments v1 -> v2 "
          "| whole-stack buffers v1 | v2 | compile s v1 / v2 |")
    print("|---|---:|---:|---:|---:|---|---|---:|")
    gb = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
    for item in args.slices.split(","):
        topology, mesh = item.split("/")
        with format_v1():
            before = measure(cfg, topology, mesh, args.batch, args.prompt_len, args.max_new_tokens)
        after = measure(cfg, topology, mesh, args.batch, args.prompt_len, args.max_new_tokens)
        b, a = before["memory"], after["memory"]
        names = lambda r: ", ".join(f"{c.weight} {c.nbytes / 1e9:.2f} GB" for c in r["copies"]) or "none"  # noqa: E731
        print(f"| {topology} ({mesh}) | {gb(a.arguments)} | {gb(b.temp)} -> {gb(a.temp)} | {gb(b.total)} -> "
              f"{gb(a.total)} | {100 * b.temp / b.arguments:.1f}% -> {100 * a.temp / a.arguments:.1f}% | "
              f"{names(before)} | {names(after)} | {before['seconds']:.0f} / {after['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
