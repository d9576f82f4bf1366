"""Injected, sampled generation throughput: jax_introspect against HF transformers (and nnsight).

    python -m benchmarks.generation_throughput [--batches=1,8,32] [--runs=3] [--new_tokens=100]

SmolLM2-135M-Instruct in float32, 128-token prompts (the first 128 tokens of Lindsey's
injected-thought chat prompt), temperature 1, top_p 1 (the sweep's sampling), exactly
`new_tokens` new tokens per row (EOS never stops a row), and a concept-vector injection at
layer 20 of 30 from position 64 on (prompt and every decode step):

- jax_introspect: `generate.generate_tokens` (the program `lm.generate` runs) with an EOS id
  that never occurs;
- HF: `model.generate(do_sample=True, top_k=0, min_new_tokens=max_new_tokens)` with the
  forward-hook injection of launch/gpu_reference.py (`Injection`);
- nnsight (if installed): the same injection written as an nnsight intervention on every step.

The three run interleaved in one process (each repetition runs each once), so all see the same
machine load; torch uses as many threads as XLA's CPU client (all cores of this process).
New tokens/s = batch x new tokens / wall time of the call (prefill included, as a user sees it).
"Decode" rates take the prefill out: batch x (n - 1) / (t(n) - t(1)), with t(1) a call that
makes one token.

The ceiling is a jitted JAX program doing only the weight matmuls of one decode step (30 layers
of q/k/v/o + gate/up/down, then the lm_head; no attention, norms or sampling) for `batch` tokens,
run for several steps in one call; "per-layer weights" holds each layer's weights as its own
array, "stacked weights" slices them from `[layers, ...]` arrays inside a `lax.scan` like the
model does. Peak = the best of a few large fp32 matmuls.
"""
from __future__ import annotations

import argparse
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

LAYER, STRENGTH, START = 20, 8.0, 64
PROMPT_LEN = 128


def prompt_ids(lm, length: int = PROMPT_LEN) -> list[int]:
    from jax_introspect.experiment import protocols
    text = lm.tokenizer.chat_prompt(protocols.protocol("lindsey_injected_thought")["messages"])
    ids = lm.tokenizer.encode(text)
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def injection_vector(d_model: int, seed: int = 0) -> np.ndarray:
    v = np.random.RandomState(seed).randn(d_model).astype(np.float32)
    return v / np.linalg.norm(v)


# --- the three implementations ------------------------------------------------------------------

class Ours:
    """`generate_tokens` compiled ahead of time (`.lower().compile()`) for each number of new
    tokens, so the compile is timed on its own and no warm-up run is needed."""

    def __init__(self, lm, ids, batch, top_p: float = 1.0):
        from jax_introspect import generate as generate_lib
        from jax_introspect import inject
        self.lm, self.gen = lm, generate_lib
        self.tokens = np.tile(np.asarray(ids, np.int32), (batch, 1))
        self.valid = np.ones_like(self.tokens, bool)
        self.injection = inject.make(LAYER, STRENGTH, injection_vector(lm.config.d_model), start=START, batch=batch)
        keys = np.stack([generate_lib.trial_key(0, f"row{i}") for i in range(batch)])
        self.sample = generate_lib.sampling(batch, 1.0, top_p, keys)
        self.eos, self.pad = np.array([-1], np.int32), np.int32(0)
        self.compiled = {}

    def compile(self, n: int) -> float:
        """Seconds to trace, lower and compile the program for `n` new tokens."""
        t = time.perf_counter()
        self.compiled[n] = self.gen.generate_tokens.lower(
            self.lm.params, self.lm.config, self.tokens, self.valid, self.injection, self.sample, self.eos,
            self.pad, n, layout=self.lm.layout).compile()
        return time.perf_counter() - t

    def __call__(self, n: int) -> np.ndarray:
        if n not in self.compiled:
            self.compile(n)
        out, lengths, _ = self.compiled[n](self.lm.params, self.tokens, self.valid, self.injection, self.sample,
                                           self.eos, self.pad)
        out, lengths = np.asarray(out), np.asarray(lengths)
        assert (lengths == n).all(), lengths
        return out


def _hf_kwargs(n, pad_id):
    return dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n, min_new_tokens=n,
                pad_token_id=pad_id)


class HF:
    def __init__(self, model, ids, batch, pad_id):
        import torch
        self.torch, self.model, self.pad_id = torch, model, pad_id
        self.ids = torch.tensor([list(ids)] * batch, dtype=torch.long)
        self.mask = torch.ones_like(self.ids)
        self.vector = injection_vector(model.config.hidden_size)

    def __call__(self, n: int):
        from launch.gpu_reference import Injection
        with self.torch.no_grad(), Injection(self.model, LAYER, self.vector, STRENGTH, start=START):
            out = self.model.generate(self.ids, attention_mask=self.mask, **_hf_kwargs(n, self.pad_id))
        assert out.shape[1] == self.ids.shape[1] + n, out.shape
        return out


class NNsight:
    """The same injection as an nnsight intervention: positions >= START of the prompt at the
    first step, the one new position at every later step."""

    def __init__(self, nn_model, ids, batch, pad_id):
        import torch
        self.torch, self.nn_model, self.pad_id = torch, nn_model, pad_id
        self.ids = torch.tensor([list(ids)] * batch, dtype=torch.long)
        self.delta = STRENGTH * torch.as_tensor(injection_vector(nn_model.config.hidden_size))

    def __call__(self, n: int):
        m, delta = self.nn_model, self.delta
        with self.torch.no_grad():
            with m.generate(self.ids, **_hf_kwargs(n, self.pad_id)) as tracer:
                for step in tracer.iter[:n]:
                    out = m.model.layers[LAYER].output
                    if step == 0:
                        out[:, START:] += delta
                    else:
                        out[:] += delta
                result = tracer.result.save()
        assert result.shape[1] == self.ids.shape[1] + n, result.shape
        return result


def load_nnsight(model, tokenizer):
    try:
        import nnsight
    except ImportError:
        return None, "not installed (`pip install nnsight`; optional)"
    return nnsight.TransformersModel(model, tokenizer=tokenizer, task="text-generation"), None


# --- ceiling and peak ---------------------------------------------------------------------------

def _matmul_weights(lm):
    cfg, layers = lm.config, lm.params.layers
    L, D = cfg.n_layers, cfg.d_model
    stacked = dict(wq=layers.wq.reshape(L, D, -1), wk=layers.wk.reshape(L, D, -1), wv=layers.wv.reshape(L, D, -1),
                   wo=layers.wo.reshape(L, -1, D), wg=layers.w_gate, wu=layers.w_up, wd=layers.w_down)
    per_layer = [{k: jnp.array(v[i]) for k, v in stacked.items()} for i in range(L)]
    head = lm.params.embed.T if lm.params.lm_head is None else lm.params.lm_head
    return stacked, per_layer, jnp.array(head)


def _matmul_layer(h, w):
    q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
    # k and v feed nothing in a matmul-only step; a negligible term keeps them from being dropped.
    h = h + q @ w["wo"] + 1e-9 * (k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True))
    return h + (jax.nn.silu(h @ w["wg"]) * (h @ w["wu"])) @ w["wd"], None


@functools.partial(jax.jit, static_argnames=("steps", "scanned"))
def _ceiling_steps(weights, head, x, steps, scanned):
    d = x.shape[-1]

    def one(_, x):
        if scanned:
            h, _ = jax.lax.scan(_matmul_layer, x, weights)
        else:
            h = x
            for w in weights:
                h, _ = _matmul_layer(h, w)
        return x + 1e-9 * (h @ head)[:, :d]
    return jax.lax.fori_loop(0, steps, one, x)


class Ceiling:
    def __init__(self, lm, batch, steps):
        self.stacked, self.per_layer, self.head = _matmul_weights(lm)
        self.x = jnp.ones((batch, lm.config.d_model), jnp.float32)
        self.steps, self.batch = steps, batch

    def run(self, scanned: bool) -> float:
        """tokens/s of one call of `steps` matmul-only steps."""
        w = self.stacked if scanned else self.per_layer
        t = common.time_call(lambda: _ceiling_steps(w, self.head, self.x, self.steps, scanned).block_until_ready())
        return self.batch * self.steps / t


def matmul_peak(runs: int = 5) -> tuple[float, str]:
    """Best fp32 GFLOP/s of a jitted square matmul chain (sizes 1024..2048)."""
    best, where = 0.0, ""
    for n, reps in ((1024, 20), (2048, 4)):
        a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32) / np.sqrt(n))

        @jax.jit
        def chain(x, a=a, reps=reps):
            return jax.lax.fori_loop(0, reps, lambda i, x: x @ a, x)
        chain(a).block_until_ready()
        times = [common.time_call(lambda: chain(a).block_until_ready()) for _ in range(runs)]
        gflops = 2 * n ** 3 * reps / common.median(times) / 1e9
        if gflops > best:
            best, where = gflops, f"{n}x{n} @ {n}x{n}"
    return best, where


def memory_bandwidth(runs: int = 5, mb: int = 512) -> float:
    """GB/s of a jitted reduction over a `mb` MB float32 array (read-bound)."""
    x = jnp.ones((mb * 2 ** 20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / common.median([common.time_call(lambda: total(x).block_until_ready()) for _ in range(runs)]) / 1e9


def decode_flops_per_token(cfg, context: float) -> tuple[float, float]:
    """(weight-matmul FLOPs, attention FLOPs) of one decode token attending to `context` tokens."""
    D, H, K, hd, F, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.n_layers
    matmul = 2 * (L * (D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F) + D * cfg.vocab_size)
    attention = 2 * 2 * L * H * hd * context
    return float(matmul), float(attention)


# --- the benchmark ------------------------------------------------------------------------------

def run(batches: Sequence[int] = (1, 8, 32), runs: int = 3, new_tokens: int = 100, ceiling_steps: int = 25,
        with_nnsight: bool = True, checkpoint: Optional[str] = None) -> dict:
    common.quiet_libraries()
    threads = common.set_torch_threads()
    import jax_introspect
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint(checkpoint or common.SMOLLM2_CHECKPOINT))
    hf_model, hf_tok = common.load_hf_smollm2()
    nn_model, nn_note = load_nnsight(hf_model, hf_tok) if with_nnsight else (None, "skipped (--no_nnsight)")
    ids = prompt_ids(lm)
    pad = lm.tokenizer.pad_id
    common.log(f"devices {jax.devices()}, torch threads {threads}, load {common.load_text()}")
    peak, peak_shape = matmul_peak()
    bandwidth = memory_bandwidth()
    common.log(f"fp32 matmul peak {peak:.0f} GFLOP/s ({peak_shape}), memory read {bandwidth:.1f} GB/s")
    rows = []
    for batch in batches:
        impls = {"ours": Ours(lm, ids, batch), "hf": HF(hf_model, ids, batch, pad)}
        if nn_model is not None:
            impls["nnsight"] = NNsight(nn_model, ids, batch, pad)
        ceiling = Ceiling(lm, batch, ceiling_steps)
        load_before = common.load_average()[0]
        # Compile ours ahead of time (n new tokens and 1 new token: two programs) and the
        # ceilings; one short call of each torch path.
        compile_s = {"ours": impls["ours"].compile(new_tokens), "ours_1": impls["ours"].compile(1)}
        for name in impls:
            if name != "ours":
                impls[name](2)
        ceiling.run(False), ceiling.run(True)
        times = {name: [] for name in impls}
        times.update(ours_1=[], hf_1=[], ceiling=[], ceiling_scan=[])
        for r in range(runs):
            for name, impl in impls.items():
                times[name].append(common.time_call(lambda: impl(new_tokens)))
            times["ours_1"].append(common.time_call(lambda: impls["ours"](1)))
            times["hf_1"].append(common.time_call(lambda: impls["hf"](1)))
            times["ceiling"].append(ceiling.run(False))
            times["ceiling_scan"].append(ceiling.run(True))
            common.log(f"batch {batch} run {r}: " + ", ".join(
                f"{k} {v[-1]:.2f}" for k, v in times.items()) + f"  (load {common.load_average()[0]:.2f})")
        med = {k: common.median(v) for k, v in times.items()}
        row = dict(batch=batch, runs=runs, new_tokens=new_tokens, times=times,
                   load=(load_before, common.load_average()[0]),
                   compile_s=compile_s["ours"], compile_1_s=compile_s["ours_1"],
                   ceiling=med["ceiling"], ceiling_scan=med["ceiling_scan"])
        for name in impls:
            row[f"{name}_tps"] = batch * new_tokens / med[name]
        for name, one in (("ours", "ours_1"), ("hf", "hf_1")):
            row[f"{name}_prefill_s"] = med[one]
            row[f"{name}_decode_tps"] = batch * (new_tokens - 1) / max(med[name] - med[one], 1e-9)
        rows.append(row)
    return dict(rows=rows, peak=peak, peak_shape=peak_shape, bandwidth=bandwidth, threads=threads, nnsight_note=nn_note,
                config=lm.config, with_nnsight=nn_model is not None)


TARGETS = {1: 2.0, 8: 2.5, 32: 2.5}


def markdown(result: dict) -> str:
    rows, cfg = result["rows"], result["config"]
    nn = result["with_nnsight"]
    out = [f"### 1. Injected, sampled generation (SmolLM2-135M float32, {PROMPT_LEN}-token prompts, "
           f"{rows[0]['new_tokens']} new tokens, temperature 1, top_p 1)", "",
           f"New tokens/s, median of {rows[0]['runs']} interleaved runs (prefill included); torch threads "
           f"{result['threads']}. Ratio = jax_introspect / HF; target >= {TARGETS[8]}x at batch 8 and 32, "
           f">= {TARGETS[1]}x at batch 1.", ""]
    headers = ["batch", "jax_introspect", "HF generate + hook"] + (["nnsight"] if nn else []) + \
        ["ratio vs HF", "target", "met", "load before/after"]
    body = []
    for r in rows:
        ratio = r["ours_tps"] / r["hf_tps"]
        target = TARGETS.get(r["batch"], 2.5)
        body.append([r["batch"], f"{r['ours_tps']:.1f}", f"{r['hf_tps']:.1f}"] +
                    ([f"{r['nnsight_tps']:.1f}"] if nn else []) +
                    [f"{ratio:.2f}x", f">= {target}x", "yes" if ratio >= target else "**no**",
                     f"{r['load'][0]:.2f} / {r['load'][1]:.2f}"])
    out.append(common.table(headers, body))
    if not nn:
        out += ["", f"nnsight: {result['nnsight_note']}."]
    out += ["", "Decode only (prefill taken out: batch x (n-1) / (t(n) - t(1))) against the matmul-only "
            "ceiling (tokens/s of the weight matmuls alone, see the script's docstring):", ""]
    headers = ["batch", "prefill s ours / HF", "decode tok/s ours", "decode tok/s HF", "decode ratio",
               "ceiling, per-layer weights", "ceiling, stacked weights (scan)", "ours / ceiling",
               "compile s (n / 1 token)"]
    body = []
    for r in rows:
        body.append([r["batch"], f"{r['ours_prefill_s']:.2f} / {r['hf_prefill_s']:.2f}",
                     f"{r['ours_decode_tps']:.1f}", f"{r['hf_decode_tps']:.1f}",
                     f"{r['ours_decode_tps'] / r['hf_decode_tps']:.2f}x", f"{r['ceiling']:.1f}",
                     f"{r['ceiling_scan']:.1f}", f"{100 * r['ours_decode_tps'] / r['ceiling']:.0f}%",
                     f"{r['compile_s']:.1f} / {r['compile_1_s']:.1f}"])
    out.append(common.table(headers, body))
    context = PROMPT_LEN + (rows[0]["new_tokens"] + 1) / 2
    matmul, attention = decode_flops_per_token(cfg, context)
    weight_bytes = 4 * matmul / 2  # float32: one 4-byte weight per multiply-add
    cache_slots = PROMPT_LEN + rows[0]["new_tokens"]
    kv_bytes_per_row = 2 * cfg.n_layers * cache_slots * cfg.n_kv_heads * cfg.head_dim * 4
    out += ["", "### 5. Achieved FLOP/s in batched decode", "",
            f"Measured on this machine: fp32 matmul peak **{result['peak']:.0f} GFLOP/s** (jitted "
            f"{result['peak_shape']} chain), memory read bandwidth **{result['bandwidth']:.1f} GB/s** (jitted sum "
            f"of a 512 MB array). FLOPs per decoded token: {matmul / 1e6:.0f} M in weight matmuls (lm_head "
            f"included) + {attention / 1e6:.1f} M in attention at the mean context of {context:.0f} tokens. "
            f"Roofline of this CPU = batch / max(bytes / bandwidth, FLOPs / peak), bytes = {weight_bytes / 1e6:.0f} MB "
            f"of weights + the {cache_slots}-slot KV cache ({kv_bytes_per_row / 1e6:.1f} MB per row) per step: the same "
            "model docs/performance.md applies to TPUs.", ""]
    headers = ["batch", "ours decode GFLOP/s", "% of peak", "HF decode GFLOP/s", "% of peak",
               "ceiling GFLOP/s", "% of peak", "roofline tok/s", "ours / roofline", "ceiling / roofline"]
    body = []
    for r in rows:
        f = lambda tps: (matmul + attention) * tps / 1e9
        fc = matmul * r["ceiling"] / 1e9
        b = r["batch"]
        roof = b / max((weight_bytes + b * kv_bytes_per_row) / (result["bandwidth"] * 1e9),
                       b * (matmul + attention) / (result["peak"] * 1e9))
        body.append([b, f"{f(r['ours_decode_tps']):.1f}", f"{100 * f(r['ours_decode_tps']) / result['peak']:.0f}%",
                     f"{f(r['hf_decode_tps']):.1f}", f"{100 * f(r['hf_decode_tps']) / result['peak']:.0f}%",
                     f"{fc:.1f}", f"{100 * fc / result['peak']:.0f}%", f"{roof:.0f}",
                     f"{100 * r['ours_decode_tps'] / roof:.0f}%", f"{100 * r['ceiling'] / roof:.0f}%"])
    out.append(common.table(headers, body))
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=100)
    parser.add_argument("--no_nnsight", action="store_true")
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    result = run([int(b) for b in args.batches.split(",")], args.runs, args.new_tokens,
                 with_nnsight=not args.no_nnsight, checkpoint=args.checkpoint)
    print(markdown(result))


if __name__ == "__main__":
    main()
