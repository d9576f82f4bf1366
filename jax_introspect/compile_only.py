"""Compile the model's programs for a Cloud TPU slice on a CPU host, and read what they need.

`libtpu` (the `tpu` extra: `pip install -e '.[tpu]'`, i.e. `jax[tpu]` at the installed jax's
version) gives compile-only TPU topologies with no TPU attached
(`jax.experimental.topologies.get_topology_desc`), the way MaxText's `train_compile.py` compiles
for a slice from a CPU machine. Parameters and inputs are abstract (`jax.ShapeDtypeStruct` with
the layout's shardings): no weight is read. From a compiled program this module reads

- `ProgramMemory`: XLA's per-chip `memory_analysis()` (arguments, outputs, temp, aliased) — the
  figures that decide whether a program fits a chip's HBM (a CPU backend's temp says nothing
  about a TPU's: its layouts and fusions differ);
- `stacked_weight_copies`: instructions in the compiled HLO that produce a whole per-chip shard
  of a stacked (all-layers) weight other than the parameter itself, i.e. XLA copying a whole
  weight stack (e.g. to change its layout) instead of reading one layer per scan step.

The model side only: the experiment side (`experiment/plan.py`) composes a sweep's programs.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect import generate as generate_lib
from jax_introspect import inject as inject_lib
from jax_introspect import model as model_lib
from jax_introspect import params as params_lib
from jax_introspect.config import ModelConfig


class CompileOnlyError(RuntimeError):
    """No compile-only TPU topology can be had (libtpu missing or refusing the name)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures of a TPU generation (Cloud TPU documentation)."""

    generation: str  # v4 | v5e | v5p | v6e
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    bf16_flops: float  # peak dense bf16 FLOP/s


GiB = 1 << 30
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 1228e9, 275e12),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 819e9, 197e12),
    "TPU v5": Chip("v5p", 95 * GiB, 2765e9, 459e12),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 1640e9, 918e12),
}


def _install_hint() -> str:
    return (f"pip install 'jax[tpu]=={jax.__version__}' (or `pip install -e '.[tpu]'`): libtpu gives "
            "compile-only TPU topologies on a CPU host")


def tpu_devices(topology: str) -> list:
    """The devices of a compile-only TPU topology, e.g. 'v5p:2x4x4' (32 chips), 'v6e:8x8'."""
    try:
        import libtpu  # noqa: F401  (the package jax's TPU plugin loads)
    except ImportError:
        raise CompileOnlyError(f"libtpu is not installed: {_install_hint()}") from None
    # libtpu takes a lockfile per process unless told that several may load it (pytest workers,
    # two plans at once); nothing here runs on a TPU, so they cannot conflict.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # libtpu raises XlaRuntimeError / RuntimeError / ValueError by version
        raise CompileOnlyError(f"libtpu ({_install_hint()}) gives no topology {topology!r}: {e}. Names look like "
                               "'v5p:2x4x4' (chips per axis), 'v6e:8x8', 'v5e:16x16'") from e


def chip_of(devices: Sequence) -> Chip:
    kind = devices[0].device_kind
    try:
        return CHIPS[kind]
    except KeyError:
        raise CompileOnlyError(f"no HBM figures for device kind {kind!r}; known: {sorted(CHIPS)}") from None


# --- abstract inputs ---------------------------------------------------------------------------

def abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def like(tree, shardings):
    """Host arrays (small: injections, sampling settings) -> ShapeDtypeStructs with `shardings`."""
    return jax.tree.map(lambda x, s: abstract(np.shape(x), np.asarray(x).dtype, s), tree, shardings)


def abstract_params(cfg: ModelConfig, layout, dtype) -> model_lib.Params:
    """The parameters a model of `cfg` (its run config: KV heads as held, numerics applied) has on
    `layout`, as shapes, dtypes (FP8 weights and their float32 scales as stored) and shardings."""
    return model_lib.params_tree(cfg, lambda leaf: abstract(
        leaf.param_shape(cfg), params_lib.stored_dtype(leaf, cfg, dtype), layout.sharding(*leaf.param_axes)))


def param_bytes_per_chip(params) -> int:
    """Bytes of the parameters one device holds (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(params):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total


def generation_inputs(cfg: ModelConfig, layout, batch: int, prompt_len: int, n_eos: int = 2) -> tuple:
    """(tokens, token_valid, injection, sampling, eos_ids, pad_id) of `generate.generate_tokens`."""
    tokens = abstract((batch, prompt_len), jnp.int32, layout.of("tokens"))
    valid = abstract((batch, prompt_len), jnp.bool_, layout.of("tokens"))
    injection = like(inject_lib.none(batch, cfg.d_model), layout.injection())
    sample = like(generate_lib.sampling(batch, keys=np.zeros((batch, 2), np.uint32)), layout.sampling())
    return (tokens, valid, injection, sample, abstract((n_eos,), jnp.int32, layout.replicated),
            abstract((), jnp.int32, layout.replicated))


def kv_cache_bytes_per_chip(cfg: ModelConfig, layout, batch: int, slots: int, dtype) -> int:
    """The generation program's KV cache on one device (held in XLA temp: it lives inside the program)."""
    cache = model_lib.KVCache(
        k=abstract((cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, slots), dtype, None),
        v=abstract((cfg.n_layers, batch, cfg.n_kv_heads, slots, cfg.head_dim), dtype, None),
        valid=abstract((batch, slots), jnp.bool_, None), length=abstract((), jnp.int32, None))
    shardings = layout.cache()
    return sum(int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(cache), jax.tree.leaves(shardings)))


# --- reading a compiled program ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """XLA's `memory_analysis()` of one compiled program, per device, in bytes."""

    arguments: int
    outputs: int
    temp: int
    aliased: int
    code: int

    @classmethod
    def of(cls, compiled) -> "ProgramMemory":
        m = compiled.memory_analysis()
        return cls(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                   temp=int(m.temp_size_in_bytes), aliased=int(m.alias_size_in_bytes),
                   code=int(m.generated_code_size_in_bytes))

    @property
    def total(self) -> int:
        """Peak HBM of the program: its inputs, outputs (less those aliasing inputs) and scratch."""
        return self.arguments + self.outputs - self.aliased + self.temp


_HLO_DTYPES = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "float8_e4m3fn": "f8e4m3fn",
               "int8": "s8", "int32": "s32"}
# Ops that name a buffer without making one: the parameter, tuple plumbing, reinterpretations.
_NOT_A_COPY = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "opt-barrier"}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_FUSION_CALL = re.compile(r"\sfusion\(.*?calls=%?([\w.\-]+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\](\{[^}]*\})?\s+([a-z][\w\-]*)\(")


_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4,
             "u32": 4, "f64": 8, "s64": 8}


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One array-valued instruction of a compiled module that makes a buffer of its own."""

    instruction: str  # HLO instruction name
    opcode: str
    dtype: str  # HLO dtype name (bf16, f32, ...)
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * _ITEMSIZE.get(self.dtype, 4)


def instructions(hlo_text: str):
    """(computation, name, dtype, shape, opcode, line) of each array-valued instruction of an HLO
    module's text, in order."""
    computation = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if m:
            name, dtype, dims, _layout, opcode = m.groups()
            yield computation, name, dtype, tuple(int(d) for d in dims.split(",") if d), opcode, line


def buffers(hlo_text: str) -> list[Buffer]:
    """The array results of a compiled (per-device) HLO module's instructions outside fusions, less
    the parameters and tuple plumbing that only name other buffers (`_NOT_A_COPY`). Instructions
    inside a fusion's computation run in registers/VMEM as the fusion runs (a slice of a re-tiled
    stack is read tile by tile): only the fusion's own result is a buffer."""
    fused = set(_FUSION_CALL.findall(hlo_text))
    return [Buffer(name, opcode, dtype, shape) for computation, name, dtype, shape, opcode, _ in instructions(hlo_text)
            if computation not in fused and opcode not in _NOT_A_COPY]


@dataclasses.dataclass(frozen=True)
class WeightCopy:
    weight: str  # the stacked weight (params.py name)
    instruction: str  # HLO instruction name
    opcode: str
    shape: tuple
    nbytes: int


def stacked_weight_shards(params) -> dict:
    """(HLO dtype, per-device shard shape) -> weight names, for every stacked (per-layer) linear
    weight: the matrices, which are nearly all of a model's bytes (the norms' [L, D] stacks are
    < 0.01% of them, and XLA may convert them whole to float32)."""
    out: dict = {}
    linear = {leaf.name for leaf in params_lib.LINEAR}
    for name in dataclasses.fields(model_lib.LayerParams):
        leaf = getattr(params.layers, name.name)
        if leaf is None or name.name not in linear:
            continue
        key = (_HLO_DTYPES.get(jnp.dtype(leaf.dtype).name, jnp.dtype(leaf.dtype).name),
               tuple(leaf.sharding.shard_shape(leaf.shape)))
        out.setdefault(key, []).append(name.name)
    return out


def stacked_weight_copies(hlo_text: str, params) -> list[WeightCopy]:
    """Buffers of a compiled (per-device) HLO module with the dtype and shape of a whole stacked
    weight shard (`params`: the abstract parameters it was compiled with) that are not that
    parameter passing through: copies, transposes, fusions, async slices of the whole stack. A
    program that reads one layer per scan step has none."""
    shards = stacked_weight_shards(params)
    return [WeightCopy("|".join(shards[(b.dtype, b.shape)]), b.instruction, b.opcode, b.shape, b.nbytes)
            for b in buffers(hlo_text) if (b.dtype, b.shape) in shards]


def largest_buffers(hlo_text: str, n: int = 10) -> list[tuple[int, str, str]]:
    """The `n` largest buffers of the compiled program (`buffers`): (bytes, 'dtype[shape]', opcode).
    Not a liveness analysis (`memory_analysis().temp` is the peak): it says what the temp is made of."""
    sizes = [(b.nbytes, f"{b.dtype}[{','.join(map(str, b.shape))}]", b.opcode) for b in buffers(hlo_text)]
    return sorted(sizes, reverse=True)[:n]


def compile_generation(params, cfg: ModelConfig, layout, batch: int, prompt_len: int, max_new_tokens: int,
                       adapter=None):
    """`generate.generate_tokens` lowered and compiled for `layout`'s devices with abstract inputs."""
    lowered = generate_lib.generate_tokens.lower(params, cfg, *generation_inputs(cfg, layout, batch, prompt_len),
                                                 max_new_tokens, layout=layout, adapter=adapter)
    return lowered.compile()


def engine_inputs(cfg: ModelConfig, layout, slots: int, trials: int, prefix_len: int, suffix_len: int,
                  n_eos: int = 2, lens_width: int = 0) -> tuple:
    """The arguments of `engine.run` after (params, cfg), as `LanguageModel.generate_shared` places
    them: the cells (room for one per trial, whole blocks of `slots`) split over the data axis, the
    rest replicated; the readout's per-cell inputs (`engine.cell_readout_inputs`) with `lens_width`
    lens layers per cell (0: no readout)."""
    from jax_introspect import lens
    cells = -(-trials // slots) * slots
    rep = layout.replicated
    scalar = abstract((), jnp.int32, rep)
    sample = generate_lib.sampling(trials, keys=np.zeros((trials, 2), np.uint32))
    readout = None if not lens_width else (
        abstract((cells, lens_width), jnp.int32, rep), abstract((cells, lens.WORD_FORMS), jnp.int32, rep),
        abstract((cfg.vocab_size,), jnp.float32, rep), abstract((cfg.vocab_size,), jnp.float32, rep))
    return (abstract((1, prefix_len), jnp.int32, rep),
            abstract((cells, suffix_len), jnp.int32, layout.of("tokens")),
            abstract((cells, suffix_len), jnp.bool_, layout.of("tokens")),
            like(inject_lib.none(cells, cfg.d_model), layout.injection()),
            abstract((cells,), jnp.int32, rep), abstract((cells,), jnp.int32, rep), scalar,
            abstract((trials,), jnp.int32, rep),
            like(sample, jax.tree.map(lambda _: rep, sample)), scalar, abstract((n_eos,), jnp.int32, rep), scalar,
            readout)


def compile_engine(params, cfg: ModelConfig, layout, slots: int, trials: int, prefix_len: int, suffix_len: int,
                   max_new_tokens: int, refill_min: Optional[int] = None, adapter=None, lens_width: int = 0,
                   top_k: int = 0, prefill_block: int = 0, share_depth: bool = False):
    """The sweep engine's program (`engine.run`: `slots` rows decoding, `trials` per call, a shared
    prefix of `prefix_len` tokens, cell suffixes of `suffix_len` prefilled `prefill_block` at a time
    (0: `engine.prefill_block`'s choice, as `LanguageModel.generate_shared` makes it), with depth
    shared (`share_depth`: a sweep's `share_depth`, for calls of one prompt); the first-answer-token
    readout of `lens_width` lens layers and `top_k` per cell, 0: none) compiled for `layout`'s
    devices."""
    from jax_introspect import engine
    lowered = engine.run.lower(params, cfg, *engine_inputs(cfg, layout, slots, trials, prefix_len, suffix_len,
                                                           lens_width=lens_width),
                               max_new_tokens=max_new_tokens, slots=slots,
                               refill_min=max(1, slots // 8) if refill_min is None else refill_min, layout=layout,
                               adapter=adapter, readout_top_k=top_k,
                               prefill_block=prefill_block or engine.prefill_block(slots, suffix_len,
                                                                                   layout.data_size),
                               share_depth=share_depth)
    return lowered.compile()


def compile_prefill(params, cfg: ModelConfig, layout, batch: int, prompt_len: int, return_residuals: bool = True,
                    adapter=None):
    """The prefill program of `LanguageModel.residuals` (vector extraction) / `.logits`."""
    from jax_introspect import lm as lm_lib
    tokens, valid, injection = generation_inputs(cfg, layout, batch, prompt_len)[:3]
    return lm_lib._prefill.lower(params, cfg, tokens, valid, injection, return_residuals, layout,
                                 adapter).compile()


def hlo_text(compiled) -> str:
    return compiled.as_text()


def describe(memory: ProgramMemory, chip: Optional[Chip] = None) -> str:
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    text = (f"arguments {gb(memory.arguments)}, outputs {gb(memory.outputs)}, temp {gb(memory.temp)}, "
            f"total {gb(memory.total)}")
    if chip is not None:
        text += f" of {gb(chip.hbm_bytes)} HBM ({100 * memory.total / chip.hbm_bytes:.0f}%)"
    return text
