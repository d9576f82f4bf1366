"""Llama-3.x decoder as pure functions over stacked parameters.

Every decoder layer's weights carry a leading `[n_layers]` axis and the layers run as one
`jax.lax.scan`, so compile time does not grow with depth. The computation follows HF
transformers' `LlamaForCausalLM` op for op (rotate-half RoPE, RMSNorm in float32, softmax in
float32) so that float32 logits agree to round-off.

Batches are left-padded: every row's last prompt token sits in the same column, so one cache
index serves the whole batch. Pad slots are masked out of attention and do not advance RoPE
positions.

A linear weight that comes with a scale (an FP8 checkpoint run with numerics 'fp8_dynamic') is
float8_e4m3fn and runs as vLLM's FP8-dynamic layers do (`fp8_dynamic_einsum`); whether a weight
has a scale is part of the parameter pytree's structure, so it is fixed at trace time.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect import adapters as adapters_lib
from jax_introspect import inject
from jax_introspect import params as params_lib
from jax_introspect.config import ModelConfig
from jax_introspect.inject import Injection


@flax.struct.dataclass
class LayerParams:
    """Weights of all decoder layers, stacked on a leading layer axis. Each field's axes, shape and
    HF tensor are declared in `params.LAYER` (tests/test_model_structure.py keeps the two equal)."""

    attn_norm: jax.Array
    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    mlp_norm: jax.Array
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    # Per-output-channel scales of FP8 weights (float32, the weight's output axes); None: unquantized.
    wq_scale: Optional[jax.Array] = None
    wk_scale: Optional[jax.Array] = None
    wv_scale: Optional[jax.Array] = None
    wo_scale: Optional[jax.Array] = None
    w_gate_scale: Optional[jax.Array] = None
    w_up_scale: Optional[jax.Array] = None
    w_down_scale: Optional[jax.Array] = None


@flax.struct.dataclass
class Params:
    """The decoder layers and the weights outside them (declared in `params.GLOBAL`)."""

    embed: jax.Array
    layers: LayerParams
    final_norm: jax.Array
    lm_head: Optional[jax.Array]  # None when tied to `embed`
    lm_head_scale: Optional[jax.Array] = None  # an FP8 lm_head's scales


def params_tree(cfg: ModelConfig, value: Callable[[params_lib.Leaf], Any]) -> Params:
    """A `Params` holding `value(leaf)` for every leaf `cfg` has (shapes, shardings, arrays...);
    `lm_head` is None when tied, the scales None unless `cfg` quantizes their weights."""
    layers = LayerParams(**{leaf.name: value(leaf) for leaf in params_lib.layer_leaves(cfg)})
    globals_ = {leaf.name: value(leaf) for leaf in params_lib.global_leaves(cfg)}
    return Params(layers=layers, lm_head=globals_.pop("lm_head", None), **globals_)


@flax.struct.dataclass
class KVCache:
    """Head-major: each (row, KV head) owns a contiguous block, so a decode step's attention is a
    batched matrix-vector product with no transpose of the cache (keys are stored transposed,
    `[hd, S]`, so both products read the cache in its stored order; docs/performance.md)."""

    k: jax.Array  # [L, B, K, hd, S], keys after RoPE
    v: jax.Array  # [L, B, K, S, hd]
    valid: jax.Array  # [B, S] bool: slot holds a real (non-pad) token
    # int32 scalar: slots written so far (the same for every row); or [B], each row's next slot (the
    # sweep engine's slots, which run at their own steps: one token per row per call)
    length: jax.Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
    L, K, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    return KVCache(k=jnp.zeros((L, batch, K, hd, max_len), dtype),
                   v=jnp.zeros((L, batch, K, max_len, hd), dtype),
                   valid=jnp.zeros((batch, max_len), bool), length=jnp.zeros((), jnp.int32))


def extend_cache(cache: KVCache, extra: int) -> KVCache:
    """The same cache with `extra` empty slots appended. Generation prefills into a cache exactly
    as long as the prompt (so prefill attends to no empty slots) and then makes room to decode."""
    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)
    return KVCache(k=pad(cache.k, 4), v=pad(cache.v, 3), valid=pad(cache.valid, 1), length=cache.length)


# --- building blocks ---------------------------------------------------------------------------

def _precision(dtype):
    # TPUs run float32 matmuls as bf16 passes unless told otherwise; float32 parity needs HIGHEST.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
# vLLM's floor on a dynamic token scale (1 / (448 * 512)): an all-zero token divides by no zero.
_MIN_TOKEN_SCALE = 1.0 / (E4M3_MAX * 512.0)


def quantize_per_token(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """FP8-dynamic activation quantization, as vLLM's per-token kernel does it: each token's
    features (`axes`) share the scale amax / 448, and x / scale is rounded to the nearest
    float8_e4m3fn. Returns (x_q float8_e4m3fn, scale float32 with `axes` kept as size 1)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=axes, keepdims=True) / E4M3_MAX, _MIN_TOKEN_SCALE)
    return jnp.clip(x32 / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn), scale


def fp8_dynamic_einsum(spec: str, x: jax.Array, w: jax.Array, w_scale: jax.Array) -> jax.Array:
    """`x @ w` (the einsum `spec`, x first, output = x's free axes then w's) as an FP8-dynamic
    linear layer: x quantized per token over the axes the einsum sums, multiplied with the
    float8_e4m3fn weights `w` accumulating in float32, then scaled by the token's scale and the
    output channel's `w_scale` (w's output axes), and cast to x's dtype (vLLM's cutlass_scaled_mm)."""
    operands, out = spec.split("->")
    x_axes = operands.split(",")[0]
    summed = tuple(i for i, a in enumerate(x_axes) if a not in out)
    free = "".join(a for a in x_axes if a in out)
    if not out.startswith(free):
        raise ValueError(f"einsum {spec!r}: the output must start with the input's free axes")
    x_q, x_scale = quantize_per_token(x, summed)
    # e4m3 values are exact in bfloat16 and so are their products in float32: a bf16 x bf16 matmul
    # accumulating in float32 is the fp8 GEMM, native on TPU and GPU alike.
    acc = jnp.einsum(spec, x_q.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    # The token's scale on the output: its free axes, then size 1 over w's output axes.
    token_scale = x_scale.reshape(tuple(n for i, n in enumerate(x.shape) if i not in summed)
                                  + (1,) * (len(out) - len(free)))
    return (acc * token_scale * w_scale).astype(x.dtype)


def linear(spec: str, x: jax.Array, w: jax.Array, w_scale: Optional[jax.Array], precision) -> jax.Array:
    """`x @ w` as the einsum `spec`; FP8-dynamic when the weight comes with its scale."""
    if w_scale is None:
        return jnp.einsum(spec, x, w, precision=precision)
    return fp8_dynamic_einsum(spec, x, w, w_scale)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies in float32, with Llama-3.1's piecewise scaling if configured."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv
    wavelen = 2 * np.pi / inv
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > low_freq_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(inv_freq: np.ndarray, positions: jax.Array, dtype):
    """cos/sin tables [B, T, hd] for rotate-half RoPE (HF layout: both halves share frequencies)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, hd]; cos/sin: [B, T, hd]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _attention(cfg: ModelConfig, q, k_cache, v_cache, mask, prefix_kv=None):
    """q: [B, T, H, hd]; k_cache: [B, K, hd, S]; v_cache: [B, K, S, hd]; mask: [B, T, S] bool
    -> [B, T, H, hd]. prefix_kv: optional (k [K, hd, P], v [K, P, hd]), columns that precede every
    row's cache and every query sees (a shared prefix): one softmax over [prefix | cache], the
    prefix's keys and values read once for the whole batch."""
    B, T, H, hd = q.shape
    prec = _precision(q.dtype)
    K, G = cfg.n_kv_heads, cfg.q_per_kv  # q head h uses kv head h // G
    # The G query heads and T queries of a KV head are the rows of one matmul against its cache.
    q = q.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, hd)
    scores = jnp.einsum("bkmd,bkds->bkms", q, k_cache, precision=prec)
    if prefix_kv is not None:
        # Against the shared prefix every row's queries of a KV head are the rows of one matmul
        # (M = B*G*T), not B matrix-vector products over B copies of it.
        prefix_scores = jnp.einsum("bkmd,kdp->bkmp", q, prefix_kv[0], precision=prec)
        scores = jnp.concatenate([prefix_scores, scores], axis=-1)
        mask = jnp.concatenate([jnp.ones(mask.shape[:2] + (prefix_kv[0].shape[-1],), bool), mask], axis=-1)
    scores = (scores * (hd ** -0.5)).reshape(B, K, G, T, -1).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype).reshape(B, K, G * T, -1)
    if prefix_kv is None:
        out = jnp.einsum("bkms,bksd->bkmd", probs, v_cache, precision=prec)
    else:
        P = prefix_kv[1].shape[1]
        out = (jnp.einsum("bkmp,kpd->bkmd", probs[..., :P], prefix_kv[1], precision=prec)
               + jnp.einsum("bkms,bksd->bkmd", probs[..., P:], v_cache, precision=prec))
    return out.reshape(B, K, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def _projection(name: str, spec: str, x, layer: LayerParams, precision, adapter=None):
    """The linear layer `name` of one decoder layer (`layer.<name>`, with its FP8 scale if any),
    plus its LoRA term when `adapter` (that layer's slices) adapts it."""
    y = linear(spec, x, getattr(layer, name), getattr(layer, params_lib.scale_name(name)), precision)
    if adapter is not None and name in adapter.lora:
        y = y + adapters_lib.lora_delta(adapter, name, x, precision)
    return y


def _mlp(x, layer: LayerParams, adapter=None):
    prec = _precision(x.dtype)
    # Weights in their stored order (params.py: the order XLA's TPU compiler reads without copying).
    gate = _projection("w_gate", "btd,fd->btf", x, layer, prec, adapter)
    up = _projection("w_up", "btd,fd->btf", x, layer, prec, adapter)
    return _projection("w_down", "btf,fd->btd", jax.nn.silu(gate) * up, layer, prec, adapter)


def attention_mask(cache_valid: jax.Array, start: jax.Array, num_queries: int) -> jax.Array:
    """[B, T, S]: query t (at slot start+t; `start` a scalar, or [B] per row) sees valid slots up
    to its own. A pad query also sees its own slot, so no softmax row is empty (its output is never
    used)."""
    S = cache_valid.shape[1]
    query_slot = jnp.expand_dims(start, -1) + jnp.arange(num_queries)  # [T] or [B, T]
    slot = jnp.arange(S)
    causal = slot <= query_slot[..., None]
    own = slot == query_slot[..., None]
    return (causal & cache_valid[:, None, :]) | own


def _write_cache(k_all, v_all, k, v, index, start):
    """Write this layer's keys k [B, K, hd, T] and values v [B, K, T, hd] into the stacked cache at
    slot `start`: a scalar (every row at the same slot: one slice update), or [B] per-row slots
    (one token per row, T = 1: a scatter of B columns; the sweep engine's slots run at their own
    steps). Returns (k_all, v_all)."""
    if jnp.ndim(start) == 0:
        k_all = jax.lax.dynamic_update_slice(k_all, k[None], (index, 0, 0, 0, start))
        v_all = jax.lax.dynamic_update_slice(v_all, v[None], (index, 0, 0, start, 0))
        return k_all, v_all
    rows = jnp.arange(k.shape[0])
    k_all = k_all.at[index, rows, :, :, start].set(k[..., 0], mode="promise_in_bounds")
    v_all = v_all.at[index, rows, :, start, :].set(v[:, :, 0, :], mode="promise_in_bounds")
    return k_all, v_all


# --- the decoder ------------------------------------------------------------------------------

def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            token_valid: jax.Array, cache: KVCache, *, layout, return_residuals: Union[bool, str] = False,
            injection: Optional[Injection] = None, last_only: bool = False,
            adapter: Optional[adapters_lib.Adapter] = None, prefix: Optional[KVCache] = None,
            resume: Optional[tuple[jax.Array, jax.Array, KVCache]] = None):
    """Run `tokens` [B, T] through the model, appending them to `cache` at slot `cache.length`.

    positions: [B, T] RoPE positions (pad tokens: any value); token_valid: [B, T] bool.
    injection: optional per-row residual-stream additions (see `inject.py`), applied at the
    output of the chosen layer to valid tokens at positions >= the row's start.
    Returns (logits float32 [B, T, V], updated cache, residuals [L, B, T, D] or None). The
    residuals are the raw residual stream after each decoder layer (before the final norm),
    injection included; return_residuals="last": at the last column only, [L, B, 1, D] (a
    readout at the first answer token needs no others, and all columns of every layer are the
    largest temporary of a long prompt's forward).
    layout: the `sharding.Layout` it runs on (one device: a 1x1 mesh); the hidden state, KV cache
    and logits are pinned to its shardings (`with_sharding_constraint`) so GSPMD keeps the
    intended layout.
    last_only: logits of the last column only ([B, 1, V]); generation needs no others, and the
    full [B, T, V] float32 prefill logits are the largest temporary in HBM (docs/tpu.md).
    adapter: optional `adapters.Adapter` (shaped for `cfg`): LoRA on its target projections and
    its residual bias, added after the layer's MLP and before the injection (docs/adapters.md). Its
    per-layer slices ride in the scan with the layer weights. None traces the plain model.
    prefix: optional batch-1 cache (`prefill_prefix`) of tokens that come before every row's
    `cache` columns (a prompt prefix every row shares): every query attends to all of it, and its
    keys and values are read once for the batch instead of from per-row copies (the sweep
    engine's slots). `positions` count from the prefix's start.
    resume: optional (first, clean, clean_cache) to start at layer `first` (traced int32 scalar):
    `clean` [L, 1, T, D] is the residual after each layer of the same tokens run without injection
    or with one that starts at a layer >= `first` (every row's computation below `first` is the
    same as clean's), `clean_cache` that run's cache (batch 1, T wide); layers below `first` are
    skipped, their residual and their keys and values taken from clean's. `cache` must be fresh
    and T wide (the sweep engine's cell blocks: prefill into a prompt-length cache).
    """
    B, T = tokens.shape
    if resume is not None and cache.k.shape[-1] != T:
        raise ValueError(f"forward(resume=) prefills into a fresh cache exactly as wide as its {T} tokens, "
                         f"got {cache.k.shape[-1]} columns")
    dtype = params.embed.dtype
    prec = _precision(dtype)
    start = cache.length
    if jnp.ndim(start) == 0:
        cache_valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, start))
    elif T == 1:  # per-row slots (`engine`): each row writes its one token at its own slot
        cache_valid = cache.valid.at[jnp.arange(B), start].set(token_valid[:, 0], mode="promise_in_bounds")
    else:
        raise ValueError(f"a cache with per-row lengths takes one token per row, got {T}")
    mask = attention_mask(cache_valid, start, T)
    cos, sin = rope_cos_sin(rope_inverse_frequencies(cfg), positions, dtype)

    def project_qkv(h, layer, ad):
        """This layer's queries [B, T, H, hd], keys [B, K, hd, T] and values [B, K, T, hd] (the cache's layouts)."""
        x = rms_norm(h, layer.attn_norm, cfg.rms_norm_eps)
        q = apply_rope(_projection("wq", "btd,hdk->bthk", x, layer, prec, ad), cos, sin)
        k = apply_rope(_projection("wk", "btd,hdk->bthk", x, layer, prec, ad), cos, sin)
        v = _projection("wv", "btd,hdk->bthk", x, layer, prec, ad)
        return q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)

    def attend_and_mlp(h, q, k_layer, v_layer, xs):
        """The rest of the layer, given its queries and its cache's keys and values."""
        layer, index, ad = xs["layer"], xs["index"], xs["adapter"]  # ad: this layer's adapter slices
        prefix_kv = None if xs["prefix"] is None else (xs["prefix"][0][0], xs["prefix"][1][0])
        attn = _attention(cfg, q, k_layer, v_layer, mask, prefix_kv)
        h = h + _projection("wo", "bthk,hkd->btd", attn, layer, prec, ad)
        mlp_out = _mlp(rms_norm(h, layer.mlp_norm, cfg.rms_norm_eps), layer, ad)
        h = h + mlp_out
        if ad is not None:  # the adapter's residual bias, before any injection
            h = h + adapters_lib.bias_delta(ad, h.dtype)
        if injection is not None:
            h = h + inject.residual_delta(injection, index, positions, token_valid, mlp_out, h)
        return layout.pin(h, "hidden")

    def layer_step(carry, xs):
        h, k_all, v_all = carry
        q, k, v = project_qkv(h, xs["layer"], xs["adapter"])
        # The whole cache rides in the carry and is updated in place at this layer's index.
        k_all, v_all = _write_cache(k_all, v_all, k, v, xs["index"], start)
        h = attend_and_mlp(h, q, k_all[xs["index"]], v_all[xs["index"]], xs)
        return h, layout.pin(k_all, "cache_k"), layout.pin(v_all, "cache_v")

    def resumed_step(carry, xs):
        """A layer below `first` takes clean's output and keys and values; one at or above it is
        computed. The cache is fresh and exactly T wide (checked above), so a layer's cache columns
        are its new keys and values: the cond carries this layer's, never the stacks (a cond that
        passed the stacks through made XLA copy both whole at every skipped layer, on CPU and TPU)."""
        h, k_all, v_all = carry

        def computed(h):
            q, k, v = project_qkv(h, xs["layer"], xs["adapter"])
            return attend_and_mlp(h, q, k, v, xs), k, v

        def skipped(h):
            return (layout.pin(jnp.broadcast_to(xs["clean"], h.shape), "hidden"),
                    *(jnp.broadcast_to(c, (B,) + c.shape[1:]) for c in xs["clean_kv"]))

        h, k, v = jax.lax.cond(xs["index"] < resume[0], skipped, computed, h)
        k_all, v_all = _write_cache(k_all, v_all, k, v, xs["index"], start)
        return h, layout.pin(k_all, "cache_k"), layout.pin(v_all, "cache_v")

    def step(carry, xs):
        h, k_all, v_all = (layer_step if resume is None else resumed_step)(carry, xs)
        kept = h[:, -1:] if return_residuals == "last" else h
        return (h, k_all, v_all), (kept if return_residuals else None)

    h = layout.pin(params.embed[tokens], "hidden")
    xs = {"layer": params.layers, "index": jnp.arange(cfg.n_layers), "adapter": adapter,
          "prefix": None if prefix is None else (prefix.k, prefix.v),
          "clean": None if resume is None else resume[1].astype(h.dtype),
          "clean_kv": None if resume is None else (resume[2].k, resume[2].v)}
    (h, k_all, v_all), residuals = jax.lax.scan(step, (h, cache.k, cache.v), xs)
    if last_only:
        h = h[:, -1:]
    h = rms_norm(h, params.final_norm, cfg.rms_norm_eps)
    head = params.embed.T if params.lm_head is None else params.lm_head
    logits = layout.pin(linear("btd,dv->btv", h, head, params.lm_head_scale, prec).astype(jnp.float32), "logits")
    new_cache = KVCache(k=k_all, v=v_all, valid=cache_valid, length=start + T)
    return logits, new_cache, residuals


def prefill_prefix(params: Params, cfg: ModelConfig, tokens: jax.Array, *, layout,
                   adapter: Optional[adapters_lib.Adapter] = None) -> Optional[KVCache]:
    """The batch-1 cache of `tokens` [1, P] (a prefix every row shares, no injection), for
    `forward(..., prefix=)`; None when P is 0."""
    length = tokens.shape[1]
    if not length:
        return None
    cache = init_cache(cfg, 1, length, params.embed.dtype)
    _, cache, _ = forward(params, cfg, tokens, jnp.arange(length)[None], jnp.ones((1, length), bool), cache,
                          layout=layout, last_only=True, adapter=adapter)
    return cache


def prompt_positions(token_valid: jax.Array) -> jax.Array:
    """RoPE positions of a left-padded batch: each row counts from 0 at its first real token."""
    return jnp.maximum(jnp.cumsum(token_valid.astype(jnp.int32), axis=1) - 1, 0)
