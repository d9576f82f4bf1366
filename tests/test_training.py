"""Training introspection (jax_introspect/experiment/training): the answer-token mask and the DPO
loss against transformers (torch) on the same tiny Llama-3.1, the held-out split, that training
lowers the loss, and resume after SIGKILL to the same loss curve.

The reference side is independent of ours: HF `LlamaForCausalLM` on each whole sequence
(prompt + answer, no padding), our injection written as torch forward hooks
(`launch/gpu_reference.Injection`), LoRA merged into the torch weights (W_hf += scale * (a @ b).T,
peft's merge), cross-entropy and TRL's sigmoid DPO loss written out in torch/numpy.
"""
import copy
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import jax

from tests import hf_reference as ref

WORDS = ("Dust", "Oceans", "Bread", "Snow", "Silver", "Volcanoes")
HELDOUT = ("Snow", "Silver")
BASELINE = ("Apples", "Chairs", "Rivers", "Clocks", "Lamps", "Forks")

CONFIG_FILE = """
from jax_introspect.experiment.training.config import TrainConfig

def get_config():
    return TrainConfig(**{kwargs!r})
"""


def small_config(**overrides):
    from jax_introspect.experiment.training.config import TrainConfig
    kw = dict(words=WORDS, heldout_words=HELDOUT, baseline_words=BASELINE, layers=(1,), strength_range=(2.0, 8.0),
              steps=6, batch_size=2, grad_accum=2, warmup_steps=1, learning_rate=3e-2, checkpoint_every=3,
              lora_targets=("wq", "wv"), seed=3)
    kw.update(overrides)
    return TrainConfig(**kw), kw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path, our LanguageModel, HF torch model) of a 2-layer tiny Llama-3.1 with the real
    Llama-3 tokenizer."""
    import jax_introspect
    from transformers import LlamaForCausalLM
    root = tmp_path_factory.mktemp("train_tiny")
    ckpt = ref.build_llama3_checkpoint(root)
    hf = LlamaForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32).eval()
    return ckpt, jax_introspect.load(ckpt), hf


@pytest.fixture(scope="module")
def plan_and_vectors(tiny):
    from jax_introspect.experiment.training import data, loop
    ckpt, lm, _ = tiny
    from jax_introspect.experiment.training.config import WINDOWS
    config, _ = small_config(batch_size=4, windows=WINDOWS)  # every window, single_token included
    plan = data.plan_data(config, lm.config, lm.tokenizer)
    concept = loop.concept_vectors(lm, plan, str(os.path.dirname(ckpt)))
    return config, plan, concept


def _examples(plan, lm, index):
    from jax_introspect.experiment.training import data
    return data.examples(plan, lm.tokenizer, index)


def _hf_answer_logps(hf, ex, answer_ids):
    """Per-token log-probs of `answer_ids` after `ex.prompt_ids` under the HF model, with the
    example's injection as torch hooks: one unpadded sequence."""
    from launch.gpu_reference import Injection
    ids = list(ex.prompt_ids) + list(answer_ids)
    with torch.no_grad():
        if ex.strength:
            with_hook = Injection(hf, ex.layer, ex.vector, ex.strength, ex.start, "raw", end=ex.end)
            try:
                logits = hf(torch.tensor([ids])).logits[0].float()
            finally:
                with_hook.remove()
        else:
            logits = hf(torch.tensor([ids])).logits[0].float()
    n = len(ex.prompt_ids)
    logp = torch.log_softmax(logits[n - 1:n - 1 + len(answer_ids)], dim=-1)
    return logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].numpy().astype(np.float64)


class _WithVector:
    """An Example with its injected vector attached (for the torch hooks)."""
    def __init__(self, ex, concept):
        self.__dict__.update(ex.__dict__)
        self.vector = concept.vector(ex.word, ex.layer) if ex.word else None


def _rows(plan, lm, concept, indices):
    exs = [e for i in indices for e in _examples(plan, lm, i)]
    kinds = {(e.kind, e.window) for e in exs}
    assert any(e.kind == "control" for e in exs) and any(e.kind == "injected" for e in exs), kinds
    return exs


def test_sft_loss_is_cross_entropy_of_exactly_the_answer_tokens(tiny, plan_and_vectors):
    from jax_introspect.experiment.training import data, loop, objectives
    _, lm, hf = tiny
    config, plan, concept = plan_and_vectors
    exs = _rows(plan, lm, concept, [0, 1])
    batch = data.to_batch(plan, exs, concept, lm.tokenizer.pad_id, lm.config.d_model)
    arrays = loop.place_arrays(batch, lm.layout)
    ours_tokens, mask = jax.jit(objectives.answer_token_logps, static_argnames=("cfg", "layout"))(
        lm.params, lm.run_config, arrays, None, layout=lm.layout)
    ours_tokens, mask = np.asarray(ours_tokens), np.asarray(mask)
    loss, _ = jax.jit(objectives.sft_loss, static_argnames=("cfg", "layout"))(
        None, lm.params, lm.run_config, arrays, layout=lm.layout)
    total, count = 0.0, 0
    for i, ex in enumerate(exs):
        ex = _WithVector(ex, concept)
        assert mask[i].sum() == len(ex.chosen_ids)  # the answer and its end-of-turn token, nothing else
        assert ex.chosen_ids[-1] == plan.end_id
        reference = _hf_answer_logps(hf, ex, ex.chosen_ids)
        np.testing.assert_allclose(ours_tokens[i, :len(ex.chosen_ids)], reference, rtol=1e-4, atol=2e-4)
        total -= reference.sum()
        count += len(ex.chosen_ids)
    # torch's own cross-entropy over the whole sequence with the prompt labels set to -100
    ex = _WithVector(exs[0], concept)
    ids = list(ex.prompt_ids) + list(ex.chosen_ids)
    labels = [-100] * len(ex.prompt_ids) + list(ex.chosen_ids)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0] if not ex.strength else None
    if logits is not None:
        ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=-100)
        assert abs(float(ce) + ours_tokens[0, :len(ex.chosen_ids)].mean()) < 2e-4
    assert abs(float(loss) - total / count) < 2e-4 * abs(total / count)


def test_single_token_window_injects_only_the_final_prompt_token(tiny, plan_and_vectors):
    """`single_token` (Rivera 2025): start = the final prompt token's position, end = start + 1, so
    the answer tokens are not injected. One injected example in each of the four windows: our
    answer-token log-probs equal HF's with the torch hooks of the same window (rtol 1e-4,
    atol 2e-4, float32), and single_token's differ from last_token's (whose injection runs on
    through the answer) by far more than that."""
    import dataclasses

    from jax_introspect import inject
    from jax_introspect.experiment.training import data, loop, objectives
    _, lm, hf = tiny
    config, plan, concept = plan_and_vectors
    base = next(e for i in range(40) for e in _examples(plan, lm, i) if e.kind == "injected")
    n = len(base.prompt_ids)
    info = plan.prompts[base.protocol]
    expected = {"protocol": (info.start, None), "last_token": (n - 1, None), "single_token": (n - 1, n),
                "all_positions": (0, None)}
    drawn = {e.window: e for i in range(40) for e in _examples(plan, lm, i)}
    for window, (start, end) in expected.items():
        assert (drawn[window].start, drawn[window].end) == (start, end), window
    exs = [dataclasses.replace(base, window=w, start=start, end=end) for w, (start, end) in expected.items()]
    batch = data.to_batch(plan, exs, concept, lm.tokenizer.pad_id, lm.config.d_model)
    assert batch.end.tolist() == [inject.NO_END, inject.NO_END, n, inject.NO_END]
    injection = batch.injection()
    assert injection.start.tolist() == [e.start for e in exs] and injection.end.tolist() == batch.end.tolist()
    arrays = loop.place_arrays(batch, lm.layout)
    np.testing.assert_array_equal(np.asarray(arrays["injection"].end), batch.end)
    ours, _ = jax.jit(objectives.answer_token_logps, static_argnames=("cfg", "layout"))(
        lm.params, lm.run_config, arrays, None, layout=lm.layout)
    ours = np.asarray(ours)[:, :len(base.chosen_ids)]
    worst = 0.0
    for i, ex in enumerate(exs):
        reference = _hf_answer_logps(hf, _WithVector(ex, concept), ex.chosen_ids)
        np.testing.assert_allclose(ours[i], reference, rtol=1e-4, atol=2e-4, err_msg=ex.window)
        worst = max(worst, float(np.abs(ours[i] - reference).max()))
    print(f"answer log-probs vs HF hooks, four windows: max abs difference {worst:.1e}")
    last_token, single_token = ours[1], ours[2]
    # The first answer token is predicted from the injected final prompt token in both windows.
    assert abs(last_token[0] - single_token[0]) < 2e-4
    assert np.abs(last_token[1:] - single_token[1:]).max() > 1e-2


def _random_adapter(lm, spec, seed):
    from jax_introspect import adapters
    ad = adapters.init(spec, lm.config, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    lora = {t: adapters.LoRA(a=np.asarray(f.a), b=0.05 * rng.standard_normal(np.shape(f.b)).astype(np.float32))
            for t, f in ad.lora.items()}
    return adapters.place(ad.replace(lora=lora), lm.config, lm.layout)


def _merged_hf(hf, adapter):
    """A copy of the HF model with the LoRA merged into its weights (peft's merge: W += scale * B @ A)."""
    merged = copy.deepcopy(hf)
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    mask = np.asarray(adapter.lora_mask)
    for target, f in adapter.lora.items():
        a, b = np.asarray(f.a), np.asarray(f.b)
        r = a.shape[-1]
        for layer in range(a.shape[0]):
            delta = adapter.scale * mask[layer] * (a[layer].reshape(-1, r) @ b[layer].reshape(r, -1))  # [in, out]
            module = merged.model.layers[layer].get_submodule(names[target])
            with torch.no_grad():
                module.weight += torch.from_numpy(delta.T.astype(np.float32))
    return merged


def test_dpo_loss_equals_trl_sigmoid_loss_on_hf_logprobs(tiny, plan_and_vectors):
    from jax_introspect import adapters
    from jax_introspect.experiment.training import data, loop, objectives
    _, lm, hf = tiny
    config, plan, concept = plan_and_vectors
    exs = _rows(plan, lm, concept, [2, 3])
    assert {e.rejected_kind for e in exs} >= {"false_detection"}
    batch = data.to_batch(plan, exs, concept, lm.tokenizer.pad_id, lm.config.d_model, pairs=True)
    arrays = loop.place_arrays(batch, lm.layout)
    spec = adapters.AdapterSpec(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))
    policy = _random_adapter(lm, spec, seed=1)
    beta = 0.3
    fn = jax.jit(objectives.dpo_loss, static_argnames=("cfg", "layout", "beta"))
    loss, metrics = fn(policy, lm.params, lm.run_config, arrays, layout=lm.layout, beta=beta)
    merged = _merged_hf(hf, policy)
    pc, pr, rc, rr = [], [], [], []
    for ex in exs:
        ex = _WithVector(ex, concept)
        pc.append(_hf_answer_logps(merged, ex, ex.chosen_ids).sum())
        pr.append(_hf_answer_logps(merged, ex, ex.rejected_ids).sum())
        rc.append(_hf_answer_logps(hf, ex, ex.chosen_ids).sum())
        rr.append(_hf_answer_logps(hf, ex, ex.rejected_ids).sum())
    pc, pr, rc, rr = map(torch.tensor, (pc, pr, rc, rr))
    # TRL DPOTrainer, loss_type="sigmoid", label_smoothing=0:
    logits = (pc - pr) - (rc - rr)
    trl = (-torch.nn.functional.logsigmoid(beta * logits)).mean()
    assert abs(float(loss) - float(trl)) < 1e-4, (float(loss), float(trl))
    assert abs(float(metrics["reward_margin"]) - float(beta * logits.mean())) < 1e-4
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    assert float(metrics["reward_accuracy"]) == float((chosen_rewards > rejected_rewards).float().mean())
    assert float(abs(logits).max()) > 0.1  # the policy really differs from the reference
    # The zero adapter is the reference: loss log 2 exactly.
    zero = adapters.place(adapters.init(spec, lm.config, jax.random.PRNGKey(0)), lm.config, lm.layout)
    loss0, _ = fn(zero, lm.params, lm.run_config, arrays, layout=lm.layout, beta=beta)
    assert abs(float(loss0) - np.log(2.0)) < 1e-6


def test_heldout_words_never_in_training_data(tiny, plan_and_vectors):
    from jax_introspect.experiment.training import data
    _, lm, _ = tiny
    config, plan, concept = plan_and_vectors
    assert sorted(plan.heldout_words) == sorted(HELDOUT) and not set(plan.train_words) & set(HELDOUT)
    assert set(concept.names) == set(plan.train_words)
    seen_words, kinds, windows = set(), set(), set()
    for index in range(60):
        for ex in _examples(plan, lm, index):
            text = (ex.chosen + " " + ex.rejected + " " + lm.tokenizer.decode(list(ex.chosen_ids + ex.rejected_ids)))
            for w in HELDOUT:
                assert w.lower() not in text.lower() and ex.word != w and ex.rejected_word != w
            seen_words.add(ex.word)
            kinds.add((ex.kind, ex.rejected_kind))
            windows.add(ex.window)
            assert config.strength_range[0] <= ex.strength <= config.strength_range[1] or ex.kind == "control"
    assert seen_words - {None} == set(plan.train_words)
    assert windows == {"protocol", "last_token", "single_token", "all_positions"}
    assert kinds == {("control", "false_detection"), ("injected", "denial"), ("injected", "wrong_concept")}
    # The check can fail: an example naming a held-out word is refused.
    bad = _examples(plan, lm, 0)[0]
    import dataclasses
    with pytest.raises(AssertionError):
        data.check_heldout([dataclasses.replace(bad, chosen="Yes, it is about silver.")], plan.heldout_words)
    # Same (seed, index) -> the same micro-batch; another index -> another.
    assert _examples(plan, lm, 7) == _examples(plan, lm, 7) != _examples(plan, lm, 8)


def _cli(config_kwargs, ckpt, out, tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(CONFIG_FILE.format(kwargs=config_kwargs))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "launch.train", f"--config={path}", f"--checkpoint={ckpt}",
                           f"--out={out}", "--noprogress"], cwd=ref.REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def sft_run(tiny, tmp_path_factory):
    """An uninterrupted 6-step SFT run (checkpoints at 3 and 6), in this process."""
    from jax_introspect.experiment.training import loop
    ckpt, lm, _ = tiny
    config, kw = small_config()
    out = str(tmp_path_factory.mktemp("sft_run") / "run")
    summary = loop.train(lm, config, out, checkpoint=ckpt, progress=False)
    return out, kw, summary


def test_sft_steps_lower_the_loss(tiny, sft_run, plan_and_vectors):
    from jax_introspect import adapters
    from jax_introspect.experiment.training import data, loop, objectives
    ckpt, lm, _ = tiny
    out, _, summary = sft_run
    config, plan, concept = plan_and_vectors
    adapter, spec, meta = adapters.load(os.path.join(out, "adapter"), lm.config, lm.layout)
    assert meta["heldout_words"] == list(HELDOUT) and spec.targets == ("wq", "wv")
    batch = data.to_batch(plan, _examples(plan, lm, 123), concept, lm.tokenizer.pad_id, lm.config.d_model)
    arrays = loop.place_arrays(batch, lm.layout)
    fn = jax.jit(objectives.sft_loss, static_argnames=("cfg", "layout"))
    before, _ = fn(None, lm.params, lm.run_config, arrays, layout=lm.layout)
    after, _ = fn(adapter, lm.params, lm.run_config, arrays, layout=lm.layout)
    print(f"held-out-index batch loss: base {float(before):.4f} -> trained {float(after):.4f}")
    assert float(after) < float(before) - 0.05
    rows = loop.read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm"} <= set(r) for r in rows)
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(3e-2)
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["finished"] and run["heldout_words"] == list(HELDOUT) and run["objective"] == "sft"
    assert set(run["train_words"]) == set(WORDS) - set(HELDOUT)
    assert os.path.exists(os.path.join(out, "loss.png"))


def test_bias_only_training_moves_only_the_bias(tiny, tmp_path):
    from jax_introspect import adapters
    from jax_introspect.experiment.training import loop
    ckpt, lm, _ = tiny
    config, _ = small_config(trainable="bias", steps=3, grad_accum=1, learning_rate=5e-2)
    out = str(tmp_path / "bias")
    loop.train(lm, config, out, checkpoint=ckpt, progress=False)
    adapter, spec, _ = adapters.load(os.path.join(out, "adapter"), lm.config)
    assert spec.targets == () and spec.bias_layers == (1,)
    bias = np.asarray(adapter.bias)
    assert np.abs(bias[1]).max() > 0 and np.abs(bias[0]).max() == 0


def test_dpo_training_logs_rewards(tiny, tmp_path):
    from jax_introspect.experiment.training import loop
    ckpt, lm, _ = tiny
    config, _ = small_config(objective="dpo", steps=2, grad_accum=1, batch_size=2)
    out = str(tmp_path / "dpo")
    loop.train(lm, config, out, checkpoint=ckpt, progress=False)
    rows = loop.read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)  # step 1 starts at the reference
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= set(rows[0])


def test_resume_after_sigkill_gives_the_same_loss_curve(tiny, sft_run, tmp_path):
    """The same config through the CLI in a fresh process, SIGKILLed after step 4 (checkpoint at 3;
    step 4's metrics line already written), then the same command again: every step's metrics
    equal the uninterrupted run's within 1e-6 (float32, CPU), and so does the final adapter."""
    from jax_introspect import adapters
    from jax_introspect.experiment.training import loop
    ckpt, lm, _ = tiny
    out_a, kw, _ = sft_run
    out_b = str(tmp_path / "resumed")
    killed = _cli(dict(kw, crash_after_step=4), ckpt, out_b, tmp_path, "crash")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(os.listdir(os.path.join(out_b, "checkpoints"))) == ["3"]
    assert [r["step"] for r in loop.read_metrics(out_b)] == [1, 2, 3, 4]
    assert not os.path.exists(os.path.join(out_b, "adapter"))
    resumed = _cli(kw, ckpt, out_b, tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = loop.read_metrics(out_a), loop.read_metrics(out_b)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm"):
            assert abs(ra[key] - rb[key]) <= 1e-6, (ra["step"], key, ra[key], rb[key])
    assert json.load(open(os.path.join(out_b, "run.json")))["summary"]["resumed_from_step"] == 3
    ad_a, _, _ = adapters.load(os.path.join(out_a, "adapter"), lm.config)
    ad_b, _, _ = adapters.load(os.path.join(out_b, "adapter"), lm.config)
    for x, y in zip(jax.tree.leaves(ad_a), jax.tree.leaves(ad_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_config_errors_are_clear():
    from jax_introspect.experiment.training.config import TrainConfigError, parse_field
    with pytest.raises(TrainConfigError, match="heldout_words"):
        small_config(heldout_words=("Nope",))
    with pytest.raises(TrainConfigError, match="objective"):
        small_config(objective="ppo")
    with pytest.raises(TrainConfigError, match="windows"):
        small_config(windows=("somewhere",))
    assert parse_field("layers", "0.5,3") == (0.5, 3)
    assert parse_field("steps", "12") == 12


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ref.REPO, "configs", "train"))
                                        if n.endswith(".py")))
def test_every_training_config_loads_and_validates(name):
    from jax_introspect.experiment import files
    from jax_introspect.experiment.training.config import TrainConfig, TrainConfigError
    path = os.path.join(ref.REPO, "configs", "train", name)
    config = files.run_get_config(path, "configs/train", TrainConfigError)
    assert isinstance(config, TrainConfig) and config.steps > 0 and config.windows
