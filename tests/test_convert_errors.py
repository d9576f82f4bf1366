"""`python -m launch.convert` on broken inputs: a non-zero exit, one clear `error:` line naming the
offending file or field and the fix, and no checkpoint (not even a staging folder) left behind.
Also: an interrupted conversion never looks finished and resumes, and both HF rope layouts
(Llama-3.1's `rope_scaling` + `rope_theta`, transformers 5's `rope_parameters`) give one config.

Each broken input is a copy of one tiny sharded HF checkpoint; the failing conversions run
concurrently in one module fixture (each is a ~2 s subprocess, mostly imports)."""
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

import jax_introspect
from jax_introspect import checkpoint as ckpt
from tests import hf_reference

MODEL = "gqa_untied"  # 3 layers, untied head, llama3 rope
INDEX = "model.safetensors.index.json"
WORKERS = max(2, min(8, os.cpu_count() or 2))


def _run_all(jobs):
    """jobs: {key: (source, out, extra_args)} -> {key: CompletedProcess}, run concurrently."""
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {key: pool.submit(hf_reference.run_convert, src, out, extra=extra, check=False)
                   for key, (src, out, extra) in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny HF Llama saved in ~20 shards with its index json."""
    root = tmp_path_factory.mktemp("hf")
    model = hf_reference.build_hf_model(MODEL, str(root / "single"))
    folder = str(root / "sharded")
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) > 3 and os.path.exists(os.path.join(folder, INDEX)), shards
    return folder


def _weight_map(folder):
    with open(os.path.join(folder, INDEX)) as f:
        return json.load(f)["weight_map"]


def _edit_config(folder, edit):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def _smollm2_gguf():
    from jax_introspect.convert.gguf_file import smollm2_path
    return smollm2_path()


# Each case breaks a copy of the sharded folder in place and returns (source to convert, substrings
# the error must contain). `{folder}` in a substring is replaced by the copy's path.

def _missing_shard(folder):
    shard = _weight_map(folder)["model.layers.1.self_attn.q_proj.weight"]
    os.remove(os.path.join(folder, shard))
    return folder, [shard, INDEX, "missing", "download the complete model folder"]


def _truncated_shard(folder):
    shard = os.path.join(folder, _weight_map(folder)["model.layers.2.mlp.down_proj.weight"])
    os.truncate(shard, os.path.getsize(shard) - 100)
    return folder, [shard, "truncated", "re-download"]


def _rewrite_tensor(folder, name, make):
    shard = os.path.join(folder, _weight_map(folder)[name])
    tensors = safetensors.numpy.load_file(shard)
    tensors[name] = make(tensors[name])
    safetensors.numpy.save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def _wrong_shape(folder):
    name = "model.layers.1.mlp.up_proj.weight"  # [128, 64] in HF layout
    shard = _rewrite_tensor(folder, name, lambda w: np.zeros((100, 64), np.float32))
    return folder, [shard, name, "[100, 64]", "[128, 64]", "config.json", "re-download"]


def _nan_in_last_layer(folder):
    # Only seen when the tensor is read, after globals and two layers were written: the staged
    # units must be discarded, not left for a resume.
    name = "model.layers.2.self_attn.v_proj.weight"
    shard = _rewrite_tensor(folder, name, lambda w: np.where(np.arange(w.size).reshape(w.shape) == 7, np.nan, w))
    return folder, [shard, name, "NaN", "re-download"]


def _more_layers_than_weights(folder):
    path = _edit_config(folder, lambda c: c.update(num_hidden_layers=5))
    return folder, [path, "5 layers", "missing", "model.layers.3.", "Use the config.json that came with these weights"]


def _other_hidden_size(folder):
    path = _edit_config(folder, lambda c: c.update(hidden_size=128))
    return folder, [path, "model.embed_tokens.weight", "[256, 64]", "[256, 128]",
                    "Use the config.json that came with these weights"]


def _rope_type(kind):
    def brk(folder):
        path = _edit_config(folder, lambda c: c["rope_parameters"].update(rope_type=kind))
        return folder, [path, f"rope type '{kind}'", "not supported", "llama3"]
    return brk


def _attention_bias(folder):
    path = _edit_config(folder, lambda c: c.update(attention_bias=True))
    return folder, [path, "attention_bias", "not supported"]


def _random_gguf(folder):
    path = os.path.join(folder, "x.gguf")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(64 * 1024))
    return path, [path, "not a readable GGUF file", "re-download"]


def _truncated_gguf(folder):
    real = _smollm2_gguf()
    path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(real, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(os.path.getsize(real) - 4096))
    return path, [path, "not a readable GGUF file", "re-download"]


CASES = {
    "missing_shard": _missing_shard,
    "truncated_shard": _truncated_shard,
    "wrong_shape": _wrong_shape,
    "nan_in_last_layer": _nan_in_last_layer,
    "config_more_layers": _more_layers_than_weights,
    "config_hidden_size": _other_hidden_size,
    "rope_yarn": _rope_type("yarn"),
    "rope_dynamic": _rope_type("dynamic"),
    "attention_bias": _attention_bias,
    "random_gguf": _random_gguf,
    "truncated_gguf": _truncated_gguf,
}


@pytest.fixture(scope="module")
def failures(sharded, tmp_path_factory):
    """case -> (out, expected substrings, CompletedProcess); all conversions run concurrently."""
    root = tmp_path_factory.mktemp("broken")
    jobs, expected = {}, {}
    for case, brk in CASES.items():
        folder = str(root / case)
        shutil.copytree(sharded, folder)
        source, expected[case] = brk(folder)
        jobs[case] = (source, str(root / f"{case}_ckpt"), ())
    procs = _run_all(jobs)
    return {case: (jobs[case][1], expected[case], procs[case]) for case in jobs}


def _assert_no_checkpoint(out):
    assert not os.path.exists(out), f"{out} was left behind"
    assert not os.path.exists(out + ckpt.STAGING_SUFFIX), f"{out + ckpt.STAGING_SUFFIX} was left behind"
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        jax_introspect.load(out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_input_is_rejected_cleanly(failures, case):
    out, expected, proc = failures[case]
    assert proc.returncode != 0, f"{case}: conversion succeeded\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), proc.stderr[-2000:]
    for part in expected:
        assert part in message, f"{case}: {part!r} not in error message:\n{message}"
    _assert_no_checkpoint(out)


def test_existing_output_needs_overwrite(sharded, tmp_path):
    out = tmp_path / "existing"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    before = {p: os.stat(p).st_mtime_ns for p in out.rglob("*")}

    proc = hf_reference.run_convert(sharded, str(out), check=False)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and str(out) in message and "--overwrite" in message, message
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob("*")} == before
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00\x01" * 100
    assert not os.path.exists(str(out) + ckpt.STAGING_SUFFIX)


# Runs `launch.convert` exactly as the CLI does, but the process stops itself (SIGSTOP) right after
# committing layer_001, so the test can kill -9 it at a known point: no race with a fast conversion.
_STOP_AFTER_LAYER_1 = """
import os, runpy, signal, sys
from jax_introspect import checkpoint as ckpt
write_unit = ckpt.CheckpointWriter.write_unit
def stopping_write_unit(self, unit, arrays):
    write_unit(self, unit, arrays)
    if unit == ckpt.layer_unit(1):
        os.kill(os.getpid(), signal.SIGSTOP)
ckpt.CheckpointWriter.write_unit = stopping_write_unit
sys.argv[0] = "launch.convert"
runpy.run_module("launch.convert", run_name="__main__", alter_sys=True)
"""


def _wait_until_stopped(proc, point="layer_001", timeout_s=120):
    """Wait until `proc` stops itself (SIGSTOP) at `point` (named in the failure message)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid:
            assert os.WIFSTOPPED(status), f"converter exited (status {status}) before reaching {point}"
            return
        time.sleep(0.01)
    raise AssertionError(f"converter did not reach {point} within {timeout_s} s")


def kill_when_stopped(script, args, log_path, point, env=None):
    """Run `python -c script *args` (a converter that stops itself with SIGSTOP at `point`), then
    kill -9 it there: an interruption at a known point, no race with a fast conversion."""
    with open(log_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=hf_reference.REPO,
                                stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    try:
        _wait_until_stopped(proc, point)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, open(log_path).read()[-2000:]


def test_interrupted_conversion_resumes(tmp_path):
    src = str(tmp_path / "hf24")
    hf_reference.build_hf_model(MODEL, src, num_hidden_layers=24)
    out, fresh = str(tmp_path / "resumed"), str(tmp_path / "fresh")
    staging = out + ckpt.STAGING_SUFFIX
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the reference conversion, meanwhile
        fresh_proc = pool.submit(hf_reference.run_convert, src, fresh)
        kill_when_stopped(_STOP_AFTER_LAYER_1, [f"--source={src}", f"--out={out}", "--dtype=float32"],
                          tmp_path / "stderr.txt", point="layer_001")
        fresh_proc.result()

    # Killed: never looks finished, and the error says what to do.
    assert not os.path.exists(out)
    assert sorted(os.listdir(os.path.join(staging, "params"))) == ["globals", "layer_000", "layer_001"]
    with pytest.raises(ckpt.CheckpointError, match="interrupted conversion") as info:
        jax_introspect.load(out)
    assert staging in str(info.value) and "re-run the same" in str(info.value)
    # A kill inside orbax's save leaves its temporary folder; the resumed run must cope with it.
    os.makedirs(os.path.join(staging, "params", "layer_002.orbax-checkpoint-tmp", "junk"))
    written = {u: os.stat(os.path.join(staging, "params", u)).st_ino for u in ("globals", "layer_000", "layer_001")}

    # The same command resumes: units written before the kill are kept, not rewritten.
    hf_reference.run_convert(src, out)
    assert not os.path.exists(staging)
    assert sorted(os.listdir(os.path.join(out, "params"))) == ["globals"] + [ckpt.layer_unit(i) for i in range(24)]
    assert {u: os.stat(os.path.join(out, "params", u)).st_ino for u in written} == written

    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 11))
    resumed_lm, fresh_lm = jax_introspect.load(out), jax_introspect.load(fresh)
    assert resumed_lm.config == fresh_lm.config
    np.testing.assert_array_equal(resumed_lm.logits(tokens), fresh_lm.logits(tokens))


def _to_llama31_layout(cfg):
    """transformers 5's `rope_parameters` -> Llama-3.1's published `rope_scaling` + top-level `rope_theta`."""
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None


@pytest.mark.parametrize("name", ["gqa_untied", "gqa_plain_rope"])
def test_both_hf_rope_layouts_give_one_config(tmp_path, name):
    # Same folder basename in both: the config's `name` comes from it.
    new, old = str(tmp_path / "new" / "model"), str(tmp_path / "old" / "model")
    hf_reference.build_hf_model(name, new)
    shutil.copytree(new, old)
    _edit_config(old, _to_llama31_layout)
    with open(os.path.join(new, "config.json")) as f:
        assert "rope_parameters" in json.load(f)  # what transformers 5 writes
    with open(os.path.join(old, "config.json")) as f:
        written = json.load(f)
    assert "rope_parameters" not in written and written["rope_theta"] == 500000.0

    outs = {"new": str(tmp_path / "new_ckpt"), "old": str(tmp_path / "old_ckpt")}
    procs = _run_all({"new": (new, outs["new"], ()), "old": (old, outs["old"], ())})
    for key, proc in procs.items():
        assert proc.returncode == 0, f"{key}: {proc.stderr[-2000:]}"
    cfg_new, cfg_old = ckpt.load_config(outs["new"]), ckpt.load_config(outs["old"])
    assert cfg_old == cfg_new
    assert cfg_new.rope_theta == 500000.0
    assert (cfg_new.rope_scaling is not None) == (name == "gqa_untied")
    if name == "gqa_untied":
        assert cfg_new.rope_scaling.factor == 8.0 and cfg_new.rope_scaling.original_max_position_embeddings == 64


def test_checkpoint_of_an_older_format_is_refused_naming_the_fix(sharded, tmp_path):
    """A checkpoint of format v1 (another weight layout) is refused before any weight is read, and
    `--overwrite` replaces it (it is ours)."""
    out = str(tmp_path / "old")
    hf_reference.run_convert(sharded, out)
    manifest = os.path.join(out, ckpt.MANIFEST)
    with open(manifest) as f:
        data = json.load(f)
    data["format"] = "jax_introspect.checkpoint/v1"
    with open(manifest, "w") as f:
        json.dump(data, f)
    with pytest.raises(ckpt.CheckpointError, match=r"older jax_introspect \(jax_introspect.checkpoint/v1\).*"
                                                    r"convert it again: `python -m launch.convert"):
        ckpt.read_manifest(out)
    proc = hf_reference.run_convert(sharded, out, extra=("--overwrite",), check=False)
    assert proc.returncode == 0, proc.stderr
    assert ckpt.read_manifest(out)["format"] == ckpt.FORMAT
