"""Compile time against depth: the generation program for 4 and 32 decoder layers of one width.

    python -m benchmarks.compile_depth [--layers=4,32] [--widths=smollm2-135m,llama-3.1-8b] [--runs=3]

The program is `generate.generate_tokens` (prefill + the decode while-loop, what `lm.generate`
runs) for batch 8, a 128-token prompt and 100 new tokens, lowered from abstract shapes
(`jax.ShapeDtypeStruct`: nothing is allocated, so the 8B width costs no memory) and compiled
for this machine's CPU. Trace + lower and XLA compile are timed separately, each run from cold
(`jax.clear_caches()`). The decoder runs its layers as one `lax.scan`, so both should be flat in
depth; the "unrolled" rows compile the same program with the scan fully unrolled (a patched
`jax.lax.scan(unroll=True)`), i.e. what a per-layer Python loop would cost.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from benchmarks import common

BATCH, PROMPT, NEW = 8, 128, 100


def abstract_args(cfg):
    """generate_tokens' arguments as shapes, and its keyword arguments (the one-device layout)."""
    from jax_introspect import checkpoint
    from jax_introspect import generate as generate_lib
    from jax_introspect import inject, sharding
    sds = jax.ShapeDtypeStruct
    injection = inject.Injection(layer=sds((BATCH,), jnp.int32), strength=sds((BATCH,), jnp.float32),
                                 vector=sds((BATCH, cfg.d_model), jnp.float32), start=sds((BATCH,), jnp.int32),
                                 end=sds((BATCH,), jnp.int32), norm_match=sds((BATCH,), jnp.int32))
    sample = generate_lib.Sampling(temperature=sds((BATCH,), jnp.float32), top_p=sds((BATCH,), jnp.float32),
                                   keys=sds((BATCH, 2), jnp.uint32))
    args = (checkpoint.abstract_params(cfg, jnp.float32), cfg, sds((BATCH, PROMPT), jnp.int32),
            sds((BATCH, PROMPT), jnp.bool_), injection, sample, sds((2,), jnp.int32), sds((), jnp.int32), NEW)
    return args, {"layout": sharding.Layout.for_model(sharding.one_device_mesh(), cfg)}


@contextlib.contextmanager
def unrolled_scan():
    original = jax.lax.scan
    jax.lax.scan = functools.partial(original, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = original


def time_compile(cfg, unrolled: bool = False) -> tuple[float, float]:
    from jax_introspect import generate as generate_lib
    jax.clear_caches()
    args, kwargs = abstract_args(cfg)
    with unrolled_scan() if unrolled else contextlib.nullcontext():
        t = time.perf_counter()
        lowered = generate_lib.generate_tokens.lower(*args, **kwargs)
        lower_s = time.perf_counter() - t
    t = time.perf_counter()
    lowered.compile()
    return lower_s, time.perf_counter() - t


def run(widths: Sequence[str] = ("smollm2-135m", "llama-3.1-8b"), depths: Sequence[int] = (4, 32), runs: int = 3,
        unrolled: bool = True) -> list[dict]:
    common.quiet_libraries()
    from jax_introspect import config as config_lib
    rows = []
    variants = [False, True] if unrolled else [False]
    for width in widths:
        base = config_lib.preset(width)
        for unroll in variants:
            for depth in depths:
                cfg = dataclasses.replace(base, n_layers=depth, name=f"{width}-{depth}L")
                n = runs if not unroll else 1
                times = [time_compile(cfg, unroll) for _ in range(n)]
                row = dict(width=width, d_model=base.d_model, depth=depth, unrolled=unroll, runs=n,
                           lower=[t[0] for t in times], compile=[t[1] for t in times])
                common.log(f"{width} {depth} layers{' unrolled' if unroll else ''}: lower "
                           f"{common.median(row['lower']):.2f} s, compile {common.median(row['compile']):.2f} s")
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [f"### 3. Compile time against depth (`generate_tokens`, batch {BATCH}, {PROMPT}-token prompt, "
             f"{NEW} new tokens, float32, CPU)", "",
             "Seconds, median of the runs (min-max); each run cold. Ratio = 32 layers / 4 layers of the same "
             "width and variant.", ""]
    body = []
    by_key = {(r["width"], r["unrolled"], r["depth"]): r for r in rows}
    for r in rows:
        smallest = min(d for (w, u, d) in by_key if w == r["width"] and u == r["unrolled"])
        ref = by_key[(r["width"], r["unrolled"], smallest)]
        total = lambda x: common.median(x["lower"]) + common.median(x["compile"])
        body.append([f"{r['width']} (d_model {r['d_model']})", "unrolled (reference)" if r["unrolled"] else "scanned",
                     r["depth"], common.spread(r["lower"]), common.spread(r["compile"]),
                     f"{total(r):.2f}", f"{total(r) / total(ref):.2f}x", r["runs"]])
    lines.append(common.table(["width", "decoder", "layers", "trace + lower s", "XLA compile s", "total s",
                               "vs fewest layers", "runs"], body, "llrrrrrr"))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="4,32")
    parser.add_argument("--widths", default="smollm2-135m,llama-3.1-8b")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no_unrolled", action="store_true")
    args = parser.parse_args(argv)
    rows = run(args.widths.split(","), [int(x) for x in args.layers.split(",")], args.runs, not args.no_unrolled)
    print(markdown(rows))


if __name__ == "__main__":
    main()
