"""The sweep engine's cell prefill alone: cell-prefill block size and depth sharing, side by side in
one run (SmolLM2-135M float32, 2 CPU cores).

    python -m benchmarks.engine_prefill [--runs=3] [--cells=64]

The replication's protocol (`replication_405b_injected_thought`: injection at every position of its
172-token prompt, norm-matched to the MLP output): `--cells` injected cells (unit random vectors,
strength 4) spread evenly over layers 9, 13, 18 and 22 of SmolLM2's 30 (the 4 x 4 x 8 grid's layers)
and one clean cell, one trial each, 32 slots, one new token (so the call is the prefill, the first
token and the call's overhead). Arms, interleaved run by run: prefill blocks of 32 (the slots) and of
8 (`engine.prefill_block`'s default for this prompt), each without and with depth sharing
(`share_depth`). Each arm's first call compiles and is not counted; medians of `--runs`.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import numpy as np

from benchmarks import common

PROTOCOL = "replication_405b_injected_thought"
LAYERS = (9, 13, 18, 22)
ARMS = {"block 32": dict(prefill_block=32), "block 8": dict(prefill_block=8),
        "block 32, depth shared": dict(prefill_block=32, share_depth=True),
        "block 8, depth shared": dict(prefill_block=8, share_depth=True)}


def trials(lm, cells: int):
    """(prompt ids, injection) of `cells` injected cells and one clean one."""
    from jax_introspect import inject
    from jax_introspect.experiment import protocols
    ids = lm._prompt_ids([lm.tokenizer.chat_prompt(protocols.protocol(PROTOCOL)["messages"])])[0]
    vectors = np.random.RandomState(0).standard_normal((cells + 1, lm.config.d_model)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    layers = [LAYERS[i % len(LAYERS)] for i in range(cells)] + [0]
    injection = inject.make(layers, [4.0] * cells + [0.0], vectors, start=0, norm_match="mlp_out")
    return ids, injection


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cells", type=int, default=64)
    args = parser.parse_args(argv)
    common.quiet_libraries()
    import jax_introspect
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint())
    ids, injection = trials(lm, args.cells)
    n = args.cells + 1
    seconds = {name: [] for name in ARMS}
    texts = {}
    load_before = common.load_average()[0]
    for r in range(args.runs + 1):  # run 0 compiles every arm's program: not counted
        for name, kw in ARMS.items():
            t = time.perf_counter()
            out = lm.generate_shared([ids] * n, max_new_tokens=1, injection=injection, temperature=1.0, seed=r,
                                     trial_ids=[str(i) for i in range(n)], slots=32, **kw)
            if r:
                seconds[name].append(time.perf_counter() - t)
            texts.setdefault(r, {})[name] = [g.token_ids for g in out]
        common.log(f"run {r}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in seconds.items() if v)
                   + f"; load {common.load_text()}")
    same = all(len({tuple(map(tuple, t)) for t in run.values()}) == 1 for run in texts.values())
    base = common.median(seconds["block 32"])
    rows = [[name, f"{common.median(s):.1f} ({min(s):.1f}-{max(s):.1f})", f"{base / common.median(s):.2f}x"]
            for name, s in seconds.items()]
    print(f"### Engine cell prefill: {n} cells of the {len(ids)}-token replication prompt, 1 new token, 32 slots\n")
    print(f"Seconds per call, median of {args.runs} (range); load before/after {load_before:.2f} / "
          f"{common.load_average()[0]:.2f}. First tokens equal across arms in every run: {'yes' if same else 'NO'}.\n")
    print(common.table(["arm", "seconds per call", "vs block 32"], rows, "lrr"))


if __name__ == "__main__":
    main()
