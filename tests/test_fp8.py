"""FP8-dynamic checkpoints (compressed-tensors, what the GPU replication ran with vLLM).

A tiny Llama-3.1, briefly trained so its logits are not flat, is saved here in the compressed-tensors
FP8-dynamic layout independently of our converter (torch float8_e4m3fn weights quantized per output
channel, `weight_scale` [out, 1], the `quantization_config` vLLM reads), converted, and run both
ways: 'dequantized' against HF's LlamaForCausalLM with weights fp8 * scale, and 'fp8_dynamic'
against that model with each quantized nn.Linear replaced by `TorchFP8DynamicLinear` below, our own
PyTorch implementation of vLLM's FP8-dynamic linear layer (transformers' compressed-tensors path
needs the compressed-tensors package and a GPU to run FP8 matmuls, so it is not used).
"""
import copy
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.torch
import torch

import jax_introspect
from jax_introspect import checkpoint, config, model, params, sharding
from jax_introspect.config import ConfigError
from jax_introspect.convert import ConversionError, convert
from tests import hf_reference as ref

E4M3_MAX = 448.0
MIN_TOKEN_SCALE = 1.0 / (E4M3_MAX * 512)  # vLLM's floor on a dynamic token scale
NAME = "gqa_untied"  # 3 layers, GQA, llama3 RoPE, untied lm_head (left unquantized by `ignore`)
TRAIN_STEPS = 150
QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUR_QUANTIZED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

# What llm-compressor writes for its FP8_DYNAMIC preset (e.g. Llama-3.1-405B-Instruct-FP8-dynamic).
QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "global_compression_ratio": 1.24,
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                    "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
                    "observer_kwargs": {}},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True, "group_size": None, "block_structure": None, "actorder": None,
                              "observer": None, "observer_kwargs": {}},
        "output_activations": None,
    }},
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "sparsity_config": {},
}


# --- the reference side: compressed-tensors' layout and vLLM's FP8-dynamic linear layer, in torch ---

def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn [out, in], bfloat16 scale [out, 1]) as compressed-tensors'
    channel strategy does: scale = amax over the row / 448, stored in the model's dtype (bf16)."""
    scale = (w.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).to(torch.bfloat16)
    return (w.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class TorchFP8DynamicLinear(torch.nn.Module):
    """vLLM's FP8-dynamic linear layer: the input quantized per token (scale = amax / 448, x / scale
    rounded to float8_e4m3fn), multiplied with the stored float8 weights in float32, then scaled
    by the token's and the output channel's scales and cast back to the input's dtype."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.float())

    def forward(self, x):
        x32 = x.float()
        scale = (x32.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=MIN_TOKEN_SCALE)
        x_q = (x32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        # Products of two e4m3 values are exact in float32: this is the fp8 GEMM with fp32 accumulation.
        acc = x_q.float() @ self.weight_fp8.float().T
        return (acc * scale * self.weight_scale.T).to(x.dtype)


def write_fp8_dynamic_folder(trained: torch.nn.Module, folder: str, quantization_config=QUANTIZATION_CONFIG,
                             edit_tensors=None) -> dict[str, torch.Tensor]:
    """Save `trained` as an HF folder in the compressed-tensors FP8-dynamic layout: the decoder's
    projections as float8_e4m3fn with bf16 `weight_scale`s [out, 1]; embedding, norms and lm_head
    in bfloat16 (as such checkpoints hold them). `edit_tensors(tensors)` may break the result."""
    tensors = {}
    for name, value in trained.state_dict().items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module in QUANTIZED_MODULES:
            tensors[name], tensors[name + "_scale"] = quantize_weight_per_channel(value)
        else:
            tensors[name] = value.to(torch.bfloat16)
    if edit_tensors is not None:
        edit_tensors(tensors)
    os.makedirs(folder, exist_ok=True)
    trained.config.save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        hf = json.load(f)
    if quantization_config is not None:
        hf["quantization_config"] = quantization_config
    with open(path, "w") as f:
        json.dump(hf, f, indent=2)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                                os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return tensors


def torch_references(trained: torch.nn.Module, tensors: dict, dtype=torch.float32):
    """(dequantized model: HF's Llama with weights fp8 * scale; fp8-dynamic model: the same with
    each quantized projection a `TorchFP8DynamicLinear`), in `dtype`."""
    from transformers import LlamaForCausalLM
    dequantized = LlamaForCausalLM(copy.deepcopy(trained.config)).eval()
    state = {name: (tensors[name].float() * tensors[name + "_scale"].float()) if name + "_scale" in tensors
             else tensors[name].float() for name in dequantized.state_dict()}
    dequantized.load_state_dict(state)
    dequantized = dequantized.to(dtype)
    fp8 = copy.deepcopy(dequantized)
    for layer_index, layer in enumerate(fp8.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for module in QUANTIZED_MODULES:
                if hasattr(parent, module):
                    prefix = f"model.layers.{layer_index}.{'self_attn' if parent is layer.self_attn else 'mlp'}.{module}"
                    setattr(parent, module, TorchFP8DynamicLinear(tensors[prefix + ".weight"],
                                                                  tensors[prefix + ".weight_scale"]))
    return dequantized, fp8.eval()


def torch_logits(torch_model, tokens) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def relative_rms(a, b) -> float:
    """rms(a - b) / rms(b - mean over the vocabulary of b): a difference relative to the logits' spread."""
    b64 = b.astype(np.float64)
    spread = b64 - b64.mean(-1, keepdims=True)
    return float(np.sqrt(np.mean((a.astype(np.float64) - b64) ** 2) / np.mean(spread ** 2)))


def e4m3_relative_rounding_noise(seed=0) -> float:
    """The rms relative error of FP8-dynamic per-token quantization on Gaussian tokens: the noise
    each quantized layer's input gets (3 mantissa bits: half an ulp is 2^-4 of the value at most)."""
    x = np.random.RandomState(seed).standard_normal((256, 1024)).astype(np.float32)
    scale = np.abs(x).max(-1, keepdims=True) / E4M3_MAX
    x_q = (x / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    return float(np.sqrt(np.mean((x_q - x) ** 2) / np.mean(x ** 2)))


# --- fixtures -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FP8Model:
    root: pathlib.Path
    trained: torch.nn.Module  # the trained float32 HF model
    folder: str  # its compressed-tensors FP8-dynamic HF folder
    tensors: dict  # what that folder holds
    ckpt: str  # the folder converted by us (float32 besides the FP8 weights)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> FP8Model:
    root = tmp_path_factory.mktemp("fp8")
    trained = ref.build_hf_model(NAME, str(root / "trained"), train_steps=TRAIN_STEPS)
    folder = str(root / "fp8_hf")
    tensors = write_fp8_dynamic_folder(trained, folder)
    ckpt = convert(folder, str(root / "ckpt"), dtype="float32", progress=False)
    return FP8Model(root, trained, folder, tensors, ckpt)


@pytest.fixture(scope="module")
def tokens():
    # Text of the language the model was trained on, so it is confident (not near-ties everywhere).
    return ref.bigram_batch(np.random.RandomState(7), 4, 40, 256)


@pytest.fixture(scope="module")
def runs(fp8, tokens):
    """Logits of every run: ours and torch's, fp8_dynamic and dequantized, float32 and bfloat16."""
    ours = {}
    for numerics in config.NUMERICS:
        for dtype in ("float32", "bfloat16"):
            lm = jax_introspect.load(fp8.ckpt, dtype=dtype, numerics=numerics)
            ours[numerics, dtype] = lm.logits(tokens)
    theirs = {}
    for dtype in (torch.float32, torch.bfloat16):
        dequantized, fp8_dynamic = torch_references(fp8.trained, fp8.tensors, dtype)
        name = str(dtype).removeprefix("torch.")
        theirs["dequantized", name] = torch_logits(dequantized, tokens)
        theirs["fp8_dynamic", name] = torch_logits(fp8_dynamic, tokens)
    return ours, theirs


# --- conversion and loading ---------------------------------------------------------------------

def test_config_records_the_fp8_weights(fp8):
    cfg = checkpoint.load_config(fp8.ckpt)
    assert cfg.quantization == config.Quantization(weights=OUR_QUANTIZED)
    assert checkpoint.read_manifest(fp8.ckpt)["dtype"] == "float32"
    # A config.json of a checkpoint converted before FP8 support (no such field) still loads.
    old = {k: v for k, v in cfg.to_json_dict().items() if k != "quantization"}
    assert config.ModelConfig.from_json_dict(old).quantization is None


OUR_LAYOUT_FROM_HF = {
    # q/k/v: HF [heads * hd, D] -> [heads, D, hd]; o: HF [D, heads * hd] -> [heads, hd, D];
    # gate/up: HF's [F, D] as is; down: HF [D, F] -> [F, D].
    "wq": lambda w, c: w.reshape(c.n_heads, c.head_dim, c.d_model).transpose(0, 2, 1),
    "wk": lambda w, c: w.reshape(c.n_kv_heads, c.head_dim, c.d_model).transpose(0, 2, 1),
    "wv": lambda w, c: w.reshape(c.n_kv_heads, c.head_dim, c.d_model).transpose(0, 2, 1),
    "wo": lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.d_model),
    "w_gate": lambda w, c: w,
    "w_up": lambda w, c: w,
    "w_down": lambda w, c: w.T,
}


def test_fp8_weights_are_stored_as_read_and_scales_in_our_layout(fp8):
    cfg = checkpoint.load_config(fp8.ckpt)
    unit = os.path.join(fp8.ckpt, "params", "layer_001")
    meta = ocp.StandardCheckpointer().metadata(unit).item_metadata
    stored = ocp.StandardCheckpointer().restore(unit)
    for ours, module in zip(OUR_QUANTIZED, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")):
        leaf, scale_leaf = params.by_name(ours), params.by_name(params.scale_name(ours))
        hf_weight = fp8.tensors[f"model.layers.1.{module}.weight"]
        hf_scale = fp8.tensors[f"model.layers.1.{module}.weight_scale"]
        assert meta[ours].dtype == jnp.float8_e4m3fn and meta[scale_leaf.name].dtype == jnp.float32
        # The same e4m3 bit patterns, in our layout (params.py; written out here per weight from HF's
        # [out, in]); the bf16 scales exactly, in the output axes.
        expected_bits = OUR_LAYOUT_FROM_HF[ours](hf_weight.view(torch.uint8).numpy(), cfg)
        np.testing.assert_array_equal(np.asarray(stored[ours]).view(np.uint8), expected_bits)
        np.testing.assert_array_equal(stored[scale_leaf.name],
                                      hf_scale.float().numpy().reshape(scale_leaf.unit_shape(cfg)))
        assert scale_leaf.axes == leaf.hf_out
    globals_meta = ocp.StandardCheckpointer().metadata(os.path.join(fp8.ckpt, "params", "globals")).item_metadata
    assert set(globals_meta) == {"embed", "final_norm", "lm_head"}  # lm_head is in `ignore`: no scale
    assert all(globals_meta[n].dtype == jnp.float32 for n in globals_meta)


def test_params_in_each_numerics(fp8):
    fp8_lm = jax_introspect.load(fp8.ckpt, numerics="fp8_dynamic")
    layers = fp8_lm.params.layers
    assert layers.wq.dtype == jnp.float8_e4m3fn and layers.wq_scale.dtype == jnp.float32
    assert layers.wq_scale.shape == (3, 4, 16) and layers.w_down_scale.shape == (3, 64)
    assert layers.attn_norm.dtype == jnp.float32 and fp8_lm.params.lm_head.dtype == jnp.float32
    assert fp8_lm.params.lm_head_scale is None and fp8_lm.run_config.quantization is not None
    deq = jax_introspect.load(fp8.ckpt, dtype="bfloat16")
    assert deq.run_config.quantization is None and deq.params.layers.wq_scale is None
    assert deq.params.layers.wq.dtype == jnp.bfloat16 and deq.params.embed.dtype == jnp.bfloat16
    # Dequantized = fp8 * scale, computed in float32 and rounded once to the load dtype.
    # wq [heads, D, hd] times its scale [heads, hd], one per output channel (head, hd).
    w = np.asarray(fp8_lm.params.layers.wq[1]).astype(np.float32) * np.asarray(fp8_lm.params.layers.wq_scale[1])[:, None, :]
    np.testing.assert_array_equal(np.asarray(deq.params.layers.wq[1]), w.astype(ml_dtypes.bfloat16))


def test_scales_are_sharded_with_their_weights_output_axes(fp8):
    cfg = checkpoint.load_config(fp8.ckpt)
    layout = sharding.Layout.for_model(sharding.one_device_mesh(), cfg)
    shardings = layout.params(cfg)
    assert shardings.layers.wq_scale.spec == layout.spec("layers", "heads", "head_dim")
    assert shardings.layers.wk_scale.spec == layout.spec("layers", "kv_heads", "head_dim")
    assert shardings.layers.wo_scale.spec == layout.spec("layers", "embed")
    assert shardings.layers.w_down_scale.spec == layout.spec("layers", "embed")
    assert shardings.layers.w_up_scale.spec == layout.spec("layers", "mlp")
    assert shardings.lm_head_scale is None
    assert layout.params(config.with_numerics(cfg, "dequantized")).layers.wq_scale is None


# --- numerics -------------------------------------------------------------------------------------

def test_fp8_dynamic_matches_the_torch_fp8_dynamic_reference(runs):
    ours, theirs = runs
    diff = np.abs(ours["fp8_dynamic", "float32"] - theirs["fp8_dynamic", "float32"]).max()
    print(f"fp8_dynamic float32 vs torch FP8-dynamic: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_dequantized_matches_torch_with_dequantized_weights(runs):
    ours, theirs = runs
    diff = np.abs(ours["dequantized", "float32"] - theirs["dequantized", "float32"]).max()
    print(f"dequantized float32 vs torch dequantized: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_fp8_dynamic_differs_from_dequantized_by_quantization_noise(runs):
    ours, theirs = runs
    noise = e4m3_relative_rounding_noise()
    fp8_vs_deq = relative_rms(ours["fp8_dynamic", "float32"], ours["dequantized", "float32"])
    torch_fp8_vs_deq = relative_rms(theirs["fp8_dynamic", "float32"], theirs["dequantized", "float32"])
    round_off = relative_rms(ours["fp8_dynamic", "float32"], theirs["fp8_dynamic", "float32"])
    bf16_fp8_vs_deq = relative_rms(ours["fp8_dynamic", "bfloat16"], ours["dequantized", "bfloat16"])
    bf16_round_off = relative_rms(ours["dequantized", "bfloat16"], ours["dequantized", "float32"])
    top1 = np.mean(ours["fp8_dynamic", "float32"].argmax(-1) == ours["dequantized", "float32"].argmax(-1))
    print(f"e4m3 per-token rounding noise {noise:.4f}; relative rms logit difference fp8_dynamic vs "
          f"dequantized: ours {fp8_vs_deq:.4f}, torch {torch_fp8_vs_deq:.4f}, in bf16 {bf16_fp8_vs_deq:.4f}; "
          f"top-1 agreement {top1:.3f}; float32 round-off {round_off:.1e}; bf16 vs float32 {bf16_round_off:.4f}")
    # Of the order of the rounding noise of one layer's input (2^-4 relative at most) ...
    assert noise / 4 <= fp8_vs_deq <= 4 * noise
    # ... the same difference torch's FP8-dynamic makes ...
    assert abs(fp8_vs_deq - torch_fp8_vs_deq) <= 0.05 * torch_fp8_vs_deq
    # ... far above the float32 round-off between the two implementations, and above what
    # bfloat16 itself (rounding every weight and activation, to 2^-9 relative) changes.
    assert fp8_vs_deq >= 1000 * round_off
    assert bf16_fp8_vs_deq >= 2 * bf16_round_off
    assert top1 >= 0.9  # a confident model keeps its argmax under quantization noise


def test_transformers_compressed_tensors_path_agrees(fp8, tokens, runs):
    """transformers loading the FP8 folder itself (through the compressed-tensors package, which runs
    FP8-dynamic on CPU as fake quantization): a check of the folder's layout as well as of our logits."""
    import compressed_tensors  # noqa: F401  (transformers needs it to read the folder)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(fp8.folder, dtype=torch.float32).eval()
    diff = np.abs(runs[0]["fp8_dynamic", "float32"] - torch_logits(hf, tokens)).max()
    print(f"fp8_dynamic float32 vs transformers + compressed-tensors: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_greedy_continuation_matches_torch_fp8_dynamic(fp8, tokens):
    # Per-token scales do not depend on other tokens: decoding with a KV cache quantizes each new
    # token as the whole-sequence forward does.
    lm = jax_introspect.load(fp8.ckpt, numerics="fp8_dynamic")
    _, torch_fp8 = torch_references(fp8.trained, fp8.tensors)
    prompts = tokens[:, :12]
    ours = [g.token_ids for g in lm.generate(prompts.tolist(), max_new_tokens=16)]
    assert ours == ref.hf_greedy(torch_fp8, prompts, 16).tolist()


def test_bfloat16_fp8_dynamic_tracks_torch_in_bfloat16(runs):
    ours, theirs = runs
    kl = ref.mean_kl(theirs["fp8_dynamic", "bfloat16"], ours["fp8_dynamic", "bfloat16"])
    top1 = np.mean(ours["fp8_dynamic", "bfloat16"].argmax(-1) == theirs["fp8_dynamic", "bfloat16"].argmax(-1))
    print(f"fp8_dynamic bfloat16 vs torch FP8-dynamic bfloat16: mean KL {kl:.1e}, top-1 {top1:.3f}")
    assert top1 >= 0.98 and kl <= 1e-2


def test_decoder_stays_one_scan_compiled_once(fp8, tokens):
    cfg = config.with_numerics(checkpoint.load_config(fp8.ckpt), "fp8_dynamic")

    def traced(n_layers):
        c = dataclasses.replace(cfg, n_layers=n_layers)
        layout = sharding.Layout.for_model(sharding.one_device_mesh(), c)
        cache = jax.eval_shape(lambda: model.init_cache(c, 2, 8, jnp.float32))
        run = lambda p, t, v, k: model.forward(p, c, t, model.prompt_positions(v), v, k, layout=layout)
        text = str(jax.make_jaxpr(run)(checkpoint.abstract_params(c, jnp.float32),
                                       jax.ShapeDtypeStruct((2, 8), jnp.int32), jax.ShapeDtypeStruct((2, 8), bool),
                                       cache))
        return len(text.splitlines()), text.count("scan[")
    assert traced(2) == traced(6) and traced(2)[1] == 1
    lm = jax_introspect.load(fp8.ckpt, numerics="fp8_dynamic")
    before = jax_introspect.lm._prefill._cache_size()
    for batch in (tokens, tokens[::-1]):  # the same shape: one program
        lm.logits(batch)
    assert jax_introspect.lm._prefill._cache_size() - before <= 1


def test_tensor_parallel_meshes_give_the_same_logits(fp8, tokens, runs):
    """1x2: the per-token scales of wo's and w_down's inputs span an axis split over `tensor`.
    1x4: more tensor ways than the 2 KV heads, so wk/wv and their scales are repeated per copy."""
    code = f"""
import json, jax, numpy as np, jax_introspect
from jax_introspect import params, sharding
out = {{}}
for mesh, numerics in (("1x2", "fp8_dynamic"), ("1x4", "fp8_dynamic"), ("1x4", "dequantized")):
    devices = jax.devices()[:int(mesh[2:])]
    lm = jax_introspect.load({fp8.ckpt!r}, numerics=numerics, mesh=sharding.make_mesh(mesh, devices))
    layers = lm.params.layers
    out[mesh + " " + numerics] = {{
        # per scale: (sharded as params.py declares, split over `tensor`)
        "specs": {{n: (getattr(layers, n).sharding.is_equivalent_to(
                          lm.layout.sharding(*params.by_name(n).param_axes), getattr(layers, n).ndim),
                      "tensor" in tuple(getattr(layers, n).sharding.spec))
                  for n in ("wo_scale", "w_up_scale", "wk_scale") if getattr(layers, n) is not None}},
        "kv_heads": layers.wk.shape[1], "logits": lm.logits(np.asarray({tokens.tolist()!r})).tolist()}}
print(json.dumps(out))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ref.REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # wo's output axis (embed) is whole, its input (the heads) split; w_up's output (mlp) and the KV heads split.
    assert out["1x2 fp8_dynamic"]["specs"] == {"wo_scale": [True, False], "w_up_scale": [True, True],
                                               "wk_scale": [True, True]}
    assert out["1x4 fp8_dynamic"]["kv_heads"] == 4 and out["1x4 dequantized"]["specs"] == {}
    for key, result in out.items():
        numerics = key.split()[1]
        diff = np.abs(np.asarray(result["logits"], np.float32) - runs[0][numerics, "float32"]).max()
        print(f"{key} mesh vs one device: max abs diff {diff:.2e}")
        assert diff <= 1e-5, key


def test_numerics_are_checked(fp8):
    unquantized = convert(str(fp8.root / "trained"), str(fp8.root / "unquantized"), progress=False)
    assert checkpoint.read_manifest(unquantized)["dtype"] == "float32"  # the default for float weights
    with pytest.raises(ConfigError, match="fp8_dynamic.*needs a checkpoint converted from FP8 weights"):
        jax_introspect.load(unquantized, numerics="fp8_dynamic")
    with pytest.raises(ConfigError, match="numerics='fp16'"):
        jax_introspect.load(fp8.ckpt, numerics="fp16")
    lm = jax_introspect.load(fp8.ckpt, numerics="fp8_dynamic")
    with pytest.raises(ValueError, match="do not fit numerics='dequantized'"):
        jax_introspect.LanguageModel(lm.config, lm.params)


# --- refusals -------------------------------------------------------------------------------------

def _hf_config(fp8, edit):
    with open(os.path.join(fp8.folder, "config.json")) as f:
        hf = json.load(f)
    hf["quantization_config"] = json.loads(json.dumps(QUANTIZATION_CONFIG))
    edit(hf["quantization_config"])
    return hf


def _set(path, value):
    def edit(qc):
        *parents, key = path.split(".")
        node = qc
        for p in parents:
            node = node[p]
        node[key] = value
    return edit


REFUSED_CONFIGS = {
    "int8_weights": (_set("config_groups.group_0.weights.type", "int"), "weights.type='int'"),
    "4_bit_weights": (_set("config_groups.group_0.weights.num_bits", 4), "weights.num_bits=4"),
    "per_tensor_weights": (_set("config_groups.group_0.weights.strategy", "tensor"), "weights.strategy='tensor'"),
    "group_weights": (_set("config_groups.group_0.weights.group_size", 128), "weights.group_size=128"),
    "block_weights": (_set("config_groups.group_0.weights.block_structure", [128, 128]), "weights.block_structure"),
    "asymmetric_weights": (_set("config_groups.group_0.weights.symmetric", False), "weights.symmetric=False"),
    "static_activation_scales": (_set("config_groups.group_0.input_activations.dynamic", False),
                                 "input_activations.dynamic=False"),
    "per_tensor_activations": (_set("config_groups.group_0.input_activations.strategy", "tensor"),
                               "input_activations.strategy='tensor'"),
    "weight_only": (_set("config_groups.group_0.input_activations", None), "input_activations=None"),
    "output_activations": (_set("config_groups.group_0.output_activations", {"num_bits": 8}), "output_activations"),
    "gptq": (_set("quant_method", "gptq"), "quant_method='gptq'"),
    "packed_format": (_set("format", "pack-quantized"), "format='pack-quantized'"),
    "kv_cache_scheme": (_set("kv_cache_scheme", {"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    "unknown_field": (_set("rotations", [1]), "quantization_config.rotations"),
    "unknown_argument": (_set("config_groups.group_0.weights.granularity", "row"), "weights.granularity"),
    "embedding_target": (_set("config_groups.group_0.targets", ["Embedding"]), "match no linear layer"),
    "some_layers_only": (_set("ignore", ["lm_head", "re:model\\.layers\\.0\\..*"]), "in some layers only"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CONFIGS))
def test_unsupported_quantization_configs_are_refused(fp8, case):
    edit, named = REFUSED_CONFIGS[case]
    with pytest.raises(ConfigError) as error:
        config.from_hf_dict(_hf_config(fp8, edit))
    assert named in str(error.value) and "quantization_config" in str(error.value)


def test_other_spellings_of_the_same_scheme_are_accepted(fp8):
    preset = config.from_hf_dict(_hf_config(fp8, _set("config_groups", {"FP8_DYNAMIC": ["Linear"]})))
    assert preset.quantization.weights == OUR_QUANTIZED
    by_name = config.from_hf_dict(_hf_config(fp8, _set("config_groups.group_0.targets", [
        "re:.*self_attn\\.[qkvo]_proj$", "re:.*mlp\\..*_proj$"])))
    assert by_name.quantization.weights == OUR_QUANTIZED
    head_too = config.from_hf_dict(_hf_config(fp8, _set("ignore", [])))
    assert head_too.quantization.weights == OUR_QUANTIZED + ("lm_head",)


def _convert_broken(fp8, tmp_path, edit_tensors=None, quantization_config=QUANTIZATION_CONFIG):
    folder = str(tmp_path / "broken_hf")
    write_fp8_dynamic_folder(fp8.trained, folder, quantization_config, edit_tensors)
    with pytest.raises(ConversionError) as error:
        convert(folder, str(tmp_path / "ckpt"), progress=False)
    assert not os.path.exists(tmp_path / "ckpt") and not os.path.exists(str(tmp_path / "ckpt") + ".incomplete")
    return str(error.value)


def test_missing_scale_is_refused(fp8, tmp_path):
    message = _convert_broken(fp8, tmp_path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight_scale"))
    assert "model.layers.2.mlp.up_proj.weight_scale" in message and "missing" in message


def test_scale_of_the_wrong_shape_is_refused(fp8, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight_scale"
    message = _convert_broken(fp8, tmp_path, lambda t: t.update({name: t[name].reshape(1, -1)}))
    assert name in message and "[1, 32]" in message and "[32, 1]" in message


def test_unquantized_weight_where_the_config_says_fp8_is_refused(fp8, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    message = _convert_broken(fp8, tmp_path, lambda t: t.update({name: t[name].to(torch.bfloat16)}))
    assert name in message and "bfloat16" in message and "FP8" in message


def test_fp8_tensors_without_a_quantization_config_are_refused(fp8, tmp_path):
    message = _convert_broken(fp8, tmp_path, lambda t: [t.pop(n) for n in list(t) if n.endswith("_scale")],
                              quantization_config=None)
    assert "float8_e4m3fn" in message and "quantization_config" in message


def test_non_positive_scale_is_refused(fp8, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight_scale"
    message = _convert_broken(fp8, tmp_path, lambda t: t[name].__setitem__((3, 0), 0.0))
    assert name in message and "scales <= 0" in message


# --- a sweep on an FP8 checkpoint ------------------------------------------------------------------

SWEEP_SMALL = ["--config=configs/sweeps/quickstart.py", "--config.words=Dust", "--config.layers=1",
               "--config.strengths=4.0", "--config.trials_per_cell=2", "--config.control_trials=1",
               "--config.max_new_tokens=4", "--config.batch_size=3", "--config.baseline_words=Desks,Sand",
               "--report=false"]


def _sweep(checkpoint_path, out, *extra):
    cmd = [sys.executable, "-m", "launch.sweep", f"--checkpoint={checkpoint_path}", f"--out={out}", *SWEEP_SMALL, *extra]
    return subprocess.run(cmd, cwd=ref.REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_sweep_runs_an_fp8_checkpoint_in_the_numerics_asked_for(tmp_path):
    """`launch.sweep --numerics=fp8_dynamic` loads the weights as stored and binds the folder to
    it; asking for it on unquantized weights is refused before they load."""
    from jax_introspect.tokenizer import llama3_tokenizer_model_path
    trained = ref.build_hf_model(NAME, str(tmp_path / "trained"), vocab_size=128256, num_hidden_layers=2)
    write_fp8_dynamic_folder(trained, str(tmp_path / "fp8_hf"))
    tokenizer = f"--tokenizer={llama3_tokenizer_model_path()}"
    fp8_ckpt, plain_ckpt = str(tmp_path / "fp8_ckpt"), str(tmp_path / "plain_ckpt")
    ref.run_convert(str(tmp_path / "fp8_hf"), fp8_ckpt, extra=[tokenizer])
    ref.run_convert(str(tmp_path / "trained"), plain_ckpt, extra=[tokenizer])

    out = tmp_path / "run"
    proc = _sweep(fp8_ckpt, out, "--numerics=fp8_dynamic")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trials: 3 (0 already done, 3 run now)" in proc.stdout
    with open(out / "run.json") as f:
        assert json.load(f)["config"]["numerics"] == "fp8_dynamic"
    with open(out / "trials.jsonl") as f:
        assert len(f.read().splitlines()) == 3
    # The same folder with the other numerics would mix two models' texts: refused.
    proc = _sweep(fp8_ckpt, out, "--numerics=dequantized")
    assert proc.returncode == 1 and "numerics" in proc.stderr, proc.stderr[-2000:]
    # Unquantized weights cannot run FP8-dynamic: one line, before the weights load, no folder.
    proc = _sweep(plain_ckpt, tmp_path / "refused", "--numerics=fp8_dynamic")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --numerics:"), proc.stderr[-2000:]
    assert "needs a checkpoint converted from FP8 weights" in proc.stderr
    assert not (tmp_path / "refused").exists()
