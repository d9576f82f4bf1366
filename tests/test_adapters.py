"""Adapters as data (jax_introspect/adapters.py): LoRA and a residual bias inside the scanned decoder.

The reference is Hugging Face peft (LoRA on transformers' LlamaForCausalLM, torch autograd,
torch.optim.AdamW) and plain torch forward hooks for the bias; the injection side uses
launch.gpu_reference.Injection, torch hooks that reproduce our injection. Measured figures are
printed (pytest -s) and recorded in docs/adapters.md.
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jax_introspect
from jax_introspect import adapters, engine, inject
from jax_introspect import generate as generate_lib
from jax_introspect import model as model_lib
from jax_introspect.config import Quantization
from launch import gpu_reference
from tests import hf_reference as ref

ALL = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
HF_PARENT = {"wq": "self_attn", "wk": "self_attn", "wv": "self_attn", "wo": "self_attn",
             "w_gate": "mlp", "w_up": "mlp", "w_down": "mlp"}
# Float32 tolerances (measured values are printed; docs/adapters.md lists them).
LOGITS_TOL = 1e-4  # max |logits - peft's logits|
GRAD_TOL = 1e-5  # max |grad - torch's grad| / max |torch's grad|, per array
STEP_TOL = 1e-6  # max |weights after one AdamW step - torch's|


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """(hf folder, checkpoint, float32 LanguageModel): 3 layers, d_model 64, 4 query heads of 16, 2 KV heads."""
    hf_dir, ckpt, _ = tiny_models("gqa_untied")
    return hf_dir, ckpt, jax_introspect.load(ckpt)


def _tokens(batch, length, seed=0, vocab=256):
    return np.random.RandomState(seed).randint(1, vocab, size=(batch, length))


def _random_adapter(spec, cfg, seed, scale=0.1):
    """An adapter of `spec` with every array random (a, b, bias rows of the bias layers)."""
    adapter = adapters.init(spec, cfg, jax.random.PRNGKey(seed))
    rng = np.random.RandomState(seed)
    lora = {t: adapters.LoRA(a=rng.normal(0, scale, f.a.shape).astype(np.float32),
                             b=rng.normal(0, scale, f.b.shape).astype(np.float32)) for t, f in adapter.lora.items()}
    bias = rng.normal(0, 0.5, adapter.bias.shape).astype(np.float32) * np.asarray(adapter.bias_mask)[:, None]
    return adapter.replace(lora=lora, bias=bias)


# --- the torch reference -----------------------------------------------------------------------------

def _peft_model(hf_dir, spec, adapter, cfg):
    """A fresh transformers model with peft LoRA of `spec`, its lora_A/lora_B set from `adapter`
    (peft's lora_A.weight [r, in] = a[i] as [in, r] transposed; lora_B.weight [out, r] = b[i] as [r, out]
    transposed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    base = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if not spec.targets:
        return base, base
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
                        target_modules=[adapters.HF_MODULES[t] for t in spec.targets],
                        layers_to_transform=list(spec.lora_layers(cfg)))
    model = get_peft_model(base, config)
    model.eval()
    llama = model.base_model.model
    for target in spec.targets:
        a, b = np.asarray(adapter.lora[target].a), np.asarray(adapter.lora[target].b)
        for i in spec.lora_layers(cfg):
            module = _hf_module(llama, target, i)
            assert module.scaling["default"] == pytest.approx(spec.scale)
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(torch.from_numpy(a[i].reshape(-1, spec.rank).T.copy()))
                module.lora_B["default"].weight.copy_(torch.from_numpy(b[i].reshape(spec.rank, -1).T.copy()))
    return model, llama


def _hf_module(llama, target, layer):
    return getattr(getattr(llama.model.layers[layer], HF_PARENT[target]), adapters.HF_MODULES[target])


def _torch_lora_grads(llama, spec, cfg, adapter):
    """Our-layout gradients of every LoRA factor from the peft modules' .grad."""
    out = {}
    for target in spec.targets:
        a_shape, b_shape = np.shape(adapter.lora[target].a)[1:], np.shape(adapter.lora[target].b)[1:]
        for i in spec.lora_layers(cfg):
            module = _hf_module(llama, target, i)
            out[(target, "a", i)] = module.lora_A["default"].weight.grad.numpy().T.reshape(a_shape)
            out[(target, "b", i)] = module.lora_B["default"].weight.grad.numpy().T.reshape(b_shape)
    return out


class _Bias:
    """Forward hooks adding bias[i] to decoder layer i's output (register before an Injection: the
    bias comes first)."""

    def __init__(self, llama, bias, layers):
        self.bias = {i: torch.tensor(np.asarray(bias[i]), requires_grad=True) for i in layers}
        self.handles = [llama.model.layers[i].register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + self.bias[i]
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _torch_loss(model, tokens):
    ids = torch.as_tensor(tokens, dtype=torch.long)
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# --- our side ------------------------------------------------------------------------------------

def _loss_fn(lm, tokens, injection=None):
    """Mean next-token cross entropy as a function of the adapter (model.forward, one device)."""
    cfg, params = lm.run_config, lm.params
    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool)

    def loss(adapter):
        cache = model_lib.init_cache(cfg, tokens.shape[0], tokens.shape[1], params.embed.dtype)
        logits, _, _ = model_lib.forward(params, cfg, tokens, model_lib.prompt_positions(valid), valid, cache,
                                         layout=lm.layout, injection=injection, adapter=adapter)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return jax.jit(loss)


def _jax_adapter(adapter):
    return jax.tree.map(jnp.asarray, adapter)


def _rel_diff(ours, theirs):
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def _compare_lora_grads(grads, torch_grads, spec, cfg):
    worst = 0.0
    for (target, factor, i), theirs in torch_grads.items():
        ours = np.asarray(getattr(grads.lora[target], factor))[i]
        worst = max(worst, _rel_diff(ours, theirs))
    for target in spec.targets:  # layers the spec leaves out learn nothing
        for factor in ("a", "b"):
            g = np.asarray(getattr(grads.lora[target], factor))
            off = [i for i in range(cfg.n_layers) if i not in spec.lora_layers(cfg)]
            assert not np.any(g[off]), f"{target}.{factor}: masked layers {off} have non-zero gradients"
    return worst


# --- 1. a zero adapter is the base model ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_adapter_is_the_base_model_bit_for_bit(tiny, dtype):
    _, ckpt, lm32 = tiny
    lm = lm32 if dtype == "float32" else jax_introspect.load(ckpt, dtype=dtype)
    spec = adapters.AdapterSpec(rank=4, targets=ALL, layers=(0, 2), bias_layers=(1,))
    adapter = adapters.init(spec, lm.config, jax.random.PRNGKey(0))
    assert np.any(np.asarray(adapter.lora["wq"].a)) and not np.any(np.asarray(adapter.lora["wq"].b))
    tokens = [_tokens(1, 9, seed=1)[0].tolist(), _tokens(1, 5, seed=2)[0].tolist()]
    adapted = lm.with_adapter(adapter)
    np.testing.assert_array_equal(adapted.logits(tokens), lm.logits(tokens))
    np.testing.assert_array_equal(adapted.residuals(tokens), lm.residuals(tokens))
    assert lm.adapter is None and adapted.params is lm.params  # the base model is untouched, nothing copied
    # ...and a non-zero one does change them (the comparison above can fail).
    moved = lm.with_adapter(_random_adapter(spec, lm.config, seed=3))
    assert np.max(np.abs(moved.logits(tokens) - lm.logits(tokens))) > 1e-2


def test_init_follows_peft(tiny):
    """lora_A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), lora_B = 0."""
    cfg = tiny[2].config
    spec = adapters.AdapterSpec(rank=8, targets=ALL)
    adapter = adapters.init(spec, cfg, jax.random.PRNGKey(0))
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(ref.hf_config("gqa_untied")), LoraConfig(r=8, target_modules=["o_proj"]))
    theirs = model.base_model.model.model.layers[0].self_attn.o_proj.lora_A["default"].weight.detach().numpy()
    a = np.asarray(adapter.lora["wo"].a)
    fan_in = cfg.n_heads * cfg.head_dim
    assert a.shape == (cfg.n_layers, cfg.n_heads, cfg.head_dim, 8)
    assert np.abs(a).max() <= 1 / np.sqrt(fan_in) and np.abs(theirs).max() <= 1 / np.sqrt(fan_in)
    # Same distribution: the spread of U(-k, k) is k / sqrt(3) for both.
    assert np.std(a) == pytest.approx(np.std(theirs), rel=0.1)
    assert np.std(a) == pytest.approx(1 / np.sqrt(3 * fan_in), rel=0.1)
    for t in ALL:
        assert not np.any(np.asarray(adapter.lora[t].b))
    assert np.asarray(adapter.lora_mask).tolist() == [1.0] * cfg.n_layers
    assert adapter.scale == 2.0


# --- 2-3. forward and gradient parity with peft; one AdamW step ---------------------------------------

def test_lora_matches_peft_forward_gradients_and_one_adamw_step(tiny):
    hf_dir, _, lm = tiny
    cfg = lm.config
    spec = adapters.AdapterSpec(rank=4, alpha=8.0, targets=ALL, layers=(0, 2))
    adapter = _random_adapter(spec, cfg, seed=5)
    tokens = _tokens(2, 12, seed=6)
    model, llama = _peft_model(hf_dir, spec, adapter, cfg)

    # Forward.
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    ours = lm.with_adapter(adapter).logits(tokens)
    err = float(np.max(np.abs(ours - theirs)))
    print(f"\nLoRA logits vs peft: max abs diff {err:.2e} (tolerance {LOGITS_TOL:g})")
    assert err <= LOGITS_TOL
    assert np.max(np.abs(theirs - lm.logits(tokens))) > 1e-2  # the LoRA matters

    # Gradients of the mean cross entropy.
    loss_fn = _loss_fn(lm, tokens)
    params = _jax_adapter(adapter)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    torch_loss = _torch_loss(model, tokens)
    torch_loss.backward()
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-5)
    worst = _compare_lora_grads(grads, _torch_lora_grads(llama, spec, cfg, adapter), spec, cfg)
    print(f"LoRA gradients vs torch autograd: max relative diff {worst:.2e} (tolerance {GRAD_TOL:g})")
    assert worst <= GRAD_TOL

    # One AdamW step on each side.
    hp = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.1)
    adamw = optax.adamw(hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    opt = optax.multi_transform({True: adamw, False: optax.set_to_zero()}, adapters.trainable(params))
    assert not np.any(np.asarray(grads.lora_mask)) and not np.any(np.asarray(grads.bias_mask))
    updates, _ = opt.update(grads, opt.init(params), params)
    stepped = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(np.asarray(stepped.lora_mask), np.asarray(params.lora_mask))  # masks stay put
    # The optimizers are compared on the same gradients (ours, copied into .grad): the first Adam step
    # is ~lr * sign(g), which would amplify the ~1e-6 gradient round-off of elements with |g| ~ eps.
    for target in spec.targets:
        for i in spec.lora_layers(cfg):
            module = _hf_module(llama, target, i)
            for factor, lin in (("a", module.lora_A["default"]), ("b", module.lora_B["default"])):
                g = np.asarray(getattr(grads.lora[target], factor))[i]
                lin.weight.grad = torch.from_numpy(g.reshape(lin.weight.shape[::-1]).T.copy())
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    torch.optim.AdamW(lora_params, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
                      weight_decay=hp["weight_decay"]).step()
    step_err = 0.0
    for target in spec.targets:
        for i in spec.lora_layers(cfg):
            module = _hf_module(llama, target, i)
            a = module.lora_A["default"].weight.detach().numpy().T.reshape(np.shape(adapter.lora[target].a)[1:])
            b = module.lora_B["default"].weight.detach().numpy().T.reshape(np.shape(adapter.lora[target].b)[1:])
            step_err = max(step_err, float(np.max(np.abs(np.asarray(stepped.lora[target].a)[i] - a))),
                           float(np.max(np.abs(np.asarray(stepped.lora[target].b)[i] - b))))
    moved = max(float(np.max(np.abs(np.asarray(stepped.lora[t].a) - np.asarray(params.lora[t].a)))) for t in ALL)
    print(f"one AdamW step (lr {hp['lr']}): weights vs torch.optim.AdamW max abs diff {step_err:.2e} "
          f"(tolerance {STEP_TOL:g}; the step moved them by up to {moved:.1e})")
    assert moved > 1e-3 and step_err <= STEP_TOL


# --- 4. gradient through an injection --------------------------------------------------------------

def test_lora_gradient_through_an_injection_matches_torch(tiny):
    hf_dir, _, lm = tiny
    cfg = lm.config
    spec = adapters.AdapterSpec(rank=2, alpha=4.0, targets=("wq", "wv", "w_down"))
    adapter = _random_adapter(spec, cfg, seed=7)
    tokens = _tokens(1, 10, seed=8)
    vector = np.random.RandomState(9).normal(0, 1, cfg.d_model).astype(np.float32)
    injection = inject.make(1, 4.0, vector, start=3, norm_match="raw", batch=1)
    model, llama = _peft_model(hf_dir, spec, adapter, cfg)
    with gpu_reference.Injection(llama, 1, vector, 4.0, start=3, norm_match="raw"):
        torch_loss = _torch_loss(model, tokens)
        torch_loss.backward()
    loss, grads = jax.value_and_grad(_loss_fn(lm, tokens, jax.tree.map(jnp.asarray, injection)))(_jax_adapter(adapter))
    clean_loss = _loss_fn(lm, tokens)(_jax_adapter(adapter))
    assert abs(float(loss) - float(clean_loss)) > 1e-3  # the injection matters
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-5)
    worst = _compare_lora_grads(grads, _torch_lora_grads(llama, spec, cfg, adapter), spec, cfg)
    print(f"\nLoRA gradients with an injection (raw, layer 1) vs torch: max relative diff {worst:.2e}")
    assert worst <= GRAD_TOL
    # The same through LanguageModel.logits with the injection.
    with torch.no_grad(), gpu_reference.Injection(llama, 1, vector, 4.0, start=3, norm_match="raw"):
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    assert np.max(np.abs(lm.with_adapter(adapter).logits(tokens, injection=injection) - theirs)) <= LOGITS_TOL


# --- 5. the residual bias ---------------------------------------------------------------------------

def test_bias_matches_torch_hooks_and_comes_before_the_injection(tiny):
    """Bias on layers 0 and 2 and an injection scaled to the residual's norm at layer 2: torch adds
    the bias (hook registered first), then the injection, which sees the biased stream."""
    hf_dir, _, lm = tiny
    cfg = lm.config
    spec = adapters.AdapterSpec(targets=(), bias_layers=(0, 2))
    adapter = _random_adapter(spec, cfg, seed=10)
    assert not adapter.lora and not np.any(np.asarray(adapter.bias)[1])
    tokens = _tokens(2, 9, seed=11)
    vector = np.random.RandomState(12).normal(0, 1, cfg.d_model).astype(np.float32)
    injection = inject.make(2, 2.0, vector, norm_match="residual", batch=2)
    model, llama = _peft_model(hf_dir, spec, adapter, cfg)
    bias = _Bias(llama, np.asarray(adapter.bias), spec.bias_layers)
    try:
        with gpu_reference.Injection(llama, 2, vector, 2.0, norm_match="residual"):
            theirs = model(torch.as_tensor(tokens)).logits
            torch_loss = torch.nn.functional.cross_entropy(
                theirs[:, :-1].reshape(-1, theirs.shape[-1]), torch.as_tensor(tokens)[:, 1:].reshape(-1))
            torch_loss.backward()
    finally:
        bias.remove()
    ours = lm.with_adapter(adapter).logits(tokens, injection=injection)
    err = float(np.max(np.abs(ours - theirs.detach().numpy())))
    # Had the bias come after the injection, the injection's norm would differ:
    swapped = lm.with_adapter(adapter).logits(tokens, injection=inject.make(2, 0.0, vector, batch=2))
    assert np.max(np.abs(swapped - ours)) > 1e-2
    loss, grads = jax.value_and_grad(_loss_fn(lm, tokens, jax.tree.map(jnp.asarray, injection)))(_jax_adapter(adapter))
    g = np.asarray(grads.bias)
    worst = max(_rel_diff(g[i], bias.bias[i].grad.numpy()) for i in spec.bias_layers)
    print(f"\nbias logits vs torch hooks: max abs diff {err:.2e}; gradient max relative diff {worst:.2e}")
    assert err <= LOGITS_TOL and worst <= GRAD_TOL
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-5)
    assert not np.any(g[1]), "layer 1 has no bias: its gradient must be exactly 0"


# --- 6. one compiled program for adapters of one shape ------------------------------------------------

def test_adapters_of_one_shape_share_the_compiled_programs(tiny):
    _, _, lm = tiny
    cfg = lm.config
    spec = adapters.AdapterSpec(rank=4, targets=("wq", "wv", "w_up"), layers=(1, 2), bias_layers=(0,))
    prompts = [_tokens(1, n, seed=n)[0].tolist() for n in (5, 9, 12)]
    gen_before = generate_lib.generate_tokens._cache_size()
    prefill_before = jax_introspect.lm._prefill._cache_size()
    engine_before = engine.run._cache_size()
    texts = []
    for seed in range(3):
        adapted = lm.with_adapter(_random_adapter(spec, cfg, seed=20 + seed, scale=0.3))
        injection = inject.make([seed % 3, 1, 2], [0.0, 2.0 + seed, 4.0],
                                np.random.RandomState(seed).normal(0, 1, (3, cfg.d_model)), norm_match=seed % 3)
        texts.append([g.token_ids for g in adapted.generate(prompts, max_new_tokens=4, injection=injection)])
        adapted.logits(prompts, injection=injection)
        # the sweep engine (a sweep's default) runs the adapter too: the same texts, one program
        shared = adapted.generate_shared(prompts, max_new_tokens=4, injection=injection, slots=2, trials=4)
        assert [g.token_ids for g in shared] == texts[-1]
    generated = generate_lib.generate_tokens._cache_size() - gen_before
    prefilled = jax_introspect.lm._prefill._cache_size() - prefill_before
    engine_programs = engine.run._cache_size() - engine_before
    print(f"\n3 adapters x 3 injections: {generated} generate, {prefilled} prefill, {engine_programs} engine compiles")
    assert generated <= 1 and prefilled <= 1 and engine_programs <= 1
    assert texts[0] != texts[1]  # the adapters do change what is generated


# --- 7. sharded ---------------------------------------------------------------------------------------

_SHARDED = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    import jax_introspect
    from jax_introspect import adapters, sharding
    ckpt, out = sys.argv[1], sys.argv[2]
    base = jax_introspect.load(ckpt, mesh=sharding.make_mesh("1x1", jax.devices()[:1]))
    cfg = base.config
    spec = adapters.AdapterSpec(rank=4, targets=%r, layers=(0, 2), bias_layers=(1, 2))
    adapter = adapters.init(spec, cfg, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    adapter = adapter.replace(
        lora={t: adapters.LoRA(a=np.asarray(f.a), b=rng.normal(0, 0.2, f.b.shape).astype(np.float32))
              for t, f in adapter.lora.items()},
        bias=rng.normal(0, 0.5, adapter.bias.shape).astype(np.float32) * np.asarray(adapter.bias_mask)[:, None])
    tokens = [rng.randint(1, 256, 11).tolist(), rng.randint(1, 256, 7).tolist()]
    reference = base.with_adapter(adapter).logits(tokens)
    report = {"moved": float(np.abs(reference - base.logits(tokens)).max())}
    for mesh in ("1x2", "2x2", "1x4"):
        n = int(mesh[0]) * int(mesh[2])
        lm = jax_introspect.load(ckpt, mesh=sharding.make_mesh(mesh, jax.devices()[:n])).with_adapter(adapter)
        specs = {f"{t}.{n}": str(tuple(getattr(lm.adapter.lora[t], n).sharding.spec)) for t in lm.adapter.lora
                 for n in ("a", "b")}
        specs["bias"] = str(tuple(lm.adapter.bias.sharding.spec))
        report[mesh] = {"diff": float(np.abs(lm.logits(tokens) - reference).max()), "specs": specs,
                        "kv_heads": lm.layout.kv_heads, "wk.b": list(lm.adapter.lora["wk"].b.shape)}
    json.dump(report, open(out, "w"))
""") % (ALL,)


def test_sharded_adapter_matches_one_device(tiny, tmp_path):
    _, ckpt, _ = tiny
    script, out = tmp_path / "sharded.py", tmp_path / "report.json"
    script.write_text(_SHARDED)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), ckpt, str(out)], cwd=ref.REPO, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    print("\nsharded adapted logits vs one device: " + ", ".join(f"{m} {report[m]['diff']:.1e}"
                                                               for m in ("1x2", "2x2", "1x4")))
    assert report["moved"] > 1e-2
    none2 = "(None, None)"
    for mesh in ("1x2", "2x2", "1x4"):
        r = report[mesh]
        assert r["diff"] <= 1e-5, (mesh, r["diff"])
        specs = r["specs"]
        # a: the weight's input axes; b: its output axes; the layer and rank axes replicated.
        assert specs["wq.a"] == "(None, None, None)" and specs["wq.b"] == "(None, None, 'tensor', None)"
        assert specs["wk.b"] == specs["wv.b"] == "(None, None, 'tensor', None)"
        assert specs["wo.a"] == "(None, 'tensor', None, None)" and specs["wo.b"] == "(None, None, None)"
        assert specs["w_gate.b"] == specs["w_up.b"] == "(None, None, 'tensor')"
        assert specs["w_down.a"] == "(None, 'tensor', None)" and specs["w_down.b"] == "(None, None, None)"
        assert specs["bias"] == none2
    # 4-way tensor parallelism over 2 KV heads holds each twice: wk/wv's b is repeated to match.
    assert report["1x4"]["kv_heads"] == 4 and report["1x4"]["wk.b"] == [3, 4, 4, 16]
    assert report["1x2"]["wk.b"] == [3, 4, 2, 16]


# --- 8. files and refusals ------------------------------------------------------------------------

def test_save_load_round_trip(tiny, tmp_path):
    _, _, lm = tiny
    cfg = lm.config
    spec = adapters.AdapterSpec(rank=3, alpha=6.0, targets=("wk", "wo", "w_gate"), layers=(1,), bias_layers=(0, 2))
    adapter = _random_adapter(spec, cfg, seed=30)
    path = str(tmp_path / "adapter")
    adapters.save(path, adapter, spec, metadata={"steps": 12, "note": "test"})
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    loaded, loaded_spec, metadata = adapters.load(path, cfg)
    assert loaded_spec == spec and metadata == {"steps": 12, "note": "test"}
    assert adapters.digest(loaded) == adapters.digest(adapter)
    for (name, x), (_, y) in zip(adapters.flat_arrays(loaded).items(), adapters.flat_arrays(adapter).items()):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    assert AdapterSpecRoundTrip(spec)
    np.testing.assert_array_equal(lm.with_adapter(loaded).logits([[1, 2, 3, 4]]),
                                  lm.with_adapter(adapter).logits([[1, 2, 3, 4]]))
    placed, _, _ = adapters.load(path, cfg, layout=lm.layout)
    assert isinstance(placed.bias, jax.Array) and placed.bias.sharding == lm.layout.sharding("layers", "embed")
    # Saving again replaces it; a changed array changes the digest.
    other = adapter.replace(bias=np.asarray(adapter.bias) + np.asarray(adapter.bias_mask)[:, None])
    adapters.save(path, other, spec)
    assert adapters.digest(adapters.load(path, cfg)[0]) == adapters.digest(other) != adapters.digest(adapter)
    # A damaged folder is refused.
    record = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    record["digest"] = adapters.digest(adapter)
    (tmp_path / "adapter" / "adapter.json").write_text(json.dumps(record))
    with pytest.raises(adapters.AdapterError, match="damaged"):
        adapters.load(path, cfg)


def AdapterSpecRoundTrip(spec):
    return adapters.AdapterSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("fields, message", [
    (dict(rank=0), "rank=0 must be an integer >= 1"),
    (dict(rank=2.5), "rank=2.5"),
    (dict(alpha=-1.0), "alpha=-1.0"),
    (dict(targets=("wq", "q_proj")), r"targets \['q_proj'\] are not projections"),
    (dict(targets=("wq", "wq")), "targets .* twice"),
    (dict(targets=("attn_norm",)), r"targets \['attn_norm'\]"),
    (dict(layers=(0, 3)), r"layers \[3\] out of range: the model has layers 0..2"),
    (dict(bias_layers=(-1,)), r"bias_layers \[-1\] out of range"),
    (dict(targets=(), bias_layers=()), "change nothing"),
    (dict(rank=65), "rank=65 exceeds"),
])
def test_bad_specs_are_refused_naming_the_field(tiny, fields, message):
    cfg = tiny[2].config
    spec = adapters.AdapterSpec(**fields)
    with pytest.raises(adapters.AdapterError, match=message):
        spec.validate(cfg)
    with pytest.raises(adapters.AdapterError, match=message):
        adapters.init(spec, cfg, jax.random.PRNGKey(0))


def test_fp8_targets_and_other_models_are_refused(tiny, tmp_path):
    cfg = tiny[2].config
    fp8 = dataclasses.replace(cfg, quantization=Quantization(weights=("wq", "wk", "wv", "wo")))
    with pytest.raises(adapters.AdapterError, match=r"targets \['wq', 'wv'\] are FP8.*numerics='dequantized'"):
        adapters.AdapterSpec().validate(fp8)
    adapters.AdapterSpec(targets=("w_up",)).validate(fp8)  # unquantized targets are fine
    with pytest.raises(adapters.AdapterError, match="unknown fields"):
        adapters.AdapterSpec.from_dict({"rank": 4, "dropout": 0.1})

    spec = adapters.AdapterSpec(rank=2, targets=("wq", "w_up"), bias_layers=(0,))
    adapter = _random_adapter(spec, cfg, seed=40)
    path = str(tmp_path / "adapter")
    adapters.save(path, adapter, spec)
    wider = dataclasses.replace(cfg, d_model=128)
    with pytest.raises(adapters.AdapterError, match="made for d_model=64 but this model has d_model=128"):
        adapters.load(path, wider)
    with pytest.raises(adapters.AdapterError, match="n_layers=3 but this model has n_layers=2"):
        adapters.load(path, dataclasses.replace(cfg, n_layers=2))
    with pytest.raises(adapters.AdapterError, match=r"lora.w_up.b has shape \[3, 2, 128\] but this model needs "
                                                    r"\[3, 2, 256\]"):
        adapters.load(path, dataclasses.replace(cfg, d_ff=256))
    with pytest.raises(adapters.AdapterError, match="not an adapter folder"):
        adapters.load(str(tmp_path), cfg)
    # An in-memory adapter of another model is refused by with_adapter before anything runs.
    other = adapters.init(spec, wider, jax.random.PRNGKey(0))
    with pytest.raises(adapters.AdapterError, match=r"lora.w_up.a has shape \(3, 128, 2\).*needs \(3, 64, 2\).*another model"):
        tiny[2].with_adapter(other)


# --- 9. the sweep -------------------------------------------------------------------------------------

SWEEP_SMALL = ["--config.words=('Dust',)", "--config.layers=1", "--config.strengths=4.0",
               "--config.trials_per_cell=2", "--config.control_trials=1", "--config.max_new_tokens=4",
               "--config.batch_size=4", "--config.baseline_words=('Desks','Jackets')", "--noreport"]


def _sweep(checkpoint, out, *extra):
    cmd = [sys.executable, "-m", "launch.sweep", "--config=configs/sweeps/quickstart.py",
           f"--checkpoint={checkpoint}", f"--out={out}", *SWEEP_SMALL, *extra]
    return subprocess.run(cmd, cwd=ref.REPO, capture_output=True, text=True, timeout=600)


def test_sweep_runs_an_adapter_and_binds_its_folder_to_it(tmp_path):
    from jax_introspect import checkpoint as ckpt_lib
    checkpoint = ref.build_llama3_checkpoint(tmp_path / "model")
    cfg = ckpt_lib.load_config(checkpoint)
    spec = adapters.AdapterSpec(rank=2, targets=("wq", "w_down"), bias_layers=(1,))
    adapter = _random_adapter(spec, cfg, seed=50)
    first, second = str(tmp_path / "adapter1"), str(tmp_path / "adapter2")
    adapters.save(first, adapter, spec)
    adapters.save(second, _random_adapter(spec, cfg, seed=51), spec)
    out = tmp_path / "run"
    proc = _sweep(checkpoint, out, f"--adapter={first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(records) == 3
    run_info = json.loads((out / "run.json").read_text())
    assert adapters.digest(adapter) in json.dumps(run_info)
    assert records[0]["config_hash"] == run_info["config_hash"]
    from jax_introspect.experiment import report
    assert report.load_run(str(out)).metadata["adapter"] == adapters.digest(adapter)  # the report names it
    again = _sweep(checkpoint, out, f"--adapter={first}")
    assert again.returncode == 0 and "(3 already done, 0 run now)" in again.stdout
    for extra in ([], [f"--adapter={second}"]):
        refused = _sweep(checkpoint, out, *extra)
        assert refused.returncode != 0 and "error:" in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr
    assert len((out / "trials.jsonl").read_text().splitlines()) == 3
    # An adapter of another model is refused before the weights load.
    wrong = str(tmp_path / "wrong")
    adapters.save(wrong, adapters.init(spec, dataclasses.replace(cfg, d_model=32), jax.random.PRNGKey(0)), spec)
    refused = _sweep(checkpoint, tmp_path / "run2", f"--adapter={wrong}")
    assert refused.returncode != 0 and "--adapter:" in refused.stderr and "d_model=32" in refused.stderr
    assert not (tmp_path / "run2").exists()

    # The self-hosted judge runs with an adapter too: llm:<checkpoint>@<adapter folder>.
    from jax_introspect.experiment import grading
    judge = grading.make_grader(f"llm:{checkpoint}@{first}", max_new_tokens=4, batch_size=2)
    assert judge.name == "llm:ckpt@adapter1" and judge.lm.adapter_digest == adapters.digest(adapter)
    ids = judge.lm.tokenizer.encode(judge.chat_text("Is this answer coherent?"))
    base = judge.lm.with_adapter(None)
    assert np.abs(judge.lm.logits([ids]) - base.logits([ids])).max() > 1e-3
    grading.check_grader(f"replication:llm:{checkpoint}@{first}")
    with pytest.raises(adapters.AdapterError, match="d_model=32"):
        grading.check_grader(f"llm:{checkpoint}@{wrong}")
    with pytest.raises(ValueError, match="<checkpoint folder>@<adapter folder>"):
        grading.check_grader(f"llm:{checkpoint}@")
