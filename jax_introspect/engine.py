"""The sweep engine: many trials through one compiled program, doing each piece of work once.

A sweep's trials repeat work that plain batched generation (`generate.generate_tokens`) does again
for every row:

- **The shared prefix.** Every trial of a protocol reads the same prompt, and its injection starts
  late in it (Lindsey: at the token before "Trial 1"): every token before the earliest injection
  start is the same computation for every row. It is prefilled once (batch 1) and every slot's
  attention reads that one KV cache (`model.forward(prefix=)`): no per-slot copies of it.
- **One prefill per cell.** Trials with the same prompt and the same injection (the trials of one
  cell: same word, layer, strength, window; every control) have the same prefill. Each distinct
  (prompt, injection), a *cell*, is prefilled once, from the shared prefix, into a store of cell
  caches [L, cells, K, hd, suffix] and first-token logits, `prefill_block` cells at a time. With
  `share_depth` (one prompt for every trial) a cell's layers below its injection layer are the
  clean prompt's: computed once, and each block starts at its cells' lowest injection layer.
- **Slot refill.** A batch of `slots` rows decodes together; when a row ends (EOS or
  max_new_tokens) its slot takes the next pending trial: the trial's cell cache is copied into
  the slot's suffix columns, its first token is sampled from the cell's logits with the trial's
  own key, and it decodes from there at its own step and RoPE position (a KV cache with per-row
  lengths, `model.forward`). Shapes never change, so the program compiles once per
  (slots, trials, prefix, suffix, cells) shape.

Texts do not change: a trial's token t is drawn with `fold_in(trial_key, t)` from logits that
differ from the plain path's only by float round-off (other matmul shapes, other cache columns);
tests/test_engine.py compares the two trial by trial. The KV cache of a slot is laid out
[suffix (left-padded) | generated], after the shared prefix's; pad columns are masked out of
attention.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect import generate as generate_lib
from jax_introspect import inject as inject_lib
from jax_introspect import lens as lens_lib
from jax_introspect import model as model_lib
from jax_introspect.config import ModelConfig

# Suffix widths are padded to a multiple of this (as plain generation pads prompts), so calls whose
# prompts differ a little in length (a judge's, which quote the responses) share a compile.
SUFFIX_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Work:
    """One engine call, worked out on the host (`plan_work`): what is prefilled once, the cells,
    and which cell each trial samples from."""
    prefix: np.ndarray  # [1, Lp] int32: the tokens every trial shares, before any injection (Lp may be 0)
    cell_tokens: np.ndarray  # [C, Ls] int32: each cell's prompt after the prefix, left-padded
    cell_valid: np.ndarray  # [C, Ls] bool
    cell_injection: inject_lib.Injection  # C rows
    cell_length: np.ndarray  # [C] int32: prompt tokens of the cell (prefix + its suffix)
    n_cells: int  # real cells (the rest of C is padding, never computed)
    trial_cell: np.ndarray  # [N] int32
    n_trials: int  # real trials (the rest of N is padding, never run)
    # [C] int32: the first layer each cell computes in a depth-shared call (its injection layer; the
    # clean and padding cells: RESUME_NONE, none); 0 for every cell of a call that cannot share depth.
    cell_resume: np.ndarray
    share_depth: bool = False  # asked for (static: the program's structure; `cell_resume` says what is shared)
    depth_shared: bool = False  # this call shares depth (one prompt for every cell)


def _cell_key(ids: Sequence[int], injection: inject_lib.Injection, row: int) -> tuple:
    """What decides a trial's prefill and decode: its prompt and its injection. A strength-0 row is
    the clean model whatever its other fields (the injection adds exactly 0)."""
    strength = float(injection.strength[row])
    if strength == 0.0:
        return (tuple(ids), "clean")
    fields = (int(injection.layer[row]), strength, np.asarray(injection.vector[row]).tobytes(),
              int(injection.start[row]), int(injection.end[row]), int(injection.norm_match[row]))
    return (tuple(ids),) + fields


def shared_prefix_length(prompt_ids: Sequence[Sequence[int]], starts) -> int:
    """Tokens every prompt shares from its start, before any row's injection starts (`starts`: each
    row's `Injection.start`; a strength-0 row's start counts too: the sweep gives controls their
    protocol's start, so the prefix of a protocol does not depend on which trials a call holds); at
    least one token of each prompt is left for its cell's prefill (the first answer token's logits
    come from it)."""
    shortest = min(len(p) for p in prompt_ids)
    common = 0
    while common < shortest and all(p[common] == prompt_ids[0][common] for p in prompt_ids):
        common += 1
    return max(0, min(common, int(np.min(np.asarray(starts))), shortest - 1))


def suffix_width(suffix_lengths: Sequence[int]) -> int:
    """The cells' suffix width: their longest, rounded up to SUFFIX_BUCKET (one program per bucket)."""
    return -(-max(suffix_lengths) // SUFFIX_BUCKET) * SUFFIX_BUCKET


def call_shape(prompt_ids: Sequence[Sequence[int]], starts) -> tuple[int, int]:
    """(prefix length, suffix width) of an engine call on these prompts, with the rows' injection
    starts: the shapes `plan_work` gives and the compiled program has, without the injection's
    vectors (a TPU plan, `experiment/plan.py`, compiles the program from them)."""
    prefix_len = shared_prefix_length(prompt_ids, starts)
    return prefix_len, suffix_width([len(p) - prefix_len for p in prompt_ids])


# Tokens a cell-prefill block should hold at least: each block reads every weight once, so fewer
# tokens per block leave a TPU's matrix units waiting on HBM; more rows than that only pad (a call's
# last block is filled with padding cells, which are computed). On the CPU, blocks of 8 x 172 tokens
# ran at 530 tokens/s against 448 at 32 x 172 (docs/performance.md section 7).
PREFILL_BLOCK_TOKENS = 1024


def prefill_block(slots: int, suffix_width: int, data: int = 1) -> int:
    """The cells a prefill block holds by default: the fewest (a divisor of `slots` and a multiple
    of the mesh's data axis) whose suffixes hold PREFILL_BLOCK_TOKENS tokens; `slots` if none."""
    for block in range(data, slots + 1, data):
        if slots % block == 0 and block * suffix_width >= PREFILL_BLOCK_TOKENS:
            return block
    return slots


def shares_depth(prompt_ids: Sequence[Sequence[int]]) -> bool:
    """Whether a call's cells can share depth: one prompt for every trial (a sweep's call of one
    protocol), so a cell's layers below its injection layer are the clean prompt's."""
    return all(list(p) == list(prompt_ids[0]) for p in prompt_ids)


def _depth_order(injection: inject_lib.Injection, row: int) -> tuple:
    """A cell's place in a depth-shared call: injected cells by their injection layer, clean ones last."""
    return (float(injection.strength[row]) == 0.0, int(injection.layer[row]))


RESUME_NONE = int(np.iinfo(np.int32).max)  # `Work.cell_resume` of a cell that resumes nowhere (clamped to L)


def plan_work(prompt_ids: Sequence[Sequence[int]], injection: inject_lib.Injection, pad_id: int, *,
              slots: int, trials: Optional[int] = None, share_prefix: bool = True, share_cells: bool = True,
              share_depth: bool = False) -> Work:
    """The cells of `prompt_ids` x `injection` (one row per trial), the shared prefix, and the
    padding: trials to `trials` (default: their number), cells to `trials` rounded up to a
    multiple of `slots`. With `share_depth` and one prompt for every trial (`shares_depth`) the
    cells are ordered by their injection layer (the clean cell last), so that a prefill block
    starts at its cells' lowest layer (`Work.cell_resume`). `share_prefix` / `share_cells` False
    turn those savings off (the same texts; benchmarks/sweep_engine.py measures what each saves)."""
    n = len(prompt_ids)
    trials = n if trials is None else trials
    if trials < n:
        raise ValueError(f"{n} trials do not fit a call of {trials}")
    prefix_len = shared_prefix_length(prompt_ids, injection.start) if share_prefix else 0
    keys, cell_of, first_row = {}, [], []
    for i, ids in enumerate(prompt_ids):
        key = _cell_key(ids, injection, i) if share_cells else i
        if key not in keys:
            keys[key] = len(first_row)
            first_row.append(i)
        cell_of.append(keys[key])
    # Room for a cell per trial (calls of one size share a program whatever their cells; padding
    # cells are never computed), in whole blocks of `slots`.
    cells = -(-trials // slots) * slots
    # Whether this call shares depth is data (`cell_resume`): calls of one sweep share one program.
    depth_shared = share_depth and shares_depth(prompt_ids)
    n_cells = len(first_row)
    if depth_shared:  # cells by injection layer, clean last (a stable sort: ties keep their order)
        order = sorted(range(n_cells), key=lambda c: _depth_order(injection, first_row[c]))
        renumber = {old: new for new, old in enumerate(order)}
        first_row = [first_row[c] for c in order]
        cell_of = [renumber[c] for c in cell_of]
    suffixes = [list(prompt_ids[i][prefix_len:]) for i in first_row]
    width = suffix_width([len(s) for s in suffixes])
    tokens = np.full((cells, width), pad_id, np.int32)
    valid = np.zeros((cells, width), bool)
    valid[n_cells:, -1] = True  # padding cells: one pad token (never computed; keeps masks non-empty)
    for c, suffix in enumerate(suffixes):
        tokens[c, width - len(suffix):] = suffix
        valid[c, width - len(suffix):] = True
    rows = np.asarray(first_row + [first_row[0]] * (cells - n_cells))
    cell_injection = jax.tree.map(lambda x: np.asarray(x)[rows], injection)
    length = np.asarray([len(prompt_ids[i]) for i in rows], np.int32)
    resume = np.zeros((cells,), np.int32)
    if depth_shared:
        injected = (np.asarray(cell_injection.strength) != 0) & (np.arange(cells) < n_cells)
        resume = np.where(injected, np.asarray(cell_injection.layer), RESUME_NONE).astype(np.int32)
    trial_cell = np.zeros((trials,), np.int32)
    trial_cell[:n] = cell_of
    return Work(prefix=np.asarray([prompt_ids[0][:prefix_len]], np.int32).reshape(1, prefix_len),
                cell_tokens=tokens, cell_valid=valid, cell_injection=cell_injection, cell_length=length,
                n_cells=n_cells, trial_cell=trial_cell, n_trials=n, cell_resume=resume, share_depth=share_depth,
                depth_shared=depth_shared)


@dataclasses.dataclass(frozen=True)
class ReadoutRequest:
    """The first-answer-token readout (`lens.answer_readout`) a call's trials ask for, computed in
    each cell's prefill from the logits and residuals it already has (a trial's first token is drawn
    from its cell's last-position logits: the readout is a property of the cell, not of the key)."""
    yes_ids: Sequence[int]  # the yes-like first tokens: p_yes sums their probabilities
    no_ids: Sequence[int]
    lens_layers: Sequence[Sequence[int]]  # per trial: the layers whose lens it records (empty: none)
    word_ids: Sequence[Sequence[int]]  # per trial: its injected word's first tokens (empty: none)
    lens_width: int  # lens layers computed per cell (M: one program per width; a cell needs the union of its trials')
    top_k: int


def cell_readout_inputs(request: ReadoutRequest, work: Work, vocab_size: int) -> tuple[tuple, list]:
    """The readout's per-cell inputs of `work`'s cells: ((lens layers [C, M], word ids [C, WORD_FORMS],
    yes mask [V], no mask [V]), each real cell's lens layers in order). A cell's lens layers are the
    union of its trials' (controls of several layers share the clean cell), padded with its first."""
    cells, width = work.cell_tokens.shape[0], request.lens_width
    layers = [[] for _ in range(work.n_cells)]
    words = [None] * work.n_cells
    for trial, cell in enumerate(work.trial_cell[:work.n_trials]):
        layers[cell] += [layer for layer in request.lens_layers[trial] if layer not in layers[cell]]
        if request.word_ids[trial]:
            if words[cell] not in (None, tuple(request.word_ids[trial])):
                raise ValueError(f"trials of one cell name different words' tokens: {words[cell]} and "
                                 f"{tuple(request.word_ids[trial])}")
            words[cell] = tuple(request.word_ids[trial])
    if any(len(cell) > width for cell in layers):
        raise ValueError(f"a cell's trials ask for the lens at {max(layers, key=len)}: more than lens_width={width}")
    lens_layers = np.zeros((cells, width), np.int32)
    word_ids = np.zeros((cells, lens_lib.WORD_FORMS), np.int32)
    for c in range(work.n_cells):
        row = layers[c] or [0]
        lens_layers[c] = (row + row[:1] * width)[:width]
        word_ids[c] = lens_lib.padded_word_ids(words[c] or ())
    masks = (lens_lib.token_mask(request.yes_ids, vocab_size), lens_lib.token_mask(request.no_ids, vocab_size))
    return (lens_layers, word_ids, *masks), layers


def trial_readouts(request: ReadoutRequest, work: Work, cell_layers: list, outputs: dict) -> list:
    """Per trial of `work` (host side, `outputs` from `run`): {"p_yes", "p_no", "lens": [{"layer",
    "top_ids", "top_probs", "word_token", "word_prob", "word_rank"} per requested layer, in its order]}
    (the word's fields only for a trial with word ids)."""
    out = []
    for trial, cell in enumerate(work.trial_cell[:work.n_trials]):
        lenses = []
        for layer in request.lens_layers[trial]:
            m = cell_layers[cell].index(layer)
            entry = {"layer": int(layer), "top_ids": outputs["top_ids"][cell, m].tolist(),
                     "top_probs": [float(p) for p in outputs["top_probs"][cell, m]]}
            if request.word_ids[trial]:
                entry.update(word_token=int(outputs["word_token"][cell, m]),
                             word_prob=float(outputs["word_prob"][cell, m]),
                             word_rank=int(outputs["word_rank"][cell, m]))
            lenses.append(entry)
        out.append({"p_yes": float(outputs["p_yes"][cell]), "p_no": float(outputs["p_no"][cell]), "lens": lenses})
    return out


def _rows(tree, start, size):
    """Rows [start, start + size) of every array of `tree` (axis 0)."""
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, 0), tree)


def _clean_prompt(params, cfg, tokens, valid, prefix_len, prefix_cache, *, layout, adapter):
    """The clean forward of one cell's suffix `tokens` [1, Ls] after the shared prefix: its cache
    and its residual after every layer [L, 1, Ls, D] (what every cell of the prompt computes below
    its injection layer)."""
    cache = model_lib.init_cache(cfg, 1, tokens.shape[1], params.embed.dtype)
    _, cache, residuals = model_lib.forward(
        params, cfg, tokens, prefix_len + model_lib.prompt_positions(valid), valid, cache, layout=layout,
        last_only=True, adapter=adapter, prefix=prefix_cache, return_residuals=True)
    return cache, residuals


def _prefill_cells(params, cfg, prefix, cell_tokens, cell_valid, cell_injection, cell_resume, n_cells, readout=None,
                   *, block, layout, adapter, top_k=0, share_depth=False):
    """The shared prefix once, then every real cell's suffix after it, `block` cells at a time (a
    loop over ceil(n_cells / block) blocks: padding cells cost nothing). With `share_depth` (one
    prompt for every cell, `plan_work`), the prompt's clean forward once, and each block starts at
    its cells' lowest injection layer (`cell_resume`, `Work.cell_resume`: 0 in a call that cannot
    share depth; the layers below are the clean forward's: skipped, their cache copied). Returns
    the prefix cache [.., 1, .., Lp] (None when Lp is 0), the cells' suffix caches (k and v
    [L, C, K, Ls, hd]), their first-answer-token logits [C, V] and, with `readout`
    (`cell_readout_inputs`' arrays), each cell's `lens.answer_readout` ({name: [C, ...]}; None
    without)."""
    prefix_len = prefix.shape[1]
    cells, suffix_len = cell_tokens.shape
    dtype = params.embed.dtype
    prefix_cache = model_lib.prefill_prefix(params, cfg, prefix, layout=layout, adapter=adapter)
    L, K, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    if share_depth:
        # Only a call that shares depth reads the clean forward (a cell resumes above layer 0); in a
        # call whose prompts differ (every `cell_resume` 0: the same program) it is skipped.
        clean_cache, clean = jax.lax.cond(
            jnp.any(cell_resume > 0),
            lambda: _clean_prompt(params, cfg, cell_tokens[:1], cell_valid[:1], prefix_len, prefix_cache,
                                  layout=layout, adapter=adapter),
            lambda: (model_lib.init_cache(cfg, 1, suffix_len, dtype),
                     jnp.zeros((L, 1, suffix_len, cfg.d_model), dtype)))
    # Keys stored [.., Ls, hd] like the values: a [.., hd, Ls] store pads its 32-wide minor axis to the
    # TPU's 128 lanes (4x its size) when XLA lays it out for the refill's gather.
    store_k = jnp.zeros((L, cells, K, suffix_len, hd), dtype)
    store_v = jnp.zeros((L, cells, K, suffix_len, hd), dtype)
    store_logits = jnp.zeros((cells, cfg.vocab_size), jnp.float32)
    store_readout = None
    if readout is not None:
        lens_layers, word_ids, yes_mask, no_mask = readout
        width = lens_layers.shape[1]
        store_readout = {"p_yes": jnp.zeros((cells,), jnp.float32), "p_no": jnp.zeros((cells,), jnp.float32),
                         "top_probs": jnp.zeros((cells, width, top_k), jnp.float32),
                         "top_ids": jnp.zeros((cells, width, top_k), jnp.int32),
                         "word_prob": jnp.zeros((cells, width), jnp.float32),
                         "word_token": jnp.zeros((cells, width), jnp.int32),
                         "word_rank": jnp.zeros((cells, width), jnp.int32)}

    def one_block(i, store):
        store_k, store_v, store_logits, store_readout = store
        first = i * block
        tokens, valid = _rows(cell_tokens, first, block), _rows(cell_valid, first, block)
        cache = layout.constrain_cache(model_lib.init_cache(cfg, block, suffix_len, dtype))
        positions = prefix_len + model_lib.prompt_positions(valid)
        # The skipped layers' residuals, keys and values: the clean forward's.
        resume = ((jnp.minimum(jnp.min(_rows(cell_resume, first, block)), L), clean, clean_cache) if share_depth
                  else None)
        logits, cache, residuals = model_lib.forward(
            params, cfg, tokens, positions, valid, cache, injection=_rows(cell_injection, first, block),
            layout=layout, last_only=True, adapter=adapter, prefix=prefix_cache,
            return_residuals="last" if readout is not None else False, resume=resume)
        store_k = jax.lax.dynamic_update_slice_in_dim(store_k, cache.k.swapaxes(3, 4), first, 1)
        store_v = jax.lax.dynamic_update_slice_in_dim(store_v, cache.v, first, 1)
        store_logits = jax.lax.dynamic_update_slice_in_dim(store_logits, logits[:, -1], first, 0)
        if readout is not None:
            values = lens_lib.answer_readout(params, cfg, logits[:, -1], residuals[:, :, 0],
                                             _rows(lens_layers, first, block), _rows(word_ids, first, block),
                                             yes_mask, no_mask, top_k=top_k)
            store_readout = {name: jax.lax.dynamic_update_slice_in_dim(store_readout[name], values[name], first, 0)
                             for name in store_readout}
        return store_k, store_v, store_logits, store_readout

    blocks = (n_cells + block - 1) // block
    *store, store_readout = jax.lax.fori_loop(0, blocks, one_block, (store_k, store_v, store_logits, store_readout))
    return prefix_cache, tuple(store), store_readout


def _run(params: model_lib.Params, cfg: ModelConfig, prefix, cell_tokens, cell_valid, cell_injection, cell_length,
         cell_resume, n_cells, trial_cell, trial_sampling: generate_lib.Sampling, n_trials, eos_ids, pad_id,
         readout=None, *,
         max_new_tokens: int, slots: int, refill_min: int, layout, adapter=None, readout_top_k: int = 0,
         prefill_block: int = 0, share_depth: bool = False):
    """Generate every trial; returns (tokens [N, max_new_tokens], lengths [N]) as `generate_tokens`
    does for its rows (a row stops after its first EOS, which it keeps; the rest is pad_id), and
    each cell's first-answer-token readout ({name: [C, ...]}, `_prefill_cells`; None without
    `readout`). `prefill_block`: cells prefilled together (a divisor of `slots`; 0: `slots`;
    `LanguageModel.generate_shared` passes `prefill_block()`'s choice);
    `share_depth`: `Work.share_depth` (`_prefill_cells`)."""
    suffix_len = cell_tokens.shape[1]
    trials = trial_cell.shape[0]
    B = slots
    block = prefill_block or B
    if B % block:
        raise ValueError(f"prefill_block={block} must divide slots={B}")
    prefix_cache, (store_k, store_v, store_logits), cell_readout = _prefill_cells(
        params, cfg, prefix, cell_tokens, cell_valid, cell_injection, cell_resume, n_cells, readout, block=block,
        layout=layout, adapter=adapter, top_k=readout_top_k, share_depth=share_depth)
    # Each slot: [its cell's suffix | generated], after the shared prefix's columns (`prefix_cache`).
    gen_start = suffix_len
    cache = layout.constrain_cache(model_lib.init_cache(cfg, B, suffix_len + max_new_tokens, params.embed.dtype))
    none = jnp.int32(trials)  # a slot's trial index when it holds none

    def of_trials(slot_trial):
        """Per slot: its trial's sampling settings and its cell's index (a slot without a trial reads
        the last trial's: what it computes is never recorded)."""
        index = jnp.minimum(slot_trial, trials - 1)
        return jax.tree.map(lambda x: x[index], trial_sampling), trial_cell[index]

    def refill(state):
        """Free slots take the next pending trials: their cell's suffix cache, valid columns, RoPE
        position and first token (drawn from the cell's logits with the trial's key, step 0)."""
        cache, slot_trial, step, token, position, running, next_trial, out, lengths = state
        free = ~running
        candidate = next_trial + jnp.cumsum(free.astype(jnp.int32)) - 1
        take = free & (candidate < n_trials)
        slot_trial = jnp.where(take, candidate, jnp.where(running, slot_trial, none))
        cell = of_trials(candidate)[1]
        # A scatter of the taken slots' rows (the others write nowhere): the cache is updated in place
        # in the decode loop's own layout, with no pass over the untouched slots (on TPU a whole-cache
        # select made XLA copy the slots' cache into another layout and back at every refill).
        target = jnp.where(take, jnp.arange(take.shape[0]), take.shape[0])
        fresh_valid = jnp.concatenate([cell_valid[cell], jnp.zeros((take.shape[0], max_new_tokens), bool)], axis=1)
        cache = model_lib.KVCache(
            k=cache.k.at[:, target, :, :, :gen_start].set(store_k[:, cell].swapaxes(3, 4), mode="drop"),
            v=cache.v.at[:, target, :, :gen_start, :].set(store_v[:, cell], mode="drop"),
            valid=cache.valid.at[target].set(fresh_valid, mode="drop"), length=cache.length)
        first = generate_lib.next_tokens(store_logits[cell], of_trials(slot_trial)[0], jnp.int32(0))
        token = jnp.where(take, first, token)
        step = jnp.where(take, 0, step)
        position = jnp.where(take, cell_length[cell], position)
        return (layout.constrain_cache(cache), slot_trial, step, token, position, running | take,
                next_trial + jnp.sum(take.astype(jnp.int32)), out, lengths)

    def pending(state):
        running, next_trial = state[5], state[6]
        return jnp.any(running) | (next_trial < n_trials)

    def one_step(state):
        running, next_trial = state[5], state[6]
        free = jnp.sum((~running).astype(jnp.int32))
        wanted = (next_trial < n_trials) & ((free >= refill_min) | ~jnp.any(running))
        state = jax.lax.cond(wanted, refill, lambda s: s, state)
        cache, slot_trial, step, token, position, running, next_trial, out, lengths = state
        # Record each running slot's token; slots without a trial write nowhere (index out of range).
        target = jnp.where(running, slot_trial, trials)
        out = out.at[target, step].set(token, mode="drop")
        lengths = lengths.at[target].set(step + 1, mode="drop")
        running = running & ~jnp.isin(token, eos_ids) & (step + 1 < max_new_tokens)
        # One decode step for every slot; a slot that is not running feeds a masked pad column.
        cache = dataclasses.replace(cache, length=gen_start + step)
        sampling, cell = of_trials(slot_trial)
        logits, cache, _ = model_lib.forward(params, cfg, token[:, None], position[:, None], running[:, None], cache,
                                             injection=jax.tree.map(lambda x: x[cell], cell_injection),
                                             layout=layout, adapter=adapter, prefix=prefix_cache)
        following = generate_lib.next_tokens(logits[:, 0], sampling, step + 1)
        token = jnp.where(running, following, token)
        step = jnp.where(running, step + 1, step)
        position = jnp.where(running, position + 1, position)
        cache = dataclasses.replace(cache, length=jnp.int32(0))
        return layout.constrain_cache(cache), slot_trial, step, token, position, running, next_trial, out, lengths

    zeros = jnp.zeros((B,), jnp.int32)
    state = (cache, jnp.full((B,), trials, jnp.int32), zeros, zeros, zeros, jnp.zeros((B,), bool), jnp.int32(0),
             jnp.full((trials, max_new_tokens), pad_id, jnp.int32), jnp.zeros((trials,), jnp.int32))
    state = jax.lax.while_loop(pending, one_step, state)
    out, lengths = state[7], state[8]
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, layout.replicated),
                        (out, lengths, cell_readout))


# Static: the model config, the shapes' meaning and the layout; everything per trial is traced.
run = jax.jit(_run, static_argnames=("cfg", "max_new_tokens", "slots", "refill_min", "layout", "readout_top_k",
                                     "prefill_block", "share_depth"))
