"""Readouts below the threshold of words, at the first answer token of every trial.

A trial's first answer token is chosen from the logits at the last prompt position: they depend
only on the trial's prompt and injection, not on its sampling key. So the forward of each distinct
(prompt, injection) of a generation call gives, for every trial of it:

- `p_yes` / `p_no`: the total softmax probability (float32) of the tokenizer's yes-like / no-like
  first tokens (`answer_token_sets`: the single-token encodings of "Yes", " Yes", "yes", " yes",
  "YES", " YES" and the same for "No"), a continuous measure of detection that moves even when
  every sampled answer is a denial;
- the logit lens at a layer: the raw residual stream after that decoder layer (injection
  included) at the last prompt position, through the final RMSNorm and the unembedding, softmaxed:
  its top-k tokens (ids, text, probabilities) and, for an injected trial, the best probability and
  its rank (1 = top) among the first tokens of the injected word's forms (`word_token_ids`: the
  first token of "Word", " Word", "word", " word"). An injected trial's lens is at its injected
  layer; a control's at each layer of the sweep (its own with `controls_per_layer`), so the report
  can ask whether a word's token is in the top-k without the injection.

The sweep engine (`engine.py`, the default) has that forward already: it prefills each cell once,
and computes the readout there (`lens.answer_readout` on the cell's last-position logits and
residuals; `Readout.request` / `Readout.fill`): no extra forward. Plain batches (`engine="plain"`)
run one of their own per distinct (prompt, injection, lens layer) (`Readout.attach`): the rows'
shared prefix (the prompt before any injection) once and each row's suffix from its cache, split
as the engine splits its cells (`engine.plan_work`); one compiled program per (rows, prefix,
suffix bucket): rows are padded to a fixed count (`batch_size`) with strength-0 rows.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect import lens as lens_lib
from jax_introspect import model as model_lib
from jax_introspect import sharding as sharding_lib
from jax_introspect.lens import WORD_FORMS

YES_FORMS = ("Yes", "yes", "YES")
NO_FORMS = ("No", "no", "NO")
LEADS = ("", " ")  # each form bare and after a space: a chat answer's first token is either
READOUT_FILE = "readout.json"  # the token sets and settings, beside trials.jsonl


class ReadoutError(ValueError):
    pass


def single_tokens(tokenizer, forms: Sequence[str]) -> dict:
    """{"forms": texts that are one token, "ids": their ids} (each form with each lead), in order, without repeats."""
    ids, texts = [], []
    for form in forms:
        for lead in LEADS:
            encoded = tokenizer.encode(lead + form)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(int(encoded[0]))
                texts.append(lead + form)
    return {"forms": texts, "ids": ids}


def answer_token_sets(tokenizer) -> dict:
    """{"yes": {"forms", "ids"}, "no": {...}}: the yes-like and no-like first tokens of this tokenizer.
    Raises ReadoutError when a set is empty (the tokenizer splits every form), or they overlap."""
    sets = {"yes": single_tokens(tokenizer, YES_FORMS), "no": single_tokens(tokenizer, NO_FORMS)}
    for name, forms in (("yes", YES_FORMS), ("no", NO_FORMS)):
        if not sets[name]["ids"]:
            raise ReadoutError(f"the tokenizer encodes none of {[l + f for f in forms for l in LEADS]} as one token: "
                               f"no {name}-like first token to read p_{name} from; run with --config.readout=False")
    if set(sets["yes"]["ids"]) & set(sets["no"]["ids"]):
        raise ReadoutError(f"yes-like and no-like token sets overlap: {sets}")
    return sets


def word_token_ids(tokenizer, word: str) -> list:
    """The first token of each form of `word` ("Word", " Word", "word", " word"), without repeats."""
    ids = []
    for form in (word, " " + word, word.lower(), " " + word.lower()):
        encoded = tokenizer.encode(form)
        if encoded and int(encoded[0]) not in ids:
            ids.append(int(encoded[0]))
    return ids


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "top_k"))
def _readout(params, cfg, prefix, tokens, valid, injection, lens_layer, word_ids, yes_mask, no_mask, adapter, *,
             layout, top_k):
    """Per row: `lens.answer_readout` with one lens layer (lens_layer[b]) ({name: [B, 1, ...]}). The
    rows' shared prefix [1, Lp] (before any injection) is run once and every row attends to its
    cache, as the sweep engine prefills cells (`engine._prefill_cells`, which computes the same
    readout there); `tokens` [B, Ls] are the rows' suffixes, left-padded."""
    batch, suffix_len = tokens.shape
    prefix_cache = model_lib.prefill_prefix(params, cfg, prefix, layout=layout, adapter=adapter)
    cache = layout.constrain_cache(model_lib.init_cache(cfg, batch, suffix_len, params.embed.dtype))
    positions = prefix.shape[1] + model_lib.prompt_positions(valid)
    logits, _, residuals = model_lib.forward(params, cfg, tokens, positions, valid, cache, layout=layout,
                                             return_residuals="last", injection=injection, last_only=True,
                                             adapter=adapter, prefix=prefix_cache)
    return lens_lib.answer_readout(params, cfg, logits[:, -1], residuals[:, :, 0], lens_layer[:, None], word_ids,
                                   yes_mask, no_mask, top_k=top_k)


def compile_for(params, cfg, layout, rows: int, prefix_len: int, suffix_len: int, top_k: int = 10):
    """`_readout` compiled for `layout`'s devices from abstract inputs (`params` may be abstract: a
    TPU plan, `experiment/plan.py`): `rows` forwards, a `prefix_len`-token shared prefix and
    `suffix_len`-token suffixes, no adapter."""
    from jax_introspect import compile_only as co
    from jax_introspect import inject
    rep = layout.replicated
    return _readout.lower(
        params, cfg, co.abstract((1, prefix_len), jnp.int32, rep),
        co.abstract((rows, suffix_len), jnp.int32, layout.of("tokens")),
        co.abstract((rows, suffix_len), jnp.bool_, layout.of("tokens")),
        co.like(inject.none(rows, cfg.d_model), layout.injection()), co.abstract((rows,), jnp.int32, rep),
        co.abstract((rows, WORD_FORMS), jnp.int32, rep), co.abstract((cfg.vocab_size,), jnp.float32, rep),
        co.abstract((cfg.vocab_size,), jnp.float32, rep), None, layout=layout, top_k=top_k).compile()


@dataclasses.dataclass(frozen=True)
class ReadoutRow:
    """One distinct forward: a prompt, its injection (as `inject.make`'s per-row arguments), the lens
    layer and the injected word's tokens (empty for a control)."""
    ids: tuple
    layer: int
    strength: float
    vector_key: tuple  # (word, layer) of the concept vector, or None
    start: int
    norm_match: object
    lens_layer: int
    word_ids: tuple


class Readout:
    """The readout of a sweep: the tokenizer's token sets, one padded row count, top_k, the sweep's
    layers (a control's lens runs at each; `lens_width`: lens layers the engine computes per cell)."""

    def __init__(self, lm, rows_per_forward: int, top_k: int, layers: Sequence[int] = (), lens_width: int = 1):
        self.lm = lm
        self.sets = answer_token_sets(lm.tokenizer)
        self.top_k = int(top_k)
        self.layers = [int(layer) for layer in layers]
        self.lens_width = int(lens_width)
        data = lm.layout.data_size
        self.rows = -(-int(rows_per_forward) // data) * data
        vocab = lm.config.vocab_size
        self.yes_mask = lens_lib.token_mask(self.sets["yes"]["ids"], vocab)
        self.no_mask = lens_lib.token_mask(self.sets["no"]["ids"], vocab)
        self._word_ids = {}
        self._vectors = {}  # (word, layer) -> concept vector of the rows being read (`attach` fills it)

    def metadata(self) -> dict:
        """What readout.json states: the token sets (ids and the texts they encode), k, the word forms."""
        tok = self.lm.tokenizer
        return {"p_yes_tokens": self.sets["yes"], "p_no_tokens": self.sets["no"], "top_k": self.top_k,
                "yes_forms": list(YES_FORMS), "no_forms": list(NO_FORMS), "leads": list(LEADS),
                "word_forms": ["Word", " Word", "word", " word"],
                "decoded": {str(i): tok.decode([i]) for s in self.sets.values() for i in s["ids"]},
                "position": "last prompt position (the first answer token's logits)",
                "lens": "residual after the layer (injection included), final RMSNorm, unembedding, softmax"}

    def word_ids(self, word: str) -> tuple:
        if word not in self._word_ids:
            self._word_ids[word] = tuple(word_token_ids(self.lm.tokenizer, word))
        return self._word_ids[word]

    def lens_layers(self, trial) -> list:
        """The layers whose lens `trial` records: an injected trial's own; a control's, or every
        layer of the sweep (shared controls); none for Lindsey's other experiments (no yes/no
        question: their records keep no readout)."""
        if trial.prompt_key is not None:
            return []
        if trial.kind == "injected" or trial.layer is not None:
            return [int(trial.layer)]
        return list(self.layers)

    def request(self, trials: list):
        """The engine's `ReadoutRequest` for one call's `trials` (`lm.generate_shared(readout=)`)."""
        from jax_introspect import engine
        return engine.ReadoutRequest(
            yes_ids=self.sets["yes"]["ids"], no_ids=self.sets["no"]["ids"],
            lens_layers=[self.lens_layers(t) for t in trials],
            word_ids=[self.word_ids(t.word) if t.kind == "injected" and t.prompt_key is None else () for t in trials],
            lens_width=self.lens_width, top_k=self.top_k)

    def _finish(self, raw: dict, word_ids: tuple) -> dict:
        """A record's readout from the numbers (`engine.trial_readouts`' form): the lens' top tokens
        decoded; an injected trial's word fields (with the ids they were chosen among)."""
        tok = self.lm.tokenizer
        lenses = []
        for entry in raw["lens"]:
            lens = {"layer": entry["layer"], "top_ids": entry["top_ids"],
                    "top_tokens": [tok.decode([int(t)]) for t in entry["top_ids"]], "top_probs": entry["top_probs"]}
            if word_ids:
                lens.update(word_token_ids=list(word_ids), word_token=entry["word_token"],
                            word_prob=entry["word_prob"], word_rank=entry["word_rank"])
            lenses.append(lens)
        return {"p_yes": raw["p_yes"], "p_no": raw["p_no"], "lens": lenses}

    def fill(self, records: list, trials: list, generations: list) -> list:
        """`records` with the readouts the engine computed in its cell prefill (`generations` from
        `lm.generate_shared(readout=self.request(trials))`): no forward of its own."""
        out = []
        for record, trial, generation in zip(records, trials, generations):
            if not self.lens_layers(trial):
                out.append(record)
                continue
            readout = self._finish(generation.readout, self.word_ids(trial.word) if trial.kind == "injected" else ())
            timing = dict(record.timing, readout_seconds=0.0, readout_forwards=0)  # inside the generation call
            out.append(dataclasses.replace(record, readout=readout, timing=timing))
        return out

    def run(self, rows: list) -> list:
        """One result dict per ReadoutRow (rows beyond `self.rows` run in further forwards)."""
        out = []
        for i in range(0, len(rows), self.rows):
            out += self._forward(rows[i:i + self.rows])
        return out

    def _forward(self, rows: list) -> list:
        from jax_introspect import engine, inject
        lm, n = self.lm, len(rows)
        padded = rows + [rows[-1]] * (self.rows - n)
        ids = [list(r.ids) for r in padded]
        lm.check_context(max(map(len, ids)))
        d_model = lm.config.d_model
        vectors = np.stack([self._vectors[r.vector_key] if r.vector_key else np.zeros(d_model, np.float32)
                            for r in padded])
        injection = inject.make(layer=[r.layer for r in padded],
                                strength=[r.strength if i < n else 0.0 for i, r in enumerate(padded)],
                                vector=vectors, start=[r.start for r in padded],
                                norm_match=[r.norm_match for r in padded])
        inject.validate(injection, lm.config, len(padded))
        # The engine's split: the prefix every row shares before any injection, each row's suffix
        # (row i the cell i: no cells merged or reordered).
        work = engine.plan_work(ids, injection, lm._pad_id(), slots=self.rows, trials=self.rows, share_cells=False,
                                share_depth=False)
        if work.cell_tokens.max() >= lm.config.vocab_size or work.cell_tokens.min() < 0:
            raise ValueError(f"token ids must lie in [0, {lm.config.vocab_size})")
        words = np.array([lens_lib.padded_word_ids(r.word_ids) for r in padded], np.int32)
        lens_layer = np.array([r.lens_layer for r in padded], np.int32)
        lay = lm.layout
        tokens, valid, injection = lay.put((work.cell_tokens, work.cell_valid, work.cell_injection),
                                           (lay.of("tokens"), lay.of("tokens"), lay.injection()))
        prefix, lens_layer, words, yes_mask, no_mask = lay.put(
            (work.prefix, lens_layer, words, self.yes_mask, self.no_mask), lay.replicated)
        outputs = _readout(lm.params, lm.run_config, prefix, tokens, valid, injection, lens_layer, words, yes_mask,
                           no_mask, lm.adapter, layout=lay, top_k=self.top_k)
        v = {name: np.asarray(sharding_lib.to_host(x))[:n] for name, x in outputs.items()}
        return [self._finish({"p_yes": float(v["p_yes"][i]), "p_no": float(v["p_no"][i]), "lens": [
            {"layer": int(r.lens_layer), "top_ids": v["top_ids"][i, 0].tolist(),
             "top_probs": [float(p) for p in v["top_probs"][i, 0]], "word_token": int(v["word_token"][i, 0]),
             "word_prob": float(v["word_prob"][i, 0]), "word_rank": int(v["word_rank"][i, 0])}]}, r.word_ids)
                for i, r in enumerate(rows)]

    def attach(self, records: list, trials: list, prompts: dict, concept) -> list:
        """`records` (of `trials`, in order) with their `readout` filled by forwards of its own (plain
        batches; the engine computes it in its cell prefill: `fill`): one forward row per distinct
        (prompt, injection, lens layer)."""
        began = time.time()
        self._vectors.clear()
        keys, distinct = [], {}
        for t in trials:
            lens_layers = self.lens_layers(t)
            if not lens_layers:
                keys.append(None)
                continue
            info = prompts[t.protocol]
            if t.kind == "injected":
                self._vectors[(t.word, t.layer)] = concept.vector(t.word, t.layer)
                row_keys = [ReadoutRow(tuple(info.ids), t.layer, float(t.strength), (t.word, t.layer), info.start,
                                       info.norm_match, t.layer, self.word_ids(t.word))]
            else:
                row_keys = [ReadoutRow(tuple(info.ids), 0, 0.0, None, info.start, info.norm_match, layer, ())
                            for layer in lens_layers]
            for key in row_keys:
                distinct.setdefault(key, len(distinct))
            keys.append(row_keys)
        if not distinct:
            return list(records)
        values = self.run(list(distinct))
        seconds = round(time.time() - began, 3)
        out = []
        for record, row_keys in zip(records, keys):
            if row_keys is None:
                out.append(record)
                continue
            first = values[distinct[row_keys[0]]]
            readout = {"p_yes": first["p_yes"], "p_no": first["p_no"],
                       "lens": [values[distinct[k]]["lens"][0] for k in row_keys]}
            # the cost beside the generation's (timing varies run to run; the readout does not)
            timing = dict(record.timing, readout_seconds=seconds, readout_forwards=-(-len(distinct) // self.rows))
            out.append(dataclasses.replace(record, readout=readout, timing=timing))
        return out


def lens_width(layers: Sequence[int], trials: Sequence) -> int:
    """Lens layers the sweep engine computes per cell for a sweep of `trials` at `layers`: a call's
    controls all sample from one clean cell (also with `controls_per_layer`), whose lens they need at
    every layer; an injected cell needs its own layer's."""
    has_controls = any(t.kind != "injected" and t.prompt_key is None for t in trials)
    return max(1, len(layers)) if has_controls else 1


def record_readout(lm, config, folder: Optional[str], layers: Sequence[int] = (), trials: Sequence = ()):
    """The sweep's Readout (None when `config.readout` is off) for `trials` at `layers`; its metadata
    written to readout.json."""
    if not config.readout:
        return None
    readout = Readout(lm, config.batch_size, config.readout_top_k, layers, lens_width(layers, trials))
    if folder:
        from jax_introspect.experiment.files import atomic_write_json
        atomic_write_json(os.path.join(folder, READOUT_FILE), readout.metadata(), indent=1, sort_keys=True)
    return readout
