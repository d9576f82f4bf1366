"""The user-facing model: `lm = jax_introspect.load(path)`; logits, residuals, generate."""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect import checkpoint as ckpt
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


def _prefill_impl(params, cfg, tokens, token_valid, injection, return_residuals, layout=None):
    cache = model_lib.init_cache(cfg, tokens.shape[0], tokens.shape[1], params.embed.dtype)
    if layout is not None:
        cache = layout.constrain_cache(cache)
    # Residual calls discard the logits: only the last column's are computed for them.
    logits, _, residuals = model_lib.forward(params, cfg, tokens, model_lib.prompt_positions(token_valid),
                                             token_valid, cache, return_residuals=return_residuals,
                                             injection=injection, layout=layout, last_only=return_residuals)
    return logits, residuals


_prefill = jax.jit(_prefill_impl, static_argnames=("cfg", "return_residuals", "layout"))


@functools.lru_cache(maxsize=64)
def _sharded_prefill(layout, cfg, return_residuals):
    """The prefill forward on a mesh, with explicit in/out shardings (logits split over batch and
    vocab, residuals over batch and d_model)."""
    def run(params, tokens, token_valid, injection):
        return _prefill_impl(params, cfg, tokens, token_valid, injection, return_residuals, layout)
    return jax.jit(run, in_shardings=(layout.params(cfg), layout.of("tokens"), layout.of("tokens"),
                                      layout.injection()),
                   out_shardings=(layout.of("logits"), layout.of("residuals")) if return_residuals
                   else (layout.of("logits"), None))


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


class LanguageModel:
    def __init__(self, config: ModelConfig, params: model_lib.Params, tokenizer=None, path: Optional[str] = None,
                 layout=None):
        self.config = config
        self.params = params
        self._tokenizer = tokenizer
        self.path = path
        # With a `sharding.Layout`, params live on its mesh and every call runs the jitted
        # programs with its explicit in/out shardings; `run_config` is `config` with the KV heads
        # held in memory (duplicated when the tensor axis exceeds them; see docs/sharding.md).
        self.layout = layout
        self.run_config = config if layout is None else layout.run_config(config)

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

    def _pad_rows(self, tokens, valid, injection, sample=None):
        """On a mesh, add inert rows (one pad token, strength 0, greedy) so the batch splits
        evenly over the data axis; callers drop them from the outputs."""
        extra = -len(tokens) % self.layout.data_size
        if not extra:
            return tokens, valid, injection, sample
        pad = lambda x, value: np.concatenate([np.asarray(x), np.full((extra,) + np.shape(x)[1:], value,
                                                                       np.asarray(x).dtype)])
        tokens, valid = pad(tokens, self._pad_id()), pad(valid, False)
        valid[-extra:, -1] = True
        injection = inject_lib.Injection(layer=pad(injection.layer, 0), strength=pad(injection.strength, 0.0),
                                         vector=pad(injection.vector, 0.0), start=pad(injection.start, 0),
                                         norm_match=pad(injection.norm_match, False))
        if sample is not None:
            sample = generate_lib.Sampling(temperature=pad(sample.temperature, 0.0), top_p=pad(sample.top_p, 1.0),
                                           keys=pad(sample.keys, 0))
        return tokens, valid, injection, sample

    def _forward(self, token_ids, injection, return_residuals):
        tokens, valid = self._batch(token_ids)
        self.check_context(tokens.shape[1])
        injection = self._injection(injection, len(tokens))
        if self.layout is None:
            return _prefill(self.params, self.config, tokens, valid, injection, return_residuals)
        rows, lay = len(tokens), self.layout
        tokens, valid, injection, _ = self._pad_rows(tokens, valid, injection)
        logits, residuals = _sharded_prefill(lay, self.run_config, return_residuals)(
            self.params, lay.put(tokens, lay.of("tokens")), lay.put(valid, lay.of("tokens")),
            lay.put(injection, lay.injection()))
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
        if len(prompts) and isinstance(prompts[0], str):
            prompt_ids = [self.tokenizer.encode(p) for p in prompts]
        else:
            prompt_ids = [list(map(int, p)) for p in prompts]
        self.check_context(max(map(len, prompt_ids), default=0), max_new_tokens)
        tokens, valid = self._batch(prompt_ids, bucket=_LENGTH_BUCKET)
        trial_ids = list(trial_ids) if trial_ids is not None else [str(i) for i in range(len(tokens))]
        if len(trial_ids) != len(tokens):
            raise ValueError(f"{len(trial_ids)} trial_ids for {len(tokens)} prompts")
        keys = np.stack([generate_lib.trial_key(seed, t) for t in trial_ids])
        sample = generate_lib.sampling(len(tokens), temperature, top_p, keys)
        eos = np.asarray(self._tokenizer.eos_ids if self._tokenizer else [-1], np.int32)
        injection = self._injection(injection, len(tokens))
        if self.layout is None:
            out, lengths, step_logits = generate_lib.generate_tokens(
                self.params, self.config, tokens, valid, injection, sample, eos,
                np.int32(self._pad_id()), max_new_tokens, return_logits=return_logits)
        else:
            lay = self.layout
            tokens, valid, injection, sample = self._pad_rows(tokens, valid, injection, sample)
            out, lengths, step_logits = generate_lib.sharded_generate(lay, self.run_config, max_new_tokens,
                                                                      return_logits)(
                self.params, lay.put(tokens, lay.of("tokens")), lay.put(valid, lay.of("tokens")),
                lay.put(injection, lay.injection()), lay.put(sample, lay.sampling()),
                lay.put(eos, lay.replicated), lay.put(np.int32(self._pad_id()), lay.replicated))
            step_logits = None if step_logits is None else sharding_lib.to_host(step_logits)
        out, lengths = np.asarray(out), np.asarray(lengths)
        step_logits = None if step_logits is None else np.asarray(step_logits)
        results = []
        for i, (ids, row, n) in enumerate(zip(prompt_ids, out, lengths)):
            new = row[:n].tolist()
            finished = bool(new) and new[-1] in set(eos.tolist())
            text_ids = new[:-1] if finished else new
            text = self._tokenizer.decode(text_ids) if self._tokenizer else ""
            results.append(Generation(prompt_ids=ids, token_ids=new, text=text, finished=finished,
                                      logits=None if step_logits is None else step_logits[i, :n]))
        return results

    def chat(self, question: str, max_new_tokens: int = 64, **chat_kw) -> str:
        """One user turn, answered greedily."""
        prompt = self.tokenizer.chat_prompt([{"role": "user", "content": question}], **chat_kw)
        return self.generate([prompt], max_new_tokens=max_new_tokens)[0].text


def load(path: str, dtype=None, shardings=None, mesh=None, rules=None) -> LanguageModel:
    """Load a checkpoint written by `python -m launch.convert` (a local folder or gs://...).

    mesh: a `jax.sharding.Mesh` from `sharding.make_mesh`, or its shape as text ('2x4' =
    data x tensor, '1x-1' = all devices tensor-parallel). Each layer is restored straight into
    its sharding on the mesh (each host reads only its shards) and every call then runs with
    explicit in/out shardings. `rules`: optional `sharding.AxisRules`. Without a mesh, params go
    to one device (or to explicit `shardings`, a `Params` of shardings)."""
    config = ckpt.load_config(path)
    layout = None
    if mesh is not None:
        if shardings is not None:
            raise ValueError("pass either mesh= or shardings=, not both")
        if not isinstance(mesh, jax.sharding.Mesh):
            mesh = sharding_lib.make_mesh(mesh)
        layout = sharding_lib.Layout.for_model(mesh, config, rules)
        shardings = layout.params(config)
    params = ckpt.load_params(path, config, dtype=dtype, shardings=shardings,
                              kv_heads=None if layout is None else layout.kv_heads)
    return LanguageModel(config, params, ckpt.load_tokenizer(path), path=ckpt.normalize(path), layout=layout)
