"""TPU-vs-GPU parity tooling: launch/gpu_reference.py (PyTorch, here on the CPU as the "GPU" side)
writes a reference dump; launch.parity runs the same through jax_introspect and reports."""
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from jax_introspect import parity
from tests import hf_reference as ref

REPO = ref.REPO
N_LAYERS = 6
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
JUDGED_405B = os.path.join(SHARED_DATA, "replication_405b_layer84_canonical.judged.json")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _run(args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=ENV)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _fails(proc, *needles):
    assert proc.returncode != 0, f"expected failure, got exit 0:\n{proc.stdout[-2000:]}"
    message = proc.stderr[-3000:]
    for needle in needles:
        assert needle in message, f"{needle!r} not in the error message:\n{message}"
    return message


def gpu_reference(*args):
    return _run(["launch/gpu_reference.py", "--device=cpu", *args])


def parity_cli(*args):
    return _run(["-m", "launch.parity", *args])


def _report(out):
    with open(os.path.join(out, "parity.json")) as f:
        return json.load(f)


# --- tiny random model (no tokenizer: token-id prompts, vectors from a .pt file) -------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_tiny")
    hf = str(root / "hf")
    ref.build_hf_model("gqa_untied", hf, num_hidden_layers=N_LAYERS)
    ckpt = str(root / "ckpt")
    ref.run_convert(hf, ckpt)
    rng = np.random.RandomState(0)
    prompts = str(root / "prompts.json")
    with open(prompts, "w") as f:
        json.dump([{"name": "a", "ids": rng.randint(0, 256, 12).tolist()},
                   {"name": "b", "ids": rng.randint(0, 256, 7).tolist(), "inject_start": 3}], f)
    vectors = str(root / "vectors.pt")
    torch.manual_seed(0)
    torch.save({"alpha": torch.randn(64), "beta": torch.randn(64)}, vectors)
    return types.SimpleNamespace(root=str(root), hf=hf, ckpt=ckpt, prompts=prompts, vectors=vectors)


def _tiny_dump(tiny, hf_dir, out, *extra):
    _ok(gpu_reference(f"--model={hf_dir}", f"--out={out}", f"--prompts_file={tiny.prompts}",
                      f"--vector_files={tiny.vectors}", "--layers=1,3", "--strengths=2", "--norm_match",
                      "--max_new_tokens=8", *extra))
    return out


@pytest.fixture(scope="module")
def tiny_dump(tiny):
    return _tiny_dump(tiny, tiny.hf, os.path.join(tiny.root, "dump"))


def test_tiny_float32_parity_with_injection(tiny, tiny_dump):
    out = os.path.join(tiny.root, "report")
    proc = _ok(parity_cli(f"--checkpoint={tiny.ckpt}", f"--reference={tiny_dump}", f"--out={out}",
                           "--dtypes=float32,bfloat16"))
    print(proc.stdout)
    report = _report(out)
    s = report["runs"]["float32"]["summary"]
    assert len(report["reference"]["cases"]) == 4  # 2 vectors x 2 layers x 1 strength, norm-matched
    for key in ("residual_max_abs", "logits_max_abs", "injected_residual_max_abs", "injected_logits_max_abs"):
        assert s[key] <= 1e-4, (key, s[key])
    assert s["continuations_identical"] and s["continuations_identical_count"] == "10/10"
    assert s["first_jump_layer"] is None and s["injected_first_jump_layer"] is None
    assert s["top1"] == 1.0 and s["logits_kl_mean"] < 1e-9
    assert len(report["runs"]["float32"]["clean"]["layers"]) == N_LAYERS
    b = report["runs"]["bfloat16"]["summary"]
    assert b["first_jump_layer"] is None and b["residual_rel_err_max"] < 0.05
    with open(os.path.join(out, "parity.md")) as f:
        md = f.read()
    assert "| residual_max_abs |" in md and "greedy continuations" in md
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(os.path.join(out, "parity.png")) > 1000
    except ImportError:
        pass


def _perturb(src, dst, name, scale=0.05, seed=1):
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    weights = load_file(path)
    torch.manual_seed(seed)
    weights[name] = weights[name] + scale * torch.randn_like(weights[name])
    save_file(weights, path, metadata={"format": "pt"})


def test_perturbed_layer_is_localized(tiny, tmp_path):
    hf = str(tmp_path / "hf_perturbed")
    _perturb(tiny.hf, hf, "model.layers.2.mlp.down_proj.weight")
    dump = _tiny_dump(tiny, hf, str(tmp_path / "dump"))
    out = str(tmp_path / "report")
    proc = _ok(parity_cli(f"--checkpoint={tiny.ckpt}", f"--reference={dump}", f"--out={out}", "--dtypes=float32"))
    run = _report(out)["runs"]["float32"]
    errors = [f"{s['rel_err_max']:.1e}" for s in run["clean"]["layers"]]
    print("perturbed layer 2: per-layer residual relative error", errors)
    assert run["summary"]["first_jump_layer"] == 2 and run["summary"]["first_jump_where"] == "layer 2"
    assert run["summary"]["injected_first_jump_layer"] == 2
    assert all(s["rel_err_max"] < 1e-5 for s in run["clean"]["layers"][:2])
    assert "first jump: layer 2" in proc.stdout


def test_perturbed_final_norm_is_placed_after_the_layers(tiny, tmp_path):
    from launch import gpu_reference
    hf = str(tmp_path / "hf_norm")
    _perturb(tiny.hf, hf, "model.norm.weight", scale=0.2)
    model, tokenizer = gpu_reference.load_model(hf, device="cpu")
    meta, tensors = gpu_reference.build_reference(model, tokenizer, gpu_reference.read_prompts_file(tiny.prompts),
                                                  max_new_tokens=4, log=lambda m: None)
    reference = parity.Reference(meta=meta, tensors=tensors)
    parity.validate_reference(reference)
    run = parity.measure_checkpoint(tiny.ckpt, reference, ["float32"], log=lambda m: None)["runs"]["float32"]
    assert run["summary"]["first_jump_layer"] is None
    assert "final norm" in run["summary"]["first_jump_where"]
    assert run["clean"]["residual_rel_err_max"] < 1e-5


def test_jump_rule():
    assert parity.first_jump([1e-6, 2e-6, 1.5e-6, 5e-3, 6e-3], floor=1e-4) == 3
    assert parity.first_jump([0.5, 0.6], floor=1e-4) == 0
    assert parity.first_jump([1e-8, 1e-6, 5e-5], floor=1e-4) is None  # 100x, but under the floor
    assert parity.first_jump([5e-3, 7e-3, 9e-3, 1.2e-2, 2e-2, 6e-2], floor=0.1) is None  # bf16-like growth
    assert parity.first_jump([5e-5, 8e-5, 2e-4, 4e-4], floor=1e-4, factor=10) is None  # smooth growth past the floor


# --- bad input ---------------------------------------------------------------------------------

def test_dump_from_another_model_is_refused(tiny, tmp_path):
    other = str(tmp_path / "hf_other")
    ref.build_hf_model("mha_tied", other, num_hidden_layers=N_LAYERS)
    dump = str(tmp_path / "dump_other")
    _ok(gpu_reference(f"--model={other}", f"--out={dump}", f"--prompts_file={tiny.prompts}", "--max_new_tokens=2"))
    _fails(parity_cli(f"--checkpoint={tiny.ckpt}", f"--reference={dump}", f"--out={tmp_path / 'r'}"),
           "from another model", "n_kv_heads: reference 4 vs checkpoint 2", "tie_word_embeddings")


def test_dump_missing_layers_is_refused(tiny, tiny_dump, tmp_path):
    from safetensors.numpy import load_file, save_file
    dump = str(tmp_path / "dump")
    shutil.copytree(tiny_dump, dump)
    path = os.path.join(dump, parity.TENSOR_FILE)
    tensors = load_file(path)
    tensors = {k: (np.delete(v, 4, axis=0) if k.endswith(".residuals") else v) for k, v in tensors.items()}
    save_file(tensors, path)
    _fails(parity_cli(f"--checkpoint={tiny.ckpt}", f"--reference={dump}", f"--out={tmp_path / 'r'}"),
           "missing layers", "hold 5 layers", "lists 6")
    os.remove(os.path.join(dump, parity.META_FILE))
    with pytest.raises(parity.ParityError, match="not a complete reference dump"):
        parity.read_reference(dump)


def test_truncated_or_foreign_tensor_file_is_refused_with_its_cause(tiny_dump, tmp_path):
    from safetensors import SafetensorError
    dump = str(tmp_path / "dump")
    shutil.copytree(tiny_dump, dump)
    path = os.path.join(dump, parity.TENSOR_FILE)
    with open(path, "rb") as f:
        data = f.read()
    for content in (data[:len(data) // 2], b"not a safetensors file at all"):
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(parity.ParityError, match="cannot be read as safetensors") as info:
            parity.read_reference(dump)
        assert isinstance(info.value.__cause__, SafetensorError)


def test_mismatched_prompts_file_is_refused(tiny, tiny_dump, tmp_path):
    with open(tiny.prompts) as f:
        prompts = json.load(f)
    prompts[1]["ids"][2] = (prompts[1]["ids"][2] + 1) % 256
    path = str(tmp_path / "prompts.json")
    with open(path, "w") as f:
        json.dump(prompts, f)
    _fails(parity_cli(f"--checkpoint={tiny.ckpt}", f"--reference={tiny_dump}", f"--prompts_file={path}",
                       f"--out={tmp_path / 'r'}"), "mismatched prompts", "prompt 1 (b)")


def test_gpu_reference_bad_input(tiny, tmp_path, capsys):
    from launch import gpu_reference
    base = [f"--model={tiny.hf}", f"--out={tmp_path / 'd'}", "--device=cpu", f"--prompts_file={tiny.prompts}"]
    assert gpu_reference.main(base + [f"--vector_files={tiny.vectors}", "--layers=9", "--strengths=1"]) == 2
    assert "layers [9] out of range" in capsys.readouterr().err
    assert gpu_reference.main(base + ["--layers=1", "--strengths=1"]) == 2
    assert "injection needs" in capsys.readouterr().err
    text_prompts = str(tmp_path / "text.json")
    with open(text_prompts, "w") as f:
        json.dump(["Hello"], f)
    assert gpu_reference.main(base[:-1] + [f"--prompts_file={text_prompts}"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    with pytest.raises(gpu_reference.ReferenceError, match="exactly one of"):
        gpu_reference.normalize_entry({"ids": [1], "text": "x"}, 0)
    assert not os.path.exists(tmp_path / "d")


# --- SmolLM2-135M (real weights; HF loads the GGUF in-process, --hf_dir mode) -------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from jax_introspect.experiment import protocols
    from jax_introspect.convert.gguf_file import smollm2_path
    root = tmp_path_factory.mktemp("parity_smollm2")
    ckpt = str(root / "ckpt")
    ref.run_convert("smollm2", ckpt)
    prompts = str(root / "prompts.json")
    lindsey = protocols.protocol("lindsey_injected_thought")
    with open(prompts, "w") as f:
        json.dump([{"name": "capital", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
                   {"name": "lindsey", "messages": lindsey["messages"], "anchor": lindsey["anchor"]}], f)
    gguf = smollm2_path()
    out = str(root / "report")
    proc = _ok(parity_cli(f"--checkpoint={ckpt}", f"--hf_dir={os.path.dirname(gguf)}",
                           f"--gguf_file={os.path.basename(gguf)}", "--device=cpu", f"--prompts_file={prompts}",
                           "--words=Oceans", "--baseline_words=Desks,Jackets", "--layers=15", "--strengths=4",
                           "--max_new_tokens=8", "--dtypes=float32,bfloat16", f"--out={out}"))
    return types.SimpleNamespace(root=str(root), ckpt=ckpt, out=out, report=_report(out), stdout=proc.stdout,
                                 dump=os.path.join(out, "reference"))


def test_smollm2_float32_parity_and_bfloat16_figures(smollm2):
    print(smollm2.stdout)
    s, b = (smollm2.report["runs"][d]["summary"] for d in ("float32", "bfloat16"))
    # Logits within 1e-3. SmolLM2's residual stream carries "massive activations" (entries of
    # ~1e3-1e4), so its float32 absolute residual gap is ~1e-2 while the relative one is ~1e-5:
    # residual parity is judged relative.
    assert s["logits_max_abs"] <= 1e-3 and s["injected_logits_max_abs"] <= 1e-3
    assert s["residual_rel_err_max"] <= 1e-3 and s["injected_residual_rel_err_max"] <= 1e-3
    assert s["concept_vector_cos_min"] >= 0.9999
    assert s["continuations_identical"] and s["first_jump_layer"] is None and s["injected_first_jump_layer"] is None
    checks = smollm2.report["checks"]
    assert "agree" in checks["tokenizer"] and "identical" in checks["prompts"]
    print(f"SmolLM2 bf16 vs HF f32: logits KL {b['logits_kl_mean']:.2e}, top-1 {b['top1']:.4f}, top-5 {b['top5']:.4f}, "
          f"max |logit diff| {b['logits_max_abs']:.2f}, residual rel err max {b['residual_rel_err_max']:.3f}, "
          f"injected KL {b['injected_logits_kl_mean']:.2e} top-1 {b['injected_top1']:.4f}, continuations identical "
          f"{b['continuations_identical_count']} (first divergence {b['first_divergence_min']}), concept vector cos "
          f"min {b['concept_vector_cos_min']:.4f}")
    assert b["top1"] >= 0.95 and b["logits_kl_mean"] <= 1e-2 and b["first_jump_layer"] is None
    assert os.path.isfile(os.path.join(smollm2.dump, parity.META_FILE))


def _edited_dump(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, parity.META_FILE)
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)
    return dst


def test_smollm2_tokenizer_mismatch_is_refused(smollm2, tmp_path):
    def edit(meta):
        meta["tokenizer"]["probe_ids"][3] += 1
    dump = _edited_dump(smollm2.dump, str(tmp_path / "dump"), edit)
    _fails(parity_cli(f"--checkpoint={smollm2.ckpt}", f"--reference={dump}", f"--out={tmp_path / 'r'}"),
           "tokenizer mismatch", "first difference at token 3")


def test_smollm2_prompt_mismatches_are_refused(smollm2):
    import jax_introspect
    lm = jax_introspect.load(smollm2.ckpt)
    reference = parity.read_reference(smollm2.dump)
    parity.check_reference(reference, lm)  # the untouched dump passes
    reference.prompts[1]["ids"][5] += 1
    with pytest.raises(parity.ParityError, match=r"prompt 1 \(lindsey\): our token ids differ .* token 5"):
        parity.check_reference(reference, lm)
    reference = parity.read_reference(smollm2.dump)
    reference.prompts[0]["text"] = reference.prompts[0]["text"].replace("France", "Spain")
    with pytest.raises(parity.ParityError, match="chat template renders another text"):
        parity.check_reference(reference, lm)
    reference = parity.read_reference(smollm2.dump)
    reference.prompts[1]["inject_start"] += 1
    with pytest.raises(parity.ParityError, match="anchor 'Trial 1' gives injection start"):
        parity.check_reference(reference, lm)


# --- the 405B replication's artifacts ----------------------------------------------------------

def test_replication_artifacts_side_by_side(tmp_path):
    from jax_introspect.experiment.vectors import ConceptVectors
    assert os.path.isfile(JUDGED_405B), f"shared data missing: {JUDGED_405B}"
    torch.manual_seed(0)
    direction = torch.randn(64)
    direction /= direction.norm()
    love = str(tmp_path / "vector_love_layer2.pt")  # the replication's own .pt layout
    torch.save({"direction": direction, "concept": "love", "layer": 2, "model_path": "/m", "n_pairs": 10,
                "raw_norm": 3.5, "pos_neg_cosine": 0.85}, love)
    plain = str(tmp_path / "plain.pt")
    torch.save({"all_caps": torch.randn(64)}, plain)
    ours = np.random.RandomState(0).randn(1, 4, 64).astype(np.float32)
    ours[0, 2] = direction.numpy() + 0.1 * ours[0, 2]
    ConceptVectors(names=["love"], vectors=ours, metadata={}).save(str(tmp_path / "ours.npz"))
    out = str(tmp_path / "report")
    _ok(parity_cli(f"--replication_json={JUDGED_405B}", f"--replication_vectors={love},{plain}",
                    f"--vectors={tmp_path / 'ours.npz'}", f"--out={out}"))
    report = _report(out)
    rep = report["replication"]
    assert rep["layer"] == 84 and rep["n_results"] == 480 and rep["norm_match"] is True
    cell = next(c for c in rep["cells"] if c["label"] == "lindsey_all_caps" and c["magnitude"] == 12.0)
    assert (cell["n"], cell["identifies"], cell["coherent"]) == (20, 0.75, 0.25)
    rows = {r["name"]: r for r in report["replication_vectors"]}
    expected = float(direction.numpy() @ ours[0, 2] / np.linalg.norm(ours[0, 2]))
    assert rows["love"]["layer"] == 2 and rows["love"]["cosine_with_ours"] == pytest.approx(expected, abs=1e-6)
    assert rows["all_caps"]["cosine_with_ours"] is None
    cv = parity.pt_to_concept_vectors([love, plain])
    assert cv.names == ["love", "all_caps"] and cv.vectors.shape == (2, 1, 64)
    with open(os.path.join(out, "parity.md")) as f:
        assert "405B replication" in f.read()
    _fails(parity_cli(f"--replication_json={tmp_path / 'ours.npz'}", f"--out={out}"), "not valid JSON")


def test_our_results_beside_the_replication_use_the_report_counts(tmp_path):
    """--results goes through the report's loader and counts: ungraded records are left out and said."""
    from jax_introspect.experiment import report
    from tests.test_report import CONTROLS, SPEC, _write_synthetic
    folder = _write_synthetic(tmp_path / "sweep")  # with one ungraded record
    out = str(tmp_path / "report")
    _ok(parity_cli(f"--replication_json={JUDGED_405B}", f"--results={folder}", f"--out={out}"))
    ours = _report(out)["our_results"]
    summary = report.aggregate(report.load_run(folder))
    assert len(ours["cells"]) == len(SPEC) + len(CONTROLS) == len(summary["cells"]) + len(summary["controls"])
    dust = next(c for c in ours["cells"] if (c["label"], c["layer"], c["magnitude"]) ==
                ("lindsey_injected_thought_Dust", 10, 4.0))
    assert dust["n"] == 5 and dust["identifies"] == 3 / 5 and dust["strict_introspection"] == 2 / 5
    control = next(c for c in ours["cells"] if c["label"] == "lindsey_injected_thought_control")
    assert (control["layer"], control["magnitude"], control["n"], control["affirmative"]) == (None, 0.0, 10, 0.2)
    assert ours["warnings"] and "1 of" in ours["warnings"][0] and "ungraded" in ours["warnings"][0]
    with open(os.path.join(out, "parity.md")) as f:
        md = f.read()
    assert "| lindsey_injected_thought_Dust | 10 | 4 | 5 | 0.8 | 0.4 | 0.6 | 0.4 | 0.4 |" in md
    assert "**Warning:**" in md
    rep = _report(out)["replication"]
    assert rep["warnings"] == [] and {c["layer"] for c in rep["cells"]} == {84, None}
