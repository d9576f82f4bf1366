"""benchmarks/sweep_engine.py's nnsight arm does the sweep's injection: its interventions
(`nnsight_inject`, through `nnsight_generate`) against the HF hook reference
`launch/gpu_reference.Injection` on a tiny random Llama-3.1, float32, greedy, per-row vectors, the
window starting inside the prompt: the same generated tokens, and first-step logits within 1e-5.
Controls: no intervention, and the window from position 0, each change the logits (so the
comparison can fail)."""
import numpy as np
import pytest
import torch

from benchmarks import sweep_engine
from launch.gpu_reference import Injection
from tests.hf_reference import hf_config

PROMPT, START, NEW, ROWS = 12, 7, 8, 3
TOL = 1e-5  # first-step logits, float32


@pytest.fixture(scope="module")
def models():
    """The reference HF model and nnsight's wrapper (of its copy, as the benchmark wraps it). The
    pipeline nnsight builds needs a tokenizer; the ids are given, so a word-level one over the
    tiny vocabulary does."""
    from tokenizers import Tokenizer, models as tokenizer_models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    config = hf_config("gqa_untied")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t2")
    return model, sweep_engine.wrap_nnsight(model, tokenizer)


def _injection(model, norm_match, start=START):
    rng = np.random.RandomState(1)
    vector = rng.randn(ROWS, 1, model.config.hidden_size).astype(np.float32)  # one per row
    return dict(layer=0, vector=vector, strength=4.0, start=start, norm_match=norm_match)


def _ids(model):
    return torch.as_tensor(np.random.RandomState(2).randint(3, model.config.vocab_size, (ROWS, PROMPT)))


KW = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _reference(model, ids, injection):
    with torch.no_grad(), Injection(model, **injection):
        return model.generate(ids, attention_mask=torch.ones_like(ids), **KW)


@pytest.mark.parametrize("norm_match", ["raw", "mlp_out", "residual"])
def test_nnsight_injection_is_the_hook_injection(models, norm_match):
    model, nn_model = models
    ids, injection = _ids(model), _injection(model, norm_match)
    ref = _reference(model, ids, injection)
    ours = sweep_engine.nnsight_generate(nn_model, ids, injection, **KW)
    plain = sweep_engine.nnsight_generate(nn_model, ids, None, **KW)
    from_zero = _reference(model, ids, _injection(model, norm_match, start=0))
    diff = (ours.logits[0] - ref.logits[0]).abs().max().item()
    off = {name: (other.logits[0] - ref.logits[0]).abs().max().item()
           for name, other in (("no intervention", plain), ("window from 0", from_zero))}
    print(f"nnsight vs hooks, {norm_match}: first-step max |logit diff| {diff:.2e}; controls {off}")
    assert ours.sequences.shape == ref.sequences.shape == (ROWS, PROMPT + NEW)
    assert torch.equal(ours.sequences, ref.sequences)
    assert diff <= TOL
    assert all(d > 100 * TOL for d in off.values())
    assert not torch.equal(plain.sequences, ref.sequences)


def test_nnsight_inject_refuses_a_bad_norm_mode(models):
    model, nn_model = models
    ids = _ids(model)
    with pytest.raises(Exception, match="norm_match='mlp'"):
        sweep_engine.nnsight_generate(nn_model, ids, _injection(model, "mlp"), **KW)
