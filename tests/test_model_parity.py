"""Tiny random Llama-3.1 models: our converted checkpoint against HF transformers (torch)."""
import os
import pathlib

import numpy as np
import pytest

import jax_introspect
from tests import hf_reference as ref
from tests.hf_reference import mean_kl

VARIANTS = list(ref.TINY_CONFIGS)


def _tokens(batch, length, seed=0, vocab=256):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


@pytest.fixture(scope="module")
def loaded(tiny_models):
    cache = {}

    def get(name):
        if name not in cache:
            hf_dir, ckpt, model = tiny_models(name)
            cache[name] = (jax_introspect.load(ckpt), model)
        return cache[name]
    return get


@pytest.mark.parametrize("name", VARIANTS)
def test_float32_logits_match_hf(loaded, name):
    lm, model = loaded(name)
    tokens = _tokens(3, 40)
    ours = lm.logits(tokens)
    theirs, _ = ref.hf_logits_and_hidden(model, tokens)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_residuals_match_hf_hidden_states(loaded, name):
    lm, model = loaded(name)
    tokens = _tokens(2, 24, seed=1)
    ours = lm.residuals(tokens)
    _, hidden = ref.hf_logits_and_hidden(model, tokens)
    n_layers = lm.config.n_layers
    assert ours.shape == (n_layers, 2, 24, lm.config.d_model)
    # hidden_states[i + 1] is the output of layer i, except the last entry, which HF takes after
    # the final norm: compare that one against the raw residual captured by a forward hook.
    for i in range(n_layers - 1):
        np.testing.assert_allclose(ours[i], hidden[i + 1], atol=1e-5, rtol=0)
    raw = ref.hf_raw_residuals(model, tokens)
    np.testing.assert_allclose(ours, raw, atol=1e-5, rtol=0)
    assert np.abs(ours[-1] - hidden[-1]).max() > 1e-2, "last residual must differ from the normed output"


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_continuation_matches_hf_generate(loaded, name):
    lm, model = loaded(name)
    prompt = _tokens(1, 12, seed=2)
    ours = lm.generate(prompt.tolist(), max_new_tokens=32)[0].token_ids
    theirs = ref.hf_greedy(model, prompt, 32)[0].tolist()
    assert ours == theirs


def test_left_padded_batch_matches_unpadded_hf(loaded):
    lm, model = loaded("gqa_untied")
    rows = [_tokens(1, n, seed=n)[0].tolist() for n in (5, 17, 30)]
    ours = lm.logits(rows)
    for i, row in enumerate(rows):
        theirs, _ = ref.hf_logits_and_hidden(model, [row])
        np.testing.assert_allclose(ours[i, -len(row):], theirs[0], atol=1e-4, rtol=0)
    generations = lm.generate(rows, max_new_tokens=16)
    for row, gen in zip(rows, generations):
        assert gen.token_ids == ref.hf_greedy(model, [row], 16)[0].tolist()


def test_eos_stops_each_row(loaded):
    lm, model = loaded("mha_tied")
    prompt = _tokens(1, 10, seed=3)
    free_run = ref.hf_greedy(model, prompt, 20)[0].tolist()
    eos = free_run[6]
    lm_eos = jax_introspect.LanguageModel(lm.config, lm.params, _EosOnly(eos), path=lm.path)
    out = lm_eos.generate([prompt[0].tolist(), _tokens(1, 4, seed=9)[0].tolist()], max_new_tokens=20)
    assert out[0].token_ids == free_run[:free_run.index(eos) + 1] and out[0].finished
    hf_second = ref.hf_greedy(model, _tokens(1, 4, seed=9), 20, eos_token_id=eos)[0].tolist()
    assert out[1].token_ids == hf_second[:len(out[1].token_ids)]
    assert out[1].finished == (eos in hf_second)


class _EosOnly:
    """Minimal tokenizer stand-in: an EOS id and a pad id, no text."""

    def __init__(self, eos):
        self.eos_ids, self.pad_id = (eos,), 0

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied"])
def test_bfloat16_agrees_with_float32_hf(tmp_path, name):
    # Trained briefly so its predictions are confident like a real model's (see train_on_bigrams).
    hf_dir = os.path.join(tmp_path, "hf")
    model = ref.build_hf_model(name, hf_dir, train_steps=150)
    ckpt = os.path.join(tmp_path, "bf16")
    ref.run_convert(hf_dir, ckpt, dtype="bfloat16")
    lm = jax_introspect.load(ckpt)
    assert str(lm.dtype) == "bfloat16"
    tokens = ref.bigram_batch(np.random.RandomState(4), 4, 64, lm.config.vocab_size)
    ours = lm.logits(tokens)
    theirs, _ = ref.hf_logits_and_hidden(model, tokens)
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    kl = mean_kl(theirs, ours)
    print(f"{name} bfloat16 vs float32 HF: top-1 agreement {top1:.4f}, mean KL {kl:.2e}")
    assert top1 >= 0.99
    assert kl <= 1e-2


def test_llama3_tokenizer_travels_with_the_checkpoint(tmp_path):
    """A tiny model with Llama-3's vocabulary, converted with Meta's tokenizer.model: the loaded
    checkpoint tokenizes chat prompts exactly as Meta's reference tokenizer does."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from jax_introspect.tokenizer import llama3_tokenizer_model_path
    hf_dir = os.path.join(tmp_path, "hf")
    ref.build_hf_model("gqa_untied", hf_dir, vocab_size=128256, num_hidden_layers=1)
    ckpt = os.path.join(tmp_path, "ckpt")
    ref.run_convert(hf_dir, ckpt, extra=[f"--tokenizer={llama3_tokenizer_model_path()}"])
    lm = jax_introspect.load(ckpt)
    meta = MetaTokenizer(pathlib.Path(llama3_tokenizer_model_path()))
    text = "Tell me about dust."
    header = meta.encode("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024", bos=False, eos=False)
    expected = ([128000, 128006] + meta.encode("system", bos=False, eos=False) + [128007]
                + meta.encode("\n\n", bos=False, eos=False) + header + meta.encode("\n\n", bos=False, eos=False)
                + [128009, 128006] + meta.encode("user", bos=False, eos=False) + [128007]
                + meta.encode("\n\n", bos=False, eos=False) + meta.encode(text, bos=False, eos=False) + [128009, 128006]
                + meta.encode("assistant", bos=False, eos=False) + [128007] + meta.encode("\n\n", bos=False, eos=False))
    ours = lm.tokenizer.encode_chat([{"role": "user", "content": text}])
    assert ours == expected
    assert lm.tokenizer.eos_ids and 128009 in lm.tokenizer.eos_ids


def test_tokenizer_from_another_model_is_refused(tmp_path):
    from jax_introspect.tokenizer import llama3_tokenizer_model_path
    hf_dir = os.path.join(tmp_path, "hf")
    ref.build_hf_model("gqa_untied", hf_dir, num_hidden_layers=1)
    proc = ref.run_convert(hf_dir, os.path.join(tmp_path, "ckpt"), check=False,
                           extra=[f"--tokenizer={llama3_tokenizer_model_path()}"])
    assert proc.returncode != 0 and "different models" in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "ckpt"))
