"""Do the MLP's gate and up projections, stored [out, in], cost more than its down projection on
this CPU, and how fast is XLA:CPU's dot beside torch's? (SmolLM2-135M float32, 2 CPU cores.)

    python -m benchmarks.prefill_dots [--runs=15] [--rows=24,1152,1536,5504] [--chain_rows=8,24,48,1152] \
        [--repeats=50] [--batch=32] [--prompt_len=172]

Three measurements:
- the projection's dot alone, one jitted call each, at SmolLM2's widths (576 -> 1536), float32
  `precision="highest"` as the model runs it: `x @ W.T` with W stored [out, in] (`params.LAYER`'s
  order) and `x @ W` with W stored [in, out], interleaved, then the same product in torch
  (`F.linear`, HF's Linear, as many threads as XLA uses), medians of `--runs`;
- the stored-layout product `--repeats` times in a row inside one jitted `fori_loop`, against one
  jitted call per product and torch chained the same way: at a decode step's rows a jitted call's
  own overhead (dispatch, waking the runtime's threads) is as large as the product, and the model
  runs its products inside one program, so this is the comparison that holds for a decode step;
- one prefill forward ([batch, prompt_len] tokens, `lm._prefill`) under `jax.profiler`: the trace
  events of the layer scan's gate and up dots (einsum "btd,fd->btf") and its down dot
  ("btf,fd->btd"). Gate and up do not depend on each other, so XLA's CPU runtime may run them at
  the same time on the two cores. The table gives each one's summed event time, how much of that
  time the two overlap, and the wall time the pair covers.

The docs' earlier reading of a trace (gate and up "at half the rate" of down because of the stored
layout) added the two concurrent events' times; docs/performance.md has the correction and these figures.
"""
from __future__ import annotations

import argparse
import re
from typing import Optional, Sequence

import numpy as np

from benchmarks import common

D_MODEL, D_FF = 576, 1536
GATE_UP, DOWN = "btd,fd->btf", "btf,fd->btd"  # model._mlp's einsums


def _xla_then_torch(arms: dict, runs: int) -> list[float]:
    """Median seconds of each arm (a dict of calls, torch's last, named "torch"), each called once
    first. The XLA arms run interleaved; torch after them, not between: its OpenMP threads keep
    spinning for a while after each product and would slow whichever XLA call came next."""
    seconds = {name: [] for name in arms}
    for group in ([n for n in arms if n != "torch"], ["torch"]):
        for name in group:
            arms[name]()
        for _ in range(runs):
            for name in group:
                seconds[name].append(common.time_call(arms[name]))
    return [common.median(seconds[name]) for name in arms]


def isolated_dots(rows: Sequence[int], runs: int) -> list[list]:
    import jax
    import jax.numpy as jnp
    import torch
    common.set_torch_threads()
    stored = jax.jit(lambda x, w: jnp.einsum("td,fd->tf", x, w, precision="highest"))
    transposed = jax.jit(lambda x, w: jnp.einsum("td,df->tf", x, w, precision="highest"))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((D_FF, D_MODEL), np.float32)
    w_out_in, w_in_out, w_torch = jnp.asarray(w), jnp.asarray(np.ascontiguousarray(w.T)), torch.from_numpy(w)
    table = []
    for m in rows:
        x = jnp.asarray(rng.standard_normal((m, D_MODEL), np.float32))
        x_torch = torch.from_numpy(np.asarray(x))
        arms = {"[out, in]": lambda: jax.block_until_ready(stored(x, w_out_in)),
                "[in, out]": lambda: jax.block_until_ready(transposed(x, w_in_out)),
                "torch": lambda: torch.nn.functional.linear(x_torch, w_torch)}  # HF's Linear: W [out, in]
        gflop = 2 * m * D_MODEL * D_FF / 1e9
        a, b, c = _xla_then_torch(arms, runs)
        table.append([m, *(f for t in (a, b, c) for f in (f"{t * 1e3:.2f}", f"{gflop / t:.0f}")),
                      f"{a / b:.2f}", f"{a / c:.2f}"])
        common.log(f"{m} rows: {table[-1]}")
    return table


def _torch_chain(x, w, repeats: int):
    """torch's side of `chained_dots`: the same chain, one `F.linear` call per product."""
    import torch
    for _ in range(repeats):
        x = x + 1e-3 * torch.nn.functional.linear(x, w).amax(-1, keepdim=True)
    return x


def chained_dots(rows: Sequence[int], runs: int, repeats: int) -> list[list]:
    """The stored-layout product per call (a jitted call each: XLA's dispatch and thread wake-up
    included) against the same product `repeats` times inside one jitted `fori_loop`, and torch's
    `F.linear` chained the same way: at decode rows a call's overhead is as large as the product."""
    import jax
    import jax.numpy as jnp
    import torch
    common.set_torch_threads()
    product = lambda x, w: jnp.einsum("td,fd->tf", x, w, precision="highest")  # noqa: E731
    one_call = jax.jit(product)
    # Each product on the last one's input nudged by its output, so that none can be skipped or
    # shrunk: the nudge is each row's maximum over all the product's columns (XLA's simplifier
    # could push a slice of the output into the dot). It is cheap beside the product.
    in_program = jax.jit(lambda x, w: jax.lax.fori_loop(
        0, repeats, lambda _, h: h + 1e-3 * product(h, w).max(-1, keepdims=True), x))
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((D_FF, D_MODEL)) / np.sqrt(D_MODEL)).astype(np.float32)  # products of order 1
    w_jax, w_torch = jnp.asarray(w), torch.from_numpy(w)
    table = []
    for m in rows:
        x = rng.standard_normal((m, D_MODEL), np.float32)
        x_jax, x_torch = jnp.asarray(x), torch.from_numpy(x)
        arms = {"one call": lambda: [jax.block_until_ready(one_call(x_jax, w_jax)) for _ in range(repeats)],
                "in one program": lambda: jax.block_until_ready(in_program(x_jax, w_jax)),
                "torch": lambda: _torch_chain(x_torch, w_torch, repeats)}
        call, program, torch_ms = (t / repeats * 1e3 for t in _xla_then_torch(arms, runs))
        table.append([m, f"{call:.3f}", f"{program:.3f}", f"{call - program:.3f}", f"{torch_ms:.3f}",
                      f"{program / torch_ms:.2f}"])
        common.log(f"{m} rows, chained: {table[-1]}")
    return table


def _scan_dots(hlo_text: str) -> dict[str, list[str]]:
    """einsum spec -> the names of the compiled instructions that run it inside the layer scan."""
    found = {GATE_UP: [], DOWN: []}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*op_name=\"[^\"]*while/body[^\"]*/([\w,>\-]+)/dot_general\"", hlo_text):
        if m.group(2) in found:
            found[m.group(2)].append(m.group(1))
    return found


def _intervals(events, name: str) -> list[tuple[float, float]]:
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == name)


def traced_forward(batch: int, prompt_len: int) -> dict:
    import jax
    import jax_introspect
    from jax_introspect import lm as lm_lib
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint())
    tokens = np.random.default_rng(0).integers(100, 1000, (batch, prompt_len))
    args = (lm.params, lm.run_config, *lm._on_mesh(*lm._batch(tokens.tolist()), lm._injection(None, batch)),
            False, lm.layout, lm.adapter)
    hlo_text = lm_lib._prefill.lower(*args).compile().as_text()
    jax.block_until_ready(lm_lib._prefill(*args))  # a warm-up run: the jit reuses the executable compiled above
    wall, events = common.profile_events(lambda: jax.block_until_ready(lm_lib._prefill(*args)))
    ran = {e["name"] for e in events}  # the instructions the runtime executes (not those fused into them)
    dots = {spec: [n for n in names if n in ran] for spec, names in _scan_dots(hlo_text).items()}
    if len(dots[GATE_UP]) != 2 or len(dots[DOWN]) != 1:
        raise RuntimeError(f"expected 2 gate/up dots and 1 down dot among the traced ops, found {dots}")
    gate, up = (_intervals(events, n) for n in dots[GATE_UP])
    down = _intervals(events, dots[DOWN][0])
    total = lambda spans: sum(b - a for a, b in spans) / 1e3  # noqa: E731 (microseconds -> ms)
    overlap = sum(max(0.0, min(g[1], u[1]) - max(g[0], u[0])) for g, u in zip(gate, up)) / 1e3
    union = sum(max(g[1], u[1]) - min(g[0], u[0]) for g, u in zip(gate, up)) / 1e3
    cfg = lm.config
    gflop = 2 * batch * prompt_len * cfg.d_model * cfg.d_ff * cfg.n_layers / 1e9  # one projection, all layers
    return dict(wall=wall, gate=total(gate), up=total(up), overlap=overlap, union=union, down=total(down),
                pair_rate=2 * gflop / (union / 1e3), down_rate=gflop / (total(down) / 1e3), layers=len(gate))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--rows", default="24,1152,1536,5504")
    parser.add_argument("--chain_rows", default="8,24,48,1152")
    parser.add_argument("--repeats", type=int, default=50, help="products per chained measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=172)
    args = parser.parse_args(argv)
    common.quiet_libraries()
    load_before = common.load_text()
    dots = isolated_dots([int(r) for r in args.rows.split(",")], args.runs)
    chained = chained_dots([int(r) for r in args.chain_rows.split(",")], args.runs, args.repeats)
    fwd = traced_forward(args.batch, args.prompt_len)
    print(f"### The MLP's projections: stored layout and concurrency (SmolLM2-135M widths, float32)\n\n"
          f"Load before / after: {load_before} / {common.load_text()}.\n\n"
          f"One projection ({D_MODEL} -> {D_FF}) alone, medians of {args.runs} (the two XLA layouts "
          f"interleaved, torch after them):\n")
    print(common.table(["rows", "W [out, in] (stored): ms", "GF/s", "W [in, out]: ms", "GF/s",
                        "torch F.linear: ms", "GF/s", "stored / [in, out]", "stored / torch"], dots))
    print(f"\nThe stored-layout product per call against {args.repeats} of them chained (each on the last "
          f"one's input nudged by its output) inside one jitted `fori_loop`, and torch's F.linear chained "
          f"the same way; ms per product, medians of {args.runs}:\n")
    print(common.table(["rows", "XLA, one jitted call each", "XLA, in one program", "a call's overhead",
                        "torch F.linear", "in one program / torch"], chained))
    print(f"\nOne traced prefill forward, [{args.batch}, {args.prompt_len}] tokens, {fwd['layers']} layers, "
          f"wall {fwd['wall']:.2f} s (ms summed over the layers):\n")
    print(common.table(["gate", "up", "gate and up overlap", "wall the pair covers", "down",
                        "gate + up GF/s (over that wall)", "down GF/s"],
                       [[f"{fwd['gate']:.0f}", f"{fwd['up']:.0f}", f"{fwd['overlap']:.0f}", f"{fwd['union']:.0f}",
                         f"{fwd['down']:.0f}", f"{fwd['pair_rate']:.0f}", f"{fwd['down_rate']:.0f}"]]))


if __name__ == "__main__":
    main()
