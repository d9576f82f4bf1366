"""The generation and extraction programs compiled for a Cloud TPU slice on this CPU host (libtpu's
compile-only topologies, the `tpu` extra): XLA reads one layer of each stacked weight per scan
step and never copies a whole stack.

The sizes are where the weight layout of checkpoint format v1 made XLA copy whole stacks (the
same copies as the 405B on v6e-64, docs/tpu.md): Llama-3.1-8B widths, 16 layers, an MLP of 3,328
so that a chip's slice (832 rows on 4 chips) is no multiple of the TPU's 128-wide tiles. There,
format v1's generation program (32 rows x 192 prompt tokens + 100 new) held 6 whole-stack copies
per chip (wq 134 MB, wk and wv 34 MB each, w_gate and w_up 109 MB each): XLA temp 0.62 GB next to
1.19 GB of weights; with the v2 layouts none, 0.19 GB. The copies come from the weights' layouts,
not from the batch: at the 8 rows x 64 tokens + 16 new compiled here (a third of the compile
time), v1's layouts still give the same 6 copies and 0.37 GB of temp, v2 none and 0.003 GB
(`python -m benchmarks.tpu_layouts --model=llama-3.1-8b --layers=16 --d_ff=3328
--slices=v6e:2x2/1x4 --batch=8 --prompt_len=64 --max_new_tokens=16`, 2026-12-02; FP8-dynamic with
v1's layouts: wq, w_gate and w_up copied, temp 0.12 GB).
No TPU is needed; if libtpu cannot load, the test fails saying what to install.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from jax_introspect import compile_only, config, engine, sharding

TOPOLOGY, MESH = "v6e:2x2", "1x4"


@pytest.fixture(scope="module")
def slice_layout():
    devices = compile_only.tpu_devices(TOPOLOGY)  # CompileOnlyError with the install hint if no libtpu
    cfg = dataclasses.replace(config.preset("llama-3.1-8b"), n_layers=16, d_ff=3328)
    layout = sharding.Layout.for_model(sharding.make_mesh(MESH, devices), cfg)
    return cfg, layout, compile_only.chip_of(devices)


@pytest.mark.parametrize("numerics", ["dequantized", "fp8_dynamic"])
def test_generation_reads_weight_stacks_in_place(slice_layout, numerics):
    cfg, layout, chip = slice_layout
    if numerics == "fp8_dynamic":
        cfg = dataclasses.replace(cfg, quantization=config.Quantization(
            weights=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")))
    run_cfg = config.with_numerics(layout.run_config(cfg), numerics)
    params = compile_only.abstract_params(run_cfg, layout, jnp.bfloat16)
    compiled = compile_only.compile_generation(params, run_cfg, layout, batch=8, prompt_len=64, max_new_tokens=16)
    copies = compile_only.stacked_weight_copies(compiled.as_text(), params)
    memory = compile_only.ProgramMemory.of(compiled)
    print(numerics, compile_only.describe(memory, chip), f"copies {copies}")
    assert chip.generation == "v6e"
    assert not copies, f"XLA copies whole weight stacks: {copies}"
    # Arguments are the weights plus a few KB of per-row inputs; nothing else of weight size.
    weights = compile_only.param_bytes_per_chip(params)
    assert weights <= memory.arguments <= weights + (1 << 20)
    kv = compile_only.kv_cache_bytes_per_chip(run_cfg, layout, 8, 64 + 16, jnp.bfloat16)
    assert memory.temp < kv + 0.25 * weights, (memory, kv)


def test_the_sweep_engine_compiles_for_the_slice_and_reads_weight_stacks_in_place(slice_layout):
    """The engine's program (per-row cache writes, cell gathers, refills) on the TPU slice: Lindsey's
    prompt as a 160-token shared prefix + 32-token suffixes, 32 slots, 128 trials per call, 100 new
    tokens. No whole-stack copies, and no copies of the slots' KV cache: the slots hold only their
    suffix and answer columns (132, the prefix is read from its one batch-1 cache), a refill
    scatters the new trials' rows into the cache in place, and the cell store keeps keys [.., Ls, hd]
    (a [.., hd, Ls] store padded its 32-wide minor axis to 128 lanes). XLA temp measured 0.10 GB per
    chip (plain generation of 32 rows: 0.19 GB); before those three changes 0.73 GB (about five
    copies of a 292-column slot cache: the while loop carried it through the refill conditional in
    another layout, and a 4x-padded copy of the store). The bound, twice the slots' cache and the
    cell store, catches any such copy. The program includes the first-answer-token readout in the
    cell prefill, as a sweep runs it (readout=True: 4 lens layers per cell, top 10): 0.13 GB; and
    with depth sharing, the sweep's default since 2026-12-01 (the prompt's clean forward keeps its
    residuals, [16, 1, 32, 4096], for the blocks to resume from). A cell block's cache is written
    in place: until 2026-12-02 every layer below a block's resume layer passed the block's whole
    cache (all 16 layers) through `model.forward`'s cond, and XLA copied it at each such layer
    (copy.654/655 here; for the 405B at layer 84 of 126, 84 copies of the block's cache per block)."""
    cfg, layout, chip = slice_layout
    run_cfg = layout.run_config(cfg)
    params = compile_only.abstract_params(run_cfg, layout, jnp.bfloat16)
    compiled = compile_only.compile_engine(params, run_cfg, layout, slots=32, trials=128, prefix_len=160,
                                           suffix_len=32, max_new_tokens=100, lens_width=4, top_k=10,
                                           share_depth=True)
    text = compiled.as_text()
    assert not compile_only.stacked_weight_copies(text, params)
    # A cell block's cache (every layer's) is written in place: the layers that resume from the clean
    # forward once passed it through a cond, and XLA copied it whole at each of them.
    block = engine.prefill_block(32, 32, layout.data_size)
    shard = layout.of("cache_k").shard_shape((cfg.n_layers, block, cfg.n_kv_heads, cfg.head_dim, 32))
    block_caches = {shard, shard[:3] + shard[3:][::-1]}
    copies = [b for b in compile_only.buffers(text) if b.opcode == "copy" and b.shape in block_caches]
    assert not copies, f"XLA copies a cell block's whole cache: {copies}"
    memory = compile_only.ProgramMemory.of(compiled)
    weights = compile_only.param_bytes_per_chip(params)
    slots_cache = compile_only.kv_cache_bytes_per_chip(run_cfg, layout, 32, 32 + 100, jnp.bfloat16)
    store = compile_only.kv_cache_bytes_per_chip(run_cfg, layout, 128, 32, jnp.bfloat16)
    print("engine", compile_only.describe(memory, chip), f"slots' cache {slots_cache / 1e9:.3f} GB, "
          f"cell store {store / 1e9:.3f} GB")
    # Arguments: the weights and per-row inputs (the cells' injection vectors: 128 x 4096 float32 = 2 MB).
    assert weights <= memory.arguments <= weights + (4 << 20)
    assert memory.temp < 2 * (slots_cache + store), (memory, slots_cache, store)


def test_the_readout_keeps_one_residual_column_per_layer(slice_layout):
    """The first-answer-token readout's forward (experiment/readout.py) on the slice, with the
    replication's window (no shared prefix: a 192-token suffix per row), 32 rows: it keeps each
    layer's residual at the last position only. Keeping every position's
    ([16, 32, 192, 4096] bf16 = 0.81 GB per chip here, the hidden state being whole on every chip)
    measured XLA temp 1.04 GB, one column 0.24 GB; for the 405B's 126 layers at d_model 16384 it
    would be 25 GB per chip, more than a v6e chip's HBM less its weights. The bound, half the
    all-position residuals, fails on that."""
    from jax_introspect.experiment import readout
    cfg, layout, _ = slice_layout
    run_cfg = layout.run_config(cfg)
    params = compile_only.abstract_params(run_cfg, layout, jnp.bfloat16)
    compiled = readout.compile_for(params, run_cfg, layout, rows=32, prefix_len=0, suffix_len=192)
    assert not compile_only.stacked_weight_copies(compiled.as_text(), params)
    memory = compile_only.ProgramMemory.of(compiled)
    all_positions = cfg.n_layers * 32 * 192 * cfg.d_model * 2
    print("readout", compile_only.describe(memory), f"all-position residuals {all_positions / 1e9:.2f} GB")
    assert memory.temp < all_positions / 2, (memory, all_positions)


def test_extraction_prefill_reads_weight_stacks_in_place(slice_layout):
    cfg, layout, _ = slice_layout
    run_cfg = layout.run_config(cfg)
    params = compile_only.abstract_params(run_cfg, layout, jnp.bfloat16)
    compiled = compile_only.compile_prefill(params, run_cfg, layout, batch=16, prompt_len=64)
    assert not compile_only.stacked_weight_copies(compiled.as_text(), params)


def test_the_check_sees_a_whole_stack_buffer(slice_layout):
    """The detector on a program that must make a buffer of a whole stack: w_gate scaled by 2."""
    import jax
    cfg, layout, _ = slice_layout
    params = compile_only.abstract_params(layout.run_config(cfg), layout, jnp.bfloat16)
    w = params.layers.w_gate
    compiled = jax.jit(lambda x: x * 2, out_shardings=w.sharding).lower(w).compile()
    found = compile_only.stacked_weight_copies(compiled.as_text(), params)
    assert any("w_gate" in c.weight and c.shape == tuple(w.sharding.shard_shape(w.shape)) for c in found), found
