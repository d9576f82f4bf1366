"""Where a decode step of SmolLM2-135M goes on this CPU.

    python -m benchmarks.decode_breakdown [--batches=1,8,32] [--runs=3]

Per decode step (ms, one token for each of `batch` rows, a 228-slot KV cache as in the
throughput benchmark: 128 prompt + 100 new tokens), each timed as a jitted loop of `steps`
steps so dispatch is amortized:

- `model.forward`, T=1, with the injection: the library's decoder step;
- the same with `model._attention` replaced by the identity (what attention costs; patched in
  this process only, before tracing);
- sampling on `[batch, vocab]` float32 logits, temperature 1: `generate.next_tokens` with
  top_p = 1 on every row (the whole vocabulary, what the sweeps use), with top_p = 0.9 (the
  nucleus threshold found by bisection), inverse-CDF sampling (one uniform per row; not used by the library, it
  would change which token a given key draws), and greedy argmax;
- end to end: `generate_tokens`' decode rate (batch x 20 / (t(21) - t(1)), median of
  `e2e_runs`) at top_p = 1 and at top_p = 0.9.

With `--profile`, a second table: the forward step's XLA:CPU thread time by kind of op, from a
`jax.profiler` trace of one call of the same compiled loop (`thread_time_split`): the weight
matmuls, attention's two products, copies of one layer's weight slices out of the stacked weights
(the scan's per-layer `dynamic_slice`: XLA:CPU gives each its own buffer) and of the layer's KV
cache out of the stacked cache, and the rest. Two threads run at once, so the kinds can add up to
more than the step's wall time.

With `--unrolled`, the forward step is also timed with the layer scan unrolled
(`compile_depth.unrolled_scan`, patched while it is traced), and with `--profile` also split: does
unrolling remove the per-layer copies? (On this CPU it does not: docs/performance.md.)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import math
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, compile_depth
from benchmarks.generation_throughput import LAYER, PROMPT_LEN, START, STRENGTH, injection_vector, prompt_ids

CACHE = PROMPT_LEN + 100
E2E_TOKENS = 21


def _timed(fn, args, steps, runs):
    jax.block_until_ready(fn(*args))
    return common.median([common.time_call(lambda: jax.block_until_ready(fn(*args))) for _ in range(runs)]) / steps * 1e3


@contextlib.contextmanager
def patched(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def forward_steps(lm, batch, steps, attention=None, warm=True):
    """(jitted decode loop, its arguments); `warm`: called once (compiled, and traced while
    `attention` is patched in)."""
    from jax_introspect import inject
    from jax_introspect import model as model_lib
    cfg = lm.config
    injection = inject.make(LAYER, STRENGTH, injection_vector(cfg.d_model), start=START, batch=batch)

    def run(params, injection):
        cache = model_lib.init_cache(cfg, batch, CACHE, params.embed.dtype)
        cache = cache.replace(valid=cache.valid.at[:, :PROMPT_LEN].set(True), length=jnp.int32(PROMPT_LEN))

        def one(i, carry):
            token, cache = carry
            logits, cache, _ = model_lib.forward(params, cfg, token[:, None], jnp.full((batch, 1), PROMPT_LEN) + i,
                                                 jnp.ones((batch, 1), bool), cache, injection=injection,
                                                 layout=lm.layout)
            return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache
        return jax.lax.fori_loop(0, steps, one, (jnp.zeros((batch,), jnp.int32), cache))[0]
    ctx = patched(model_lib, "_attention", attention) if attention else contextlib.nullcontext()
    with ctx:
        fn = jax.jit(run)
        if warm:
            jax.block_until_ready(fn(lm.params, injection))  # trace while patched
    return fn, (lm.params, injection)


KINDS = ("weight matmuls", "attention products", "weight-slice copies", "cache-slice copies", "other")
ATTENTION_PRODUCTS = ("bkmd,bkds->bkms", "bkms,bksd->bkmd")  # model._attention's einsums


def op_kinds(hlo_text: str, weight_sizes: set, cache_sizes: set) -> dict:
    """Instruction name -> kind (`KINDS`) in a compiled program's HLO text. A dot (or a fusion
    around one) is an attention product when its metadata names one of `_attention`'s einsums
    or, without metadata, when its result has 3 or more axes (the projections' are [rows, out]);
    other instructions whose result has a layer weight's element count (the per-layer slice of
    a stacked weight matrix) or a layer's KV-cache element count are copies of those."""
    from jax_introspect import compile_only
    parsed = list(compile_only.instructions(hlo_text))
    with_dot = {computation for computation, *_, opcode, _ in parsed if opcode == "dot"}
    kinds = {}
    for _, name, _, shape, opcode, line in parsed:
        calls = re.search(r"calls=%?([\w.-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        if opcode == "dot" or (opcode == "fusion" and calls and calls.group(1) in with_dot):
            attention = any(spec in op_name.group(1) for spec in ATTENTION_PRODUCTS) if op_name else len(shape) >= 3
            kind = "attention products" if attention else "weight matmuls"
        elif math.prod(shape) in weight_sizes:
            kind = "weight-slice copies"
        elif math.prod(shape) in cache_sizes:
            kind = "cache-slice copies"
        else:
            kind = "other"
        kinds[name] = kind
    return kinds


def thread_time_split(lm, batch: int, steps: int) -> dict:
    """ms per decode step of thread time by kind (`op_kinds`), and the step's wall ms, from a
    jax.profiler trace of one call of `forward_steps`' compiled loop."""
    fn, args = forward_steps(lm, batch, steps, warm=False)  # compiled once, here
    compiled = fn.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    cfg = lm.config
    weight_sizes = {math.prod(x.shape[1:]) for x in jax.tree.leaves(lm.params.layers) if x.ndim > 2}
    cache_sizes = {batch * cfg.n_kv_heads * cfg.head_dim * CACHE}
    kinds = op_kinds(compiled.as_text(), weight_sizes, cache_sizes)
    wall, events = common.profile_events(lambda: jax.block_until_ready(compiled(*args)))
    total = collections.Counter()
    for e in events:
        if e.get("name") in kinds:
            total[kinds[e["name"]]] += e["dur"] / 1e3  # microseconds -> ms
    return dict(batch=batch, wall=wall * 1e3 / steps, **{k: total[k] / steps for k in KINDS})


def sampling_steps(cfg, batch, steps, method):
    from jax_introspect import generate as generate_lib
    keys = np.stack([generate_lib.trial_key(0, str(i)) for i in range(batch)])
    sample = generate_lib.sampling(batch, 1.0, 0.9 if method == "nucleus" else 1.0, keys)
    logits = jax.random.normal(jax.random.PRNGKey(1), (batch, cfg.vocab_size)) * 3

    def draw(logits, sample, step):
        if method in ("library", "nucleus"):
            return generate_lib.next_tokens(logits, sample, step)
        if method == "inverse_cdf":
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(sample.keys)
            scaled = logits / sample.temperature[:, None]
            cdf = jnp.cumsum(jnp.exp(scaled - scaled.max(-1, keepdims=True)), -1)
            u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
            return jnp.argmax(cdf > u[:, None], -1).astype(jnp.int32)
        return jnp.argmax(logits, -1).astype(jnp.int32)

    @jax.jit
    def run(logits, sample):
        # Each step's logits depend on the previous draw, so no step can be hoisted or dropped.
        def one(i, acc):
            return acc + draw(logits + 1e-6 * acc[:, None].astype(jnp.float32), sample, i)
        return jax.lax.fori_loop(0, steps, one, jnp.zeros((batch,), jnp.int32))
    return run, (logits, sample)


def end_to_end(lm, batch, runs, top_p: float) -> float:
    """generate_tokens' decode rate (new tokens/s over 20 steps, prefill taken out)."""
    from benchmarks.generation_throughput import Ours
    ours = Ours(lm, prompt_ids(lm), batch, top_p=top_p)
    ours.compile(E2E_TOKENS)
    ours.compile(1)
    tn, t1 = [], []
    for _ in range(runs):
        tn.append(common.time_call(lambda: ours(E2E_TOKENS)))
        t1.append(common.time_call(lambda: ours(1)))
    return batch * (E2E_TOKENS - 1) / (common.median(tn) - common.median(t1))


SAMPLERS = ("library", "nucleus", "inverse_cdf", "greedy")


def run(batches: Sequence[int] = (1, 8, 32), runs: int = 3, steps: int = 10, checkpoint: Optional[str] = None,
        e2e_runs: int = 2, profile: bool = False, unrolled: bool = False):
    common.quiet_libraries()
    import jax_introspect
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint(checkpoint or common.SMOLLM2_CHECKPOINT))
    cfg = lm.config
    rows = []
    for batch in batches:
        row = dict(batch=batch, load=common.load_average()[0])
        row["forward"] = _timed(*forward_steps(lm, batch, steps), steps, runs)
        row["forward_no_attention"] = _timed(*forward_steps(lm, batch, steps, lambda c, q, k, v, m, prefix=None: q),
                                             steps, runs)
        if unrolled:
            with compile_depth.unrolled_scan():  # traced (and compiled) inside: the loop's layer scan unrolled
                row["forward_unrolled"] = _timed(*forward_steps(lm, batch, steps), steps, runs)
        for method in SAMPLERS:
            row[f"sample_{method}"] = _timed(*sampling_steps(cfg, batch, steps * 2, method), steps * 2, runs)
        row["e2e_top_p_1"] = end_to_end(lm, batch, e2e_runs, 1.0)
        row["e2e_top_p_0.9"] = end_to_end(lm, batch, e2e_runs, 0.9)
        common.log(f"batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
        if profile:
            row["split"] = thread_time_split(lm, batch, steps)
            common.log(f"batch {batch}, thread time: {row['split']}")
            if unrolled:
                with compile_depth.unrolled_scan():
                    row["split_unrolled"] = dict(thread_time_split(lm, batch, steps), batch=f"{batch}, unrolled")
        rows.append(row)
    return rows


def markdown(rows) -> str:
    lines = ["### Decode step breakdown (SmolLM2-135M float32, 228-slot KV cache, ms per step)", "",
             "The shipped decoder and sampler; only the attention-free variant is patched (in this process).", ""]
    body = []
    for r in rows:
        body.append([r["batch"], f"{r['forward']:.1f}", f"{r['forward'] - r['forward_no_attention']:.1f}",
                     *(f"{r['sample_' + m]:.1f}" for m in SAMPLERS),
                     f"{r['e2e_top_p_1']:.1f}", f"{r['e2e_top_p_0.9']:.1f}", f"{r['load']:.2f}"])
    lines.append(common.table(
        ["batch", "forward step", "of it attention", "sampling, top_p 1",
         "sampling, top_p 0.9 (nucleus bisection)", "inverse CDF (not used)", "greedy argmax",
         "decode tok/s, top_p 1", "decode tok/s, top_p 0.9", "load"], body))
    if any("forward_unrolled" in r for r in rows):
        lines += ["", "The same forward step with the layer scan unrolled (`jax.lax.scan(unroll=True)`, patched in this "
                  "process; what a per-layer loop over the stacked weights would run), ms per step:", ""]
        lines.append(common.table(["batch", "scanned (shipped)", "unrolled", "unrolled / scanned"], [
            [r["batch"], f"{r['forward']:.1f}", f"{r['forward_unrolled']:.1f}", f"{r['forward_unrolled'] / r['forward']:.2f}"]
            for r in rows if "forward_unrolled" in r]))
    splits = [r[k] for r in rows for k in ("split", "split_unrolled") if k in r]
    if splits:
        lines += ["", "#### The forward step's XLA:CPU thread time by kind of op (ms per step, one profiled call)", "",
                  "Two threads: the kinds can add up to more than the wall time. Copies: buffers XLA:CPU makes "
                  "of one layer's slice of the stacked weights and of the stacked KV cache at each scan step.", ""]
        lines.append(common.table(["batch", "wall", *KINDS, "sum"], [
            [s["batch"], f"{s['wall']:.1f}", *(f"{s[k]:.1f}" for k in KINDS), f"{sum(s[k] for k in KINDS):.1f}"]
            for s in splits]))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="also split the forward step's thread time by kind of op (a jax.profiler trace)")
    parser.add_argument("--unrolled", action="store_true",
                        help="also time the forward step with the layer scan unrolled (are the per-layer copies gone?)")
    args = parser.parse_args(argv)
    print(markdown(run([int(b) for b in args.batches.split(",")], args.runs, checkpoint=args.checkpoint,
                       profile=args.profile, unrolled=args.unrolled)))


if __name__ == "__main__":
    main()
