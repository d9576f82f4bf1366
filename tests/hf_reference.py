"""Reference side of the parity tests: tiny random Llama-3.1 models in HF transformers (torch)."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}

# head_dim 16 -> 8 rotary frequencies; with original_max_position_embeddings=64 their wavelengths
# (6.3 .. ~3e5 tokens) fall in all three llama3 regimes (kept / interpolated / divided by factor).
TINY_CONFIGS = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       rope_scaling=_LLAMA3_ROPE),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                     rope_scaling=_LLAMA3_ROPE),
    "gqa_plain_rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                           rope_scaling=None),
}


def hf_config(name, **overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, head_dim=16,
              rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=512)
    kw.update(TINY_CONFIGS[name])
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_hf_model(name, folder, seed=0, train_steps=0, **overrides):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(name, **overrides))
    if train_steps:
        train_on_bigrams(model, train_steps, seed)
    model.eval().save_pretrained(folder)
    return model


def bigram_batch(rng, batch, length, vocab):
    """A low-entropy synthetic language: each token is followed by its successor 90% of the time."""
    successor = np.random.RandomState(1234).permutation(vocab)
    out = np.empty((batch, length), np.int64)
    out[:, 0] = rng.randint(0, vocab, batch)
    for t in range(1, length):
        noise = rng.randint(0, vocab, batch)
        out[:, t] = np.where(rng.rand(batch) < 0.9, successor[out[:, t - 1]], noise)
    return out


def train_on_bigrams(model, steps, seed=0):
    """A random model's logits are nearly flat (top-2 gaps ~0.1), so bf16 round-off flips its argmax
    at a few percent of positions whatever the implementation; a briefly trained model is confident
    like a real one, which is the regime where top-1 agreement is meaningful."""
    rng = np.random.RandomState(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = torch.as_tensor(bigram_batch(rng, 16, 64, model.config.vocab_size))
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# Deterministic builds made once per test process and copied to every later caller (a copy is the
# same files: the builds are seeded, and the conversion of a given source is a pure function of it).
# The tiny Llama-3 checkpoint is built by a dozen test modules and SmolLM2 converted by six; on CI's
# 2 cores each build took 11 s and each SmolLM2 conversion 17 s.
_BUILT = {}  # key -> (folder, what the build returned)
_BUILD_ROOT = []  # this process's directory of builds, removed when it exits


def _built_once(key, build):
    """(folder, result) of `build(folder)`, run the first time this process asks for `key`."""
    if not _BUILD_ROOT:
        _BUILD_ROOT.append(tempfile.mkdtemp(prefix="jax_introspect_test_builds_"))
        atexit.register(shutil.rmtree, _BUILD_ROOT[0], True)
    if key not in _BUILT:
        folder = os.path.join(_BUILD_ROOT[0], str(len(_BUILT)))
        _BUILT[key] = folder, build(folder)  # a failed build raises and caches nothing
    return _BUILT[key]


def run_convert(source, out, dtype="float32", extra=(), check=True):
    if source == "smollm2" and not extra and check:  # the shipped GGUF: convert once per process
        cached, proc = _built_once(("smollm2", dtype), lambda folder: _convert(source, folder, dtype, extra, check))
        shutil.copytree(cached, out)
        return proc
    return _convert(source, out, dtype, extra, check)


def _convert(source, out, dtype, extra, check):
    cmd = [sys.executable, "-m", "launch.convert", f"--source={source}", f"--out={out}", f"--dtype={dtype}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if check and proc.returncode != 0:
        raise AssertionError(f"convert failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def build_and_convert(name, root):
    hf_dir = os.path.join(root, f"{name}_hf")
    model = build_hf_model(name, hf_dir)
    ckpt = os.path.join(root, f"{name}_ckpt")
    run_convert(hf_dir, ckpt)
    return hf_dir, ckpt, model


def hf_logits_and_hidden(model, tokens, attention_mask=None):
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        kw = {}
        if attention_mask is not None:
            mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
            kw = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        out = model(ids, output_hidden_states=True, **kw)
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


def hf_raw_residuals(model, tokens):
    """The residual stream after every decoder layer, captured by our own forward hooks (HF's last
    hidden_states entry is after the final norm)."""
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o).detach().float().numpy()))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return np.stack(captured)


def hf_greedy(model, tokens, max_new_tokens, eos_token_id=None):
    with torch.no_grad():
        out = model.generate(torch.as_tensor(np.asarray(tokens), dtype=torch.long), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if eos_token_id is None else 0,
                             eos_token_id=eos_token_id, pad_token_id=0, top_p=None, top_k=None, temperature=None)
    return out[:, np.asarray(tokens).shape[1]:].numpy()


def mean_kl(reference_logits, logits):
    """Mean over positions of KL(reference || ours), in float64."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p, q = log_softmax(reference_logits), log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def hf_greedy_with_logits(model, tokens, max_new_tokens):
    """Greedy continuation and the raw logits of each step."""
    with torch.no_grad():
        out = model.generate(torch.as_tensor(np.asarray(tokens), dtype=torch.long), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0,
                             top_p=None, top_k=None, temperature=None, output_logits=True,
                             return_dict_in_generate=True)
    new = out.sequences[:, np.asarray(tokens).shape[1]:].numpy()
    return new, np.stack([l.float().numpy() for l in out.logits], axis=1)


def load_hf_smollm2():
    """HF transformers' LlamaForCausalLM from the shipped SmolLM2 GGUF (dequantized to float32),
    and its tokenizer: the real-weights reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jax_introspect.convert.gguf_file import smollm2_path
    path = smollm2_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def build_llama3_checkpoint(root):
    """A converted 2-layer tiny Llama-3.1 with the real Llama-3 vocabulary and tokenizer (what a
    sweep needs: chat template, anchors, protocol prompts). Returns the checkpoint path."""
    from jax_introspect.tokenizer import llama3_tokenizer_model_path

    def build(folder):
        build_hf_model("gqa_untied", os.path.join(folder, "hf"), vocab_size=128256, num_hidden_layers=2)
        run_convert(os.path.join(folder, "hf"), os.path.join(folder, "ckpt"),
                    extra=[f"--tokenizer={llama3_tokenizer_model_path()}"])
    cached, _ = _built_once("llama3", build)
    for name in ("hf", "ckpt"):
        shutil.copytree(os.path.join(cached, name), os.path.join(root, name))
    return os.path.join(str(root), "ckpt")
