"""The user-facing model: `lm = jax_introspect.load(path)`; logits, residuals, generate."""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Sequence, Union

import jax
import numpy as np

from jax_introspect import adapters as adapters_lib
from jax_introspect import checkpoint as ckpt
from jax_introspect import config as config_lib
from jax_introspect import generate as generate_lib
from jax_introspect import inject as inject_lib
from jax_introspect import model as model_lib
from jax_introspect import sharding as sharding_lib
from jax_introspect.config import ModelConfig, check_context

TokenBatch = Union[np.ndarray, Sequence[Sequence[int]]]
_LENGTH_BUCKET = 32  # prompts are left-padded to a multiple of this, so lengths share compiles


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, EOS included when reached
    text: str  # decoded generated tokens, without the EOS token
    finished: bool  # True if an EOS token ended it
    logits: Optional[np.ndarray] = None  # [len(token_ids), vocab] float32, when asked for
    readout: Optional[dict] = None  # the first answer token's readout, when asked for (`engine.trial_readouts`)


def _prefill_impl(params, cfg, tokens, token_valid, injection, return_residuals, layout, adapter=None):
    cache = layout.constrain_cache(model_lib.init_cache(cfg, tokens.shape[0], tokens.shape[1], params.embed.dtype))
    # Residual calls discard the logits: only the last column's are computed for them.
    logits, _, residuals = model_lib.forward(params, cfg, tokens, model_lib.prompt_positions(token_valid),
                                             token_valid, cache, return_residuals=return_residuals,
                                             injection=injection, layout=layout, last_only=return_residuals,
                                             adapter=adapter)
    # Logits come back split over batch and vocab (pinned by `forward`), residuals over batch and d_model.
    return logits, (layout.pin(residuals, "residuals") if return_residuals else None)


# One program for every mesh (`layout` is static), compiled once per batch shape (and adapter shape:
# the adapter is traced).
_prefill = jax.jit(_prefill_impl, static_argnames=("cfg", "return_residuals", "layout"))


def left_pad(token_ids: TokenBatch, pad_id: int, bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists -> ([B, T] ids, [B, T] valid mask), padded on the left to a multiple of `bucket`."""
    rows = [list(r) for r in token_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("token_ids must be a non-empty batch of non-empty sequences")
    width = -(-max(len(r) for r in rows) // bucket) * bucket
    tokens = np.full((len(rows), width), pad_id, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        valid[i, width - len(row):] = True
    return tokens, valid


def _append_rows(batch, rows):
    """Every array of the pytree `batch` with the matching array of `rows` appended (in `batch`'s
    dtypes): whatever fields `Injection` or `Sampling` have, each is padded."""
    def append(x, extra):
        x = np.asarray(x)
        return np.concatenate([x, np.asarray(extra, x.dtype)])
    return jax.tree.map(append, batch, rows)


class LanguageModel:
    def __init__(self, config: ModelConfig, params: model_lib.Params, tokenizer=None, path: Optional[str] = None,
                 layout: Optional[sharding_lib.Layout] = None, numerics: str = config_lib.DEQUANTIZED):
        self.config = config
        self.params = params
        self._tokenizer = tokenizer
        self.path = path
        # Every call runs the jitted programs on `layout`'s mesh (default: the one the params
        # live on; one device is a 1x1 mesh) with inputs placed by its shardings. `run_config` is
        # `config` with the KV heads held in memory (duplicated when the tensor axis exceeds
        # them; see docs/sharding.md) and the numerics of an FP8 checkpoint (`config.with_numerics`).
        self.layout = layout or sharding_lib.Layout.for_model(sharding_lib.mesh_of(params), config)
        self.numerics = numerics
        self.run_config = config_lib.with_numerics(self.layout.run_config(config), numerics)
        expected = model_lib.params_tree(self.run_config, lambda leaf: 0)
        if jax.tree.structure(params) != jax.tree.structure(expected):
            raise ValueError(f"params with leaves {_leaf_names(params)} do not fit numerics={numerics!r} for this "
                             f"config, which needs {_leaf_names(expected)}; load them with "
                             "jax_introspect.load(path, numerics=...)")
        # An adapter (`with_adapter`) placed on the layout, and its content digest; None: the base model.
        self.adapter: Optional[adapters_lib.Adapter] = None
        self.adapter_digest: Optional[str] = None

    def with_adapter(self, adapter: Optional[adapters_lib.Adapter]) -> "LanguageModel":
        """This model (same params, config, tokenizer, layout: nothing is copied) running `adapter`
        (an `adapters.Adapter` shaped for `config`, e.g. from `adapters.init` / `adapters.load`) in
        `logits`, `residuals`, `generate` and `chat`. The adapter is checked, placed on the layout by
        `adapters.shardings` and traced: adapters of one shape share the compiled programs. None: the
        base model. `adapter_digest` (`adapters.digest`) names it (a sweep binds its folder to it)."""
        new = copy.copy(self)
        if adapter is None:
            new.adapter, new.adapter_digest = None, None
            return new
        adapters_lib.spec_of(adapter, self.config).validate(self.run_config)
        new.adapter_digest = adapters_lib.digest(adapter)
        new.adapter = adapters_lib.place(adapter, self.config, self.layout)
        return new

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise ValueError(f"checkpoint {self.path} has no tokenizer; convert it with "
                             "`--tokenizer=PATH` or pass token ids")
        return self._tokenizer

    @property
    def dtype(self):
        return self.params.embed.dtype

    def check_context(self, n_prompt_tokens: int, max_new_tokens: int = 0) -> None:
        """Raise `config.ContextTooLongError` (a ValueError) when a prompt of `n_prompt_tokens`, plus
        `max_new_tokens` to generate, needs more positions than the model has."""
        check_context(self.config, n_prompt_tokens, max_new_tokens)

    def _pad_id(self) -> int:
        return self._tokenizer.pad_id if self._tokenizer is not None else 0

    def _batch(self, token_ids: TokenBatch, bucket: int = 1):
        tokens, valid = left_pad(token_ids, self._pad_id(), bucket)
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return tokens, valid

    def _injection(self, injection: Optional[inject_lib.Injection], batch: int) -> inject_lib.Injection:
        # A clean run is an injection of strength 0: one compiled program serves both.
        if injection is None:
            return inject_lib.none(batch, self.config.d_model)
        inject_lib.validate(injection, self.config, batch)
        return injection

    def _inert_rows(self, n: int, width: int) -> tuple:
        """(tokens, valid, injection, sampling) of `n` rows that change nothing: one pad token,
        strength 0, greedy."""
        valid = np.zeros((n, width), bool)
        valid[:, -1] = True
        return (np.full((n, width), self._pad_id(), np.int32), valid, inject_lib.none(n, self.config.d_model),
                generate_lib.sampling(n, keys=np.zeros((n, 2), np.uint32)))

    def _on_mesh(self, *rows) -> tuple:
        """`rows` = (tokens, valid, injection[, sampling]) as global arrays with the layout's
        shardings. Inert rows are appended so the batch splits evenly over the data axis; callers
        drop them from the outputs."""
        lay = self.layout
        extra = -len(rows[0]) % lay.data_size
        if extra:
            rows = _append_rows(rows, self._inert_rows(extra, rows[0].shape[1])[:len(rows)])
        shardings = (lay.of("tokens"), lay.of("tokens"), lay.injection(), lay.sampling())[:len(rows)]
        return lay.put(rows, shardings)

    def _forward(self, token_ids, injection, return_residuals):
        tokens, valid = self._batch(token_ids)
        self.check_context(tokens.shape[1])
        rows = len(tokens)
        logits, residuals = _prefill(self.params, self.run_config,
                                     *self._on_mesh(tokens, valid, self._injection(injection, rows)),
                                     return_residuals, self.layout, self.adapter)
        if return_residuals:
            return None, sharding_lib.to_host(residuals)[:, :rows]
        return sharding_lib.to_host(logits)[:rows], None

    def logits(self, token_ids: TokenBatch, injection: Optional[inject_lib.Injection] = None) -> np.ndarray:
        """float32 logits [B, T, vocab]; ragged rows are left-padded (pad columns hold junk)."""
        logits, _ = self._forward(token_ids, injection, False)
        return np.asarray(logits)

    def residuals(self, token_ids: TokenBatch, injection: Optional[inject_lib.Injection] = None) -> np.ndarray:
        """The raw residual stream after every decoder layer (before the final norm), float32
        [layers, B, T, d_model]; ragged rows are left-padded."""
        _, residuals = self._forward(token_ids, injection, True)
        return np.asarray(residuals, dtype=np.float32)

    def generate(self, prompts: Union[Sequence[str], TokenBatch], max_new_tokens: int = 64,
                 injection: Optional[inject_lib.Injection] = None, temperature=0.0, top_p=1.0,
                 seed: int = 0, trial_ids: Optional[Sequence[str]] = None,
                 return_logits: bool = False) -> list[Generation]:
        """Continue each prompt. `prompts`: texts (tokenized as given: use
        `lm.tokenizer.chat_prompt(...)` for chat) or token id lists. temperature 0 is greedy;
        `temperature`/`top_p` may be per row. Row i samples with the key of
        (`seed`, `trial_ids[i]`) (default: its index), so its text does not depend on the batch.
        With `return_logits`, each Generation carries the float32 logits [n, vocab] its tokens
        were chosen from."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        prompt_ids = self._prompt_ids(prompts)
        self.check_context(max(map(len, prompt_ids), default=0), max_new_tokens)
        tokens, valid = self._batch(prompt_ids, bucket=_LENGTH_BUCKET)
        sample = self._sampling(len(tokens), temperature, top_p, seed, trial_ids)
        eos = self._eos()
        rows = self._on_mesh(tokens, valid, self._injection(injection, len(tokens)), sample)
        lay = self.layout
        out, lengths, step_logits = generate_lib.generate_tokens(
            self.params, self.run_config, *rows, lay.put(eos, lay.replicated),
            lay.put(np.int32(self._pad_id()), lay.replicated), max_new_tokens, return_logits, layout=lay,
            adapter=self.adapter)
        step_logits = None if step_logits is None else sharding_lib.to_host(step_logits)
        return self._generations(prompt_ids, sharding_lib.to_host(out), sharding_lib.to_host(lengths), eos,
                                 step_logits)

    def _eos(self) -> np.ndarray:
        return np.asarray(self._tokenizer.eos_ids if self._tokenizer else [-1], np.int32)

    def _prompt_ids(self, prompts) -> list[list[int]]:
        if len(prompts) and isinstance(prompts[0], str):
            return [self.tokenizer.encode(p) for p in prompts]
        return [list(map(int, p)) for p in prompts]

    def _sampling(self, n: int, temperature, top_p, seed: int, trial_ids) -> generate_lib.Sampling:
        """Row i samples with the key of (`seed`, `trial_ids[i]`) (default: its index)."""
        trial_ids = list(trial_ids) if trial_ids is not None else [str(i) for i in range(n)]
        if len(trial_ids) != n:
            raise ValueError(f"{len(trial_ids)} trial_ids for {n} prompts")
        keys = np.stack([generate_lib.trial_key(seed, t) for t in trial_ids])
        return generate_lib.sampling(n, temperature, top_p, keys)

    def _generations(self, prompt_ids, out, lengths, eos, step_logits=None) -> list[Generation]:
        results = []
        for i, (ids, row, n) in enumerate(zip(prompt_ids, out, lengths)):
            new = row[:n].tolist()
            finished = bool(new) and new[-1] in set(eos.tolist())
            text_ids = new[:-1] if finished else new
            text = self._tokenizer.decode(text_ids) if self._tokenizer else ""
            results.append(Generation(prompt_ids=ids, token_ids=new, text=text, finished=finished,
                                      logits=None if step_logits is None else step_logits[i, :n]))
        return results

    def generate_shared(self, prompts: Union[Sequence[str], TokenBatch], max_new_tokens: int = 64,
                        injection: Optional[inject_lib.Injection] = None, temperature=0.0, top_p=1.0,
                        seed: int = 0, trial_ids: Optional[Sequence[str]] = None, *, slots: int = 32,
                        trials: Optional[int] = None, refill_min: Optional[int] = None, share_prefix: bool = True,
                        share_cells: bool = True, readout=None, prefill_block: int = 0,
                        share_depth: bool = False) -> list[Generation]:
        """`generate`'s trials (same arguments, same texts: each trial's tokens depend only on its
        key, its prompt and its injection) through the sweep engine (`engine.py`): the prompts'
        shared prefix before any injection prefilled once, each distinct (prompt, injection)
        prefilled once, and `slots` rows decoding with a finished row's slot refilled by the next
        trial. `trials`: pad the call to this many trials (calls of one size share the compiled
        program); `refill_min`: free slots that trigger a refill (default slots // 8, at least 1;
        a refill copies the new trials' cell caches into their slots; `slots`: no refill until every
        slot is free, i.e. batches); `share_prefix` / `share_cells` False: no shared prefix / one
        cell per trial (for measuring what each saves; the texts are the same); `share_depth`: when
        every trial has the same prompt, each cell's layers below its injection layer come from the
        prompt's clean forward (`engine._prefill_cells`; a call that cannot share runs every layer in
        the same program; off here, on in a sweep's config: it adds a forward and a cond per layer
        to the program, about 1 s of compile for SmolLM2 on the CPU);
        `readout`: an `engine.ReadoutRequest`, computed in the cells' prefill into each Generation's
        `readout`;
        `prefill_block`: cells prefilled together, a divisor of `slots` (0: `engine.prefill_block`'s
        choice for the call's suffix width; fewer rows pad less: a call's last block is filled with
        padding cells, which are computed)."""
        from jax_introspect import engine
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        prompt_ids = self._prompt_ids(prompts)
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prompts must be a non-empty batch of non-empty prompts")
        self.check_context(max(map(len, prompt_ids)), max_new_tokens)
        lay = self.layout
        if slots < 1 or slots % lay.data_size:
            raise ValueError(f"slots={slots} must be a positive multiple of the mesh's data axis ({lay.data_size})")
        if prefill_block and (prefill_block < 0 or slots % prefill_block or prefill_block % lay.data_size):
            raise ValueError(f"prefill_block={prefill_block} must divide slots={slots} and be a multiple of the "
                             f"mesh's data axis ({lay.data_size}); 0 lets the engine choose")
        n = len(prompt_ids)
        if injection is None:  # the clean model: every prompt's common prefix is shared
            injection = inject_lib.make(0, 0.0, np.zeros(self.config.d_model, np.float32),
                                        start=min(map(len, prompt_ids)), batch=n)
        injection = self._injection(injection, n)
        work = engine.plan_work(prompt_ids, injection, self._pad_id(), slots=slots, trials=trials,
                                share_prefix=share_prefix, share_cells=share_cells, share_depth=share_depth)
        if work.cell_tokens.max() >= self.config.vocab_size or work.cell_tokens.min() < 0:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        sample = self._sampling(n, temperature, top_p, seed, trial_ids)
        padding = work.trial_cell.shape[0] - n
        if padding:
            sample = _append_rows(sample, generate_lib.sampling(padding, keys=np.zeros((padding, 2), np.uint32)))
        eos = self._eos()
        cells = lay.put((work.cell_tokens, work.cell_valid, work.cell_injection),
                        (lay.of("tokens"), lay.of("tokens"), lay.injection()))
        rest = lay.put((work.prefix, work.cell_length, work.cell_resume, np.int32(work.n_cells), work.trial_cell,
                        sample, np.int32(work.n_trials), eos, np.int32(self._pad_id())), lay.replicated)
        prefix, cell_length, cell_resume, n_cells, trial_cell, sample, n_trials, eos_ids, pad_id = rest
        readout_inputs, cell_layers = (None, None) if readout is None else engine.cell_readout_inputs(
            readout, work, self.config.vocab_size)
        out, lengths, cell_readout = engine.run(
            self.params, self.run_config, prefix, *cells, cell_length, cell_resume, n_cells, trial_cell, sample,
            n_trials, eos_ids, pad_id, lay.put(readout_inputs, lay.replicated), max_new_tokens=max_new_tokens,
            slots=slots,
            refill_min=max(1, slots // 8) if refill_min is None else refill_min, layout=lay, adapter=self.adapter,
            readout_top_k=0 if readout is None else readout.top_k,
            prefill_block=prefill_block or engine.prefill_block(slots, work.cell_tokens.shape[1], lay.data_size),
            share_depth=work.share_depth)
        generations = self._generations(prompt_ids, sharding_lib.to_host(out)[:n], sharding_lib.to_host(lengths)[:n],
                                        eos)
        if readout is None:
            return generations
        values = engine.trial_readouts(readout, work, cell_layers, jax.tree.map(
            lambda x: np.asarray(sharding_lib.to_host(x)), cell_readout))
        return [dataclasses.replace(g, readout=r) for g, r in zip(generations, values)]

    def chat(self, question: str, max_new_tokens: int = 64, **chat_kw) -> str:
        """One user turn, answered greedily."""
        prompt = self.tokenizer.chat_prompt([{"role": "user", "content": question}], **chat_kw)
        return self.generate([prompt], max_new_tokens=max_new_tokens)[0].text


def _leaf_names(params: model_lib.Params) -> list[str]:
    return [jax.tree_util.keystr(path, simple=True, separator=".")
            for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def load(path: str, dtype=None, shardings=None, mesh=None, rules=None,
         numerics: str = config_lib.DEQUANTIZED) -> LanguageModel:
    """Load a checkpoint written by `python -m launch.convert` (a local folder or gs://...).

    mesh: a `jax.sharding.Mesh` from `sharding.make_mesh`, or its shape as text ('2x4' =
    data x tensor, '1x-1' = all devices tensor-parallel); without one, a 1x1 mesh on one device
    (or the mesh of explicit `shardings`, a `Params` of shardings). Each layer is restored
    straight into its sharding on the mesh (each host reads only its shards) and every call then
    runs the same jitted programs, with the layout's shardings, on one device or many.
    `rules`: optional `sharding.AxisRules`.
    numerics: how a checkpoint converted from FP8 weights (compressed-tensors FP8-dynamic) runs:
    'dequantized' (default; any checkpoint): weights = fp8 * scale in `dtype`, the plain model;
    'fp8_dynamic': the FP8 weights as stored, each quantized layer's input rounded through
    float8_e4m3fn with a per-token scale, float32 accumulation (vLLM's FP8-dynamic); layers the
    checkpoint leaves unquantized (lm_head) unchanged. See docs/numerics.md."""
    config = ckpt.load_config(path)
    config_lib.with_numerics(config, numerics)  # refuse before any weight is read
    layout = sharding_lib.Layout.for_model(_mesh(mesh, shardings), config, rules)
    params = ckpt.load_params(path, config, layout, dtype=dtype, shardings=shardings, numerics=numerics)
    return LanguageModel(config, params, ckpt.load_tokenizer(path), path=ckpt.normalize(path), layout=layout,
                         numerics=numerics)


def _mesh(mesh, shardings) -> jax.sharding.Mesh:
    """The mesh `load` runs on: `mesh` (or its shape), the one `shardings` live on, or one device."""
    if mesh is not None and shardings is not None:
        raise ValueError("pass either mesh= or shardings=, not both")
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    if mesh is not None:
        return sharding_lib.make_mesh(mesh)
    return sharding_lib.one_device_mesh() if shardings is None else sharding_lib.mesh_of(shardings)
