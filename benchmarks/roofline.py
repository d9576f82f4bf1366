"""Decode roofline of Llama-3.1-8B/70B/405B on TPU v5e, v5p and v6e slices, and the predicted
time of the public 405B replication's sweeps. Arithmetic only: nothing here ran on a TPU.

    python -m benchmarks.roofline [--batch=32] [--slots=292]

Model: bf16 weights and KV cache, all chips tensor-parallel (mesh 1 x chips, the default rules
of docs/sharding.md: heads, KV heads, MLP and vocab split; KV heads duplicated to
lcm(8, chips) when chips > 8). One decode step of `batch` rows reads, on every chip, its share
of the weights (the embedding table only by row, so not counted; the lm_head in full) and its
share of the whole allocated KV cache (`generate` attends over every slot, masked), and does its
share of the FLOPs (2 per weight per row + 4 x layers x heads x head_dim x slots per row). The
step takes max(bytes / HBM bandwidth, FLOPs / peak bf16 FLOP/s) per chip. Collectives (two
all-reduces of [batch, d_model] per layer), host overhead, compile and checkpoint loading are
not modelled: the times are lower bounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional, Sequence

from benchmarks import common


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_tflops: float  # peak dense bf16 TFLOP/s per chip
    hbm_gbps: float  # HBM bandwidth GB/s per chip
    hbm_gb: float


# Google Cloud's published per-chip figures (cloud.google.com/tpu/docs/v5e, /v5p, /v6e).
CHIPS = {"v5e": Chip("v5e", 197.0, 819.0, 16), "v5p": Chip("v5p", 459.0, 2765.0, 95),
         "v6e": Chip("v6e", 918.0, 1640.0, 32)}

# Slices that hold each model with room for the sweep's KV cache (docs/tpu.md's sizing table).
SLICES = {"llama-3.1-8b": [("v5litepod-4", "v5e", 4), ("v5p-8", "v5p", 4), ("v6e-1", "v6e", 1)],
          "llama-3.1-70b": [("v5litepod-16", "v5e", 16), ("v5p-8", "v5p", 4), ("v6e-8", "v6e", 8)],
          "llama-3.1-405b": [("v5litepod-128", "v5e", 128), ("v5p-32", "v5p", 16), ("v6e-64", "v6e", 64)]}


def _split(n: int, ways: int) -> float:
    return n / ways if n % ways == 0 else n


def per_chip(cfg, chips: int) -> dict:
    """Per-chip weight bytes read per decode step, KV bytes per row per slot, FLOPs per row."""
    D, H, hd, F, V, L, K = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.n_layers, cfg.n_kv_heads
    kv_heads = K if K % chips == 0 else math.lcm(K, chips)
    h, k, f, v = _split(H, chips), _split(kv_heads, chips), _split(F, chips), _split(V, chips)
    matmul_weights = L * (2 * D * h * hd + 2 * D * k * hd + 3 * D * f) + v * D  # layers + lm_head
    return dict(weight_bytes=2 * matmul_weights, kv_bytes_per_row_slot=2 * L * k * hd * 2,
                flops_per_row=2 * matmul_weights, attn_flops_per_row_slot=4 * L * h * hd, kv_heads=kv_heads)


def decode_step(cfg, chip: Chip, chips: int, batch: int, slots: int) -> dict:
    p = per_chip(cfg, chips)
    bytes_ = p["weight_bytes"] + batch * slots * p["kv_bytes_per_row_slot"]
    flops = batch * (p["flops_per_row"] + slots * p["attn_flops_per_row_slot"])
    t_mem = bytes_ / (chip.hbm_gbps * 1e9)
    t_compute = flops / (chip.bf16_tflops * 1e12)
    # The batch where compute takes over: weight time / (per-row compute time - per-row KV time).
    per_row = (p["flops_per_row"] + slots * p["attn_flops_per_row_slot"]) / (chip.bf16_tflops * 1e12) - \
        slots * p["kv_bytes_per_row_slot"] / (chip.hbm_gbps * 1e9)
    crossover = p["weight_bytes"] / (chip.hbm_gbps * 1e9) / per_row if per_row > 0 else float("inf")
    return dict(bytes=bytes_, flops=flops, t_mem=t_mem, t_compute=t_compute, t=max(t_mem, t_compute),
                crossover=crossover, kv_bytes=batch * slots * p["kv_bytes_per_row_slot"], **p)


def prefill(cfg, chip: Chip, chips: int, batch: int, tokens: int, slots: int) -> float:
    p = per_chip(cfg, chips)
    lm_head = 2 * _split(cfg.vocab_size, chips) * cfg.d_model  # last column only
    flops = batch * (tokens * (p["flops_per_row"] - lm_head) + lm_head + tokens * slots * p["attn_flops_per_row_slot"])
    return max(flops / (chip.bf16_tflops * 1e12), p["weight_bytes"] / (chip.hbm_gbps * 1e9))


def sweep_batches(config_module: str, prompt_tokens: dict[str, int]) -> tuple[list[tuple[int, int]], dict]:
    """[(rows, prompt bucket)] of a sweep config's batches, as `run_sweep` forms them."""
    import importlib

    from jax_introspect.experiment import sweep
    config = importlib.import_module(config_module).get_config()
    trials = sweep.plan_trials(config, list(config.words), list(config.layers))
    size, out = config.batch_size, []
    for i in range(0, len(trials), size):
        batch = trials[i:i + size]
        longest = max(prompt_tokens[t.protocol] for t in batch)
        out.append((size, -(-longest // 32) * 32))  # padded to batch_size, prompt to the 32-token bucket
    return out, config


def llama3_prompt_tokens(protocol_names: Sequence[str], system_header: bool = True) -> dict[str, int]:
    from jax_introspect.experiment import protocols
    from jax_introspect import tokenizer as tok_lib
    tok = tok_lib.from_tiktoken_model(tok_lib.llama3_tokenizer_model_path())
    return {n: len(tok.encode(tok.chat_prompt(protocols.protocol(n)["messages"], system_header=system_header)))
            for n in protocol_names}


def sweep_time(cfg, chip: Chip, chips: int, batches: list[tuple[int, int]], new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s) over all batches; every batch runs all `new_tokens` steps."""
    pre = dec = 0.0
    for rows, bucket in batches:
        pre += prefill(cfg, chip, chips, rows, bucket, bucket)  # prefill's cache holds only the prompt
        dec += new_tokens * decode_step(cfg, chip, chips, rows, bucket + new_tokens)["t"]
    return pre, dec


SWEEPS = ("configs.sweeps.replication_405b_canonical", "configs.sweeps.replication_405b_layers")


def markdown(batch: int = 32, slots: int = 292) -> str:
    from jax_introspect import config as config_lib
    lines = [f"#### Decode roofline, batch {batch}, {slots} KV slots (Lindsey's prompt, 192-token bucket + 100 new)", "",
             "Per step, per chip (all chips work in parallel); bf16; lower bounds (no collectives, no host overhead).", ""]
    body = []
    for model, slices in SLICES.items():
        cfg = config_lib.preset(model)
        for name, gen, chips in slices:
            chip = CHIPS[gen]
            s = decode_step(cfg, chip, chips, batch, slots)
            b1 = decode_step(cfg, chip, chips, 1, slots)
            bound = "memory" if s["t_mem"] >= s["t_compute"] else "compute"
            body.append([model, f"{name} ({chips} chips)", f"{s['weight_bytes'] / 1e9:.2f}", f"{s['kv_bytes'] / 1e9:.2f}",
                         f"{s['t_mem'] * 1e3:.2f}", f"{s['t_compute'] * 1e3:.2f}", bound,
                         f"{batch / s['t']:,.0f}", f"{1 / b1['t']:,.0f}",
                         f"{s['crossover']:,.0f}" if math.isfinite(s["crossover"]) else "never (KV grows as fast)"])
    lines.append(common.table(["model", "slice", "weights GB/chip", "KV GB/chip", "memory ms", "compute ms", "bound",
                               f"tok/s at B={batch}", "tok/s at B=1", "batch where compute takes over"], body, "llrrrrlrrr"))
    # The replication's sweeps on the 405B slices.
    try:
        prompt_tokens = llama3_prompt_tokens(("replication_405b_injected_thought", "replication_405b_thinking_about"))
        tok_note = "prompt lengths from Meta's Llama-3 tokenizer"
    except FileNotFoundError as e:  # the llama-models wheel is missing: use the lengths measured with it
        prompt_tokens = {"replication_405b_injected_thought": 172, "replication_405b_thinking_about": 41}
        tok_note = f"prompt lengths 172 / 41 (tokenizer unavailable: {type(e).__name__})"
    cfg = config_lib.preset("llama-3.1-405b")
    lines += ["", "#### Predicted time of the 405B replication's sweeps (generation only, roofline lower bound)", "",
              f"Every batch padded to its batch size and run for all its new tokens (no early stop); {tok_note}: "
              f"{', '.join(f'{k} {v}' for k, v in prompt_tokens.items())}. Not included: checkpoint load, compile, "
              "vector extraction, grading, collectives.", ""]
    body = []
    for module in SWEEPS:
        batches, config = sweep_batches(module, prompt_tokens)
        for name, gen, chips in SLICES["llama-3.1-405b"]:
            pre, dec = sweep_time(cfg, CHIPS[gen], chips, batches, config.max_new_tokens)
            body.append([module.rsplit(".", 1)[1], f"{len(batches)} x {config.batch_size}",
                         config.max_new_tokens, f"{name} ({chips} chips)", f"{pre:.0f}", f"{dec:.0f}",
                         f"{(pre + dec) / 60:.1f}"])
    lines.append(common.table(["sweep", "batches x rows", "new tokens", "slice", "prefill s", "decode s",
                               "total min"], body, "lrrlrrr"))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--slots", type=int, default=292)
    args = parser.parse_args(argv)
    common.quiet_libraries()
    print(markdown(args.batch, args.slots))


if __name__ == "__main__":
    main()
