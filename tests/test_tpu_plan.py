"""jax_introspect/experiment/plan.py, launch/tpu/plan.py and the plan in launch/tpu/pod.py, on small
Llama configs compiled for small compile-only TPU topologies (libtpu; no TPU needed):

- the plan's per-chip figures are what `ProgramMemory` reads from independent compiles of the same
  programs; its weights per chip are the arithmetic from the parameter shapes;
- the largest batch found by bisection fits and one step more does not (independent compiles);
- `launch.tpu.pod` refuses a run that does not fit and goes ahead with --force;
- bad input (unknown preset, a mesh that does not match the chips, libtpu missing) is one line
  of error before any compile.

If libtpu cannot load, these tests fail (with compile_only's install hint), they are not skipped.
"""
import dataclasses
import json
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from tests import hf_reference as ref

sys.path.insert(0, ref.REPO)

from jax_introspect import checkpoint as checkpoint_lib  # noqa: E402
from jax_introspect import compile_only as co  # noqa: E402
from jax_introspect import sharding  # noqa: E402
from jax_introspect.config import preset  # noqa: E402
from jax_introspect.experiment import plan as plan_lib  # noqa: E402

# Llama-3.1's structure at toy widths: 2 KV heads (duplicated to 4 on a 4-way tensor axis), untied
# embeddings; compiles in a few seconds.
TINY = dataclasses.replace(preset("llama-3.1-8b"), name="tiny-llama", n_layers=2, d_model=512, n_heads=8,
                           n_kv_heads=2, head_dim=64, d_ff=1024, vocab_size=2048)


def run(module, *args, tmp_path, env=None, timeout=600):
    env = {**os.environ, "TMPDIR": str(tmp_path), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ref.REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- figures ---------------------------------------------------------------------------------------

def expected_weight_bytes(cfg, data: int, tensor: int, itemsize: int = 2) -> int:
    """Per-chip parameter bytes from the shapes alone: every tensor-split axis divided by `tensor`
    (KV heads first duplicated to lcm(K, tensor) when tensor > K), norms replicated, data replicates."""
    del data  # the weights are replicated over the data axis
    D, H, hd, F, V, L = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    kv = cfg.n_kv_heads if cfg.n_kv_heads % tensor == 0 else np.lcm(cfg.n_kv_heads, tensor)
    per_layer = (D * H * hd + 2 * D * kv * hd + H * hd * D) // tensor + 3 * D * F // tensor + 2 * D
    embeddings = (1 if cfg.tie_word_embeddings else 2) * V * D // tensor + D
    return int((L * per_layer + embeddings) * itemsize)


@pytest.mark.parametrize("topology,mesh", [("v6e:2x2", "1x4"), ("v6e:2x2", "2x2"), ("v5p:2x2x1", "1x2")])
def test_weights_per_chip_is_the_arithmetic_of_the_shapes(topology, mesh):
    devices = co.tpu_devices(topology)
    n = int(mesh.split("x")[0]) * int(mesh.split("x")[1])
    sl = plan_lib.make_slice(TINY, devices[:n], mesh)
    data, tensor = (int(s) for s in mesh.split("x"))
    assert sl.weights == expected_weight_bytes(TINY, data, tensor)
    if tensor == 4:  # 2 stored KV heads held as 4, one per chip
        assert sl.run_config.n_kv_heads == 4
    # float32: twice the bytes
    assert plan_lib.make_slice(TINY, devices[:n], mesh, dtype="float32").weights == \
        expected_weight_bytes(TINY, data, tensor, itemsize=4)
    # The 405B preset on v5p-64's 32 chips: the figure docs/tpu.md derives by hand (26.17 GB)
    big = plan_lib.make_slice(preset("llama-3.1-405b"), co.tpu_devices("v5p:2x4x4"), "1x32")
    assert big.weights == expected_weight_bytes(preset("llama-3.1-405b"), 1, 32)
    assert abs(big.weights / 1e9 - 26.17) < 0.01


def test_plan_figures_are_what_the_compiled_programs_say(tmp_path):
    progress = []
    plan = plan_lib.make_plan(TINY, "v6e:2x2", "1x4", batch=8, prompt_len=64, max_new_tokens=16,
                              progress=progress.append)
    assert [p.name for p in plan.programs] == ["generation", "vector extraction"]
    assert sum(line.startswith("compiling ") for line in progress) == 2  # a progress line per compile
    gen, ext = plan.programs
    # Independent compiles of the same programs, read here.
    devices = co.tpu_devices("v6e:2x2")
    layout = sharding.Layout.for_model(sharding.make_mesh("1x4", devices), TINY)
    run_cfg = layout.run_config(TINY)
    params = co.abstract_params(run_cfg, layout, jnp.bfloat16)
    compiled = co.compile_generation(params, run_cfg, layout, 8, 64, 16)
    memory = co.ProgramMemory.of(compiled)
    assert gen.memory == memory
    assert gen.total == memory.arguments + memory.outputs - memory.aliased + memory.temp
    assert len(gen.weight_copies) == len(co.stacked_weight_copies(compiled.as_text(), params))
    prefill = co.compile_prefill(params, run_cfg, layout, 16, 64)
    assert ext.memory == co.ProgramMemory.of(prefill)
    assert (ext.batch, ext.prompt_len, ext.max_new_tokens) == (16, 64, 0)
    # Weights: the shapes' arithmetic, and what XLA counts as the program's parameter bytes (the
    # weights and a few small inputs).
    assert gen.weights == ext.weights == plan.weights_per_chip == expected_weight_bytes(TINY, 1, 4)
    assert 0 <= memory.arguments - gen.weights < 64 * 1024
    # KV cache: 2 (k, v) x layers x batch x slots x (4 held KV heads / 4 chips) x head_dim x 2 bytes,
    # plus the [batch, slots] validity mask and the int32 length.
    assert gen.kv_cache == 2 * 2 * 8 * 80 * 1 * 64 * 2 + 8 * 80 + 4
    # Usable HBM: what XLA:TPU says a v6e program may use (31.25 GiB of the chip's 32).
    assert plan.hbm == int(31.25 * 2 ** 30) and plan.hbm_source == "XLA:TPU"
    assert gen.fits and ext.fits and plan.fits
    # The roofline projection from those figures.
    chip = co.chip_of(devices)
    step = (gen.weights + co.kv_cache_bytes_per_chip(run_cfg, layout, 8, 72, jnp.bfloat16)) / chip.hbm_bandwidth
    assert plan.projection["decode_step_s"] == pytest.approx(step)
    assert plan.projection["prefill_s"] == pytest.approx(2 * TINY.num_params * 8 * 64 / (4 * chip.bf16_flops))
    assert plan.projection["generation_batch_s"] == pytest.approx(plan.projection["prefill_s"] + 16 * step)
    # JSON and the markdown rows carry the same figures.
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["programs"][0]["temp"] == memory.temp and data["programs"][0]["total"] == memory.total
    assert "roofline projections, not measurements" in data["projection"]["note"]
    table = plan.format_table().splitlines()
    assert table[0].startswith("| model |") and len(table) == 4
    assert f"| {memory.total / 1e9:.2f} |" in table[2] and "| yes |" in table[2]
    assert "roofline, not measured" in plan.format_text()


def test_sweep_plan_takes_the_run_from_the_config(tmp_path):
    """With a sweep config: the protocol prompts measured by the Llama-3 tokenizer (as the sweep
    plans them), its trials and generate calls, the sweep engine's call (the readout in its cell
    prefill; plain batches' own readout forward planned alike), the extraction batches, a self-hosted judge (on one chip) and a training step, each compiled."""
    from jax_introspect import tokenizer as tokenizer_lib
    from jax_introspect.experiment import sweep
    from jax_introspect.experiment.sweep_config import SweepConfig
    from jax_introspect.experiment.training.config import TrainConfig
    cfg = dataclasses.replace(TINY, name="tiny-llama3", vocab_size=128256, n_layers=4)
    judge = fake_checkpoint(tmp_path / "judge", dataclasses.replace(cfg, name="tiny-judge"))
    arm = SweepConfig(words=("Dust", "Oceans", "Bread"), layers=(1, 2), strengths=(2.0, 4.0), trials_per_cell=5,
                      control_trials=7, max_new_tokens=24, batch_size=16, grader=f"llm:{judge}")
    train = TrainConfig(lora_targets=("wq", "wo"), batch_size=4)
    plan = plan_lib.make_plan(cfg, "v6e:2x2", "2x2", sweep=arm, train_config=train)
    tok = tokenizer_lib.from_tiktoken_model(tokenizer_lib.llama3_tokenizer_model_path())
    expected = sweep.plan_sweep(arm, cfg, tok, "tiny", "bfloat16")
    assert len(expected.prompts["lindsey_injected_thought"].ids) == 172  # Lindsey's prompt (docs/tpu.md)
    assert plan.sweep["arms"][0]["protocols"] == {"lindsey_injected_thought": 172}
    assert plan.sweep["trials"] == len(expected.trials) == 2 * 2 * 5 + 7
    assert plan.sweep["generate_calls"] == -(-len(expected.trials) // 16)
    names = [p.name for p in plan.programs]
    assert names == ["generation", "sweep engine", "vector extraction", f"judge (llm:{judge})",
                     "train step (sft, lora)"]
    gen, engine_program, ext, judged, step = plan.programs
    assert (gen.batch, gen.prompt_len, gen.max_new_tokens) == (16, 192, 24)
    # The engine (the sweep's default): one call of 16 x 4 trials; the prefix is every token before
    # Lindsey's window, the cells' suffix the rest of the prompt, rounded up to 32; depth shared.
    start = expected.prompts["lindsey_injected_thought"].start
    # The first-answer-token readout (readout=True, the default) in its cell prefill: a lens at each
    # of the 2 layers per cell (the clean cell serves the shared controls), top 10.
    suffix = -(-(172 - start) // 32) * 32
    assert plan.sweep["engine_calls"] == 1 and plan.sweep["arms"][0]["engine_shapes"] == [
        (16, 64, start, suffix, 2, 10, 0, True)]
    assert (engine_program.batch, engine_program.prompt_len, engine_program.max_new_tokens) == (
        16, start + 32, 24) and engine_program.fits and "2 lens layers per cell" in engine_program.note
    assert plan.sweep["arms"][0]["readout_shapes"] == []
    # Plain batches run a readout forward of their own after each batch: its rows, split alike.
    assert plan_lib.readout_calls(arm.replace(engine="plain"), expected.trials, expected.prompts, {}) == [
        (16, start, suffix), (16, start, suffix)]
    # 3 concept words, then 100 baseline words in batches of 16: the largest call has 16 rows
    assert ext.batch == 16 and plan.sweep["arms"][0]["extraction_calls"] == 1 + 7
    # the judge: 8 trials x 4 grader prompts per call, on one chip, 256 new tokens
    assert (judged.batch, judged.max_new_tokens, judged.mesh) == (32, 256, "1x1")
    assert judged.prompt_len % 32 == 0 and judged.prompt_len > 24
    assert step.batch == 4 and step.memory is not None
    assert all(p.fits for p in plan.programs) and plan.fits
    assert plan.sweep["generation_s"] == pytest.approx(
        plan.sweep["generate_calls"] * plan_lib.generation_seconds(
            plan_lib.make_slice(cfg, co.tpu_devices("v6e:2x2"), "2x2"), 16, 192, 24))
    assert plan.sweep["judge_s"] > 0


# --- the largest batch ---------------------------------------------------------------------------

def test_bisection_logic_on_synthetic_memory():
    """Against known memory curves (no compiles): the exact answer, in few measurements."""
    hbm = 10 ** 9
    cases = [(2e8, 1e5, 4, 4), (2e8, 1e5, 1, 4), (9.9e8, 1e6, 1, 4), (1.1e9, 1e5, 1, 4),
             (2e8, 2e5, 1, None)]
    for base, per_row, step, most in cases:
        def total(b):
            return base + per_row * b + (3e6 * (b // 512) if most is None else 0)  # steps: not a line
        sl = types.SimpleNamespace(data=step, hbm=hbm)
        found = plan_lib.largest_batch(sl, 64, 16, start=32, measure=lambda b: (total(b), total(b) <= hbm))
        truth = max([b for b in range(step, 20000, step) if total(b) <= hbm], default=0)
        assert found.batch == truth and found.closed
        assert found.compiles <= (most or 10), found.tried
        assert all(b % step == 0 for b, _, _ in found.tried)
    # A coarser search: multiples of 8 (and of a data axis of 2), the largest such batch that fits.
    sl = types.SimpleNamespace(data=2, hbm=hbm)
    found = plan_lib.largest_batch(sl, 64, 16, start=32, multiple=8,
                                   measure=lambda b: (2e8 + 1e5 * b, 2e8 + 1e5 * b <= hbm))
    assert found.batch == 8000 and found.closed and all(b % 8 == 0 for b, _, _ in found.tried)


def test_largest_batch_fits_and_one_more_step_does_not():
    # Full multi-head attention and 4,096 slots over 32 layers: the KV cache (268 MB per row per chip)
    # is most of a row's memory, so the answer is a small batch (112); at d_model 1,024 each compile
    # takes half the time it did at 4,096 with 4 layers (the same KV per row). Mesh 2x2: batches step by 2.
    cfg = dataclasses.replace(TINY, name="kv-heavy", n_layers=32, d_model=1024, n_heads=8, n_kv_heads=8,
                              head_dim=128, d_ff=2048, vocab_size=4096)
    sl = plan_lib.make_slice(cfg, co.tpu_devices("v5e:2x2"), "2x2")
    found = plan_lib.largest_batch(sl, 32, 4064, start=8)
    assert found.step == 2 and found.closed and found.batch > 16 and found.batch % 2 == 0
    assert found.compiles <= 10, found.tried
    assert found.tried[:2] == [(8, found.tried[0][1], True), (16, found.tried[1][1], True)]
    # Independent compiles: the answer fits the usable HBM (15.75 GiB), the answer + one step does not.
    assert sl.hbm == int(15.75 * 2 ** 30)
    params = co.abstract_params(sl.run_config, sl.layout, jnp.bfloat16)

    def total(batch):
        try:
            compiled = co.compile_generation(params, sl.run_config, sl.layout, batch, 32, 4064)
        except Exception as e:  # XLA:TPU refuses a program that cannot fit
            assert "RESOURCE_EXHAUSTED" in str(e), e
            return None
        return co.ProgramMemory.of(compiled).total
    fits = total(found.batch)
    assert fits is not None and fits <= sl.hbm
    more = total(found.batch + 2)
    assert more is None or more > sl.hbm


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--model=llama-9b", "--topology=v6e:2x2", "--mesh=1x4"], "unknown preset 'llama-9b'"),
    (["--model=llama-3.2-1b", "--topology=v6e:2x2", "--mesh=1x32"], "needs 32 devices but 4 are given"),
    (["--model=llama-3.2-1b", "--topology=v6e:2x2", "--mesh=1x3"], "needs 3 devices but 4 are given"),
    (["--model=llama-3.2-1b", "--topology=v9x:2x2", "--mesh=1x4"], "gives no topology 'v9x:2x2'"),
    (["--model=llama-3.2-1b", "--topology=v6e:2x2", "--mesh=1x4", "--config=configs/sweeps/nope.py"],
     "no such file"),
])
def test_bad_input_is_one_line_before_any_compile(tmp_path, args, message):
    proc = run("launch.tpu.plan", *args, tmp_path=tmp_path, timeout=120)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "compiling" not in proc.stderr and "Traceback" not in proc.stderr


def test_missing_libtpu_is_one_line_naming_the_install(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "libtpu.py").write_text("raise ImportError('simulated: no libtpu')\n")
    env = {"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = run("launch.tpu.plan", "--model=llama-3.2-1b", "--topology=v6e:2x2", "--mesh=1x4", tmp_path=tmp_path,
               env=env, timeout=120)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "libtpu is not installed" in errors[0] and "pip install 'jax[tpu]==" in errors[0]
    assert "compiling" not in proc.stderr and "Traceback" not in proc.stderr


# --- launch.tpu.pod -----------------------------------------------------------------------------

def fake_checkpoint(folder, cfg) -> str:
    """A checkpoint folder with config.json, the Llama-3 tokenizer and a manifest, but no weights:
    all a plan reads."""
    from jax_introspect import tokenizer as tokenizer_lib
    os.makedirs(folder)
    cfg.save(os.path.join(folder, checkpoint_lib.CONFIG))
    tokenizer_lib.from_tiktoken_model(tokenizer_lib.llama3_tokenizer_model_path()).save(
        os.path.join(folder, checkpoint_lib.TOKENIZER_DIR))
    with open(os.path.join(folder, checkpoint_lib.MANIFEST), "w") as f:
        json.dump({"format": checkpoint_lib.FORMAT, "dtype": "bfloat16", "tokenizer": True,
                   "units": ["globals"] + [checkpoint_lib.layer_unit(i) for i in range(cfg.n_layers)]}, f)
    return str(folder)


def test_compile_topologies_of_accelerator_types():
    from launch.tpu import pod
    assert pod.compile_topology("v5p-64") == ("v5p:2x4x4", None)
    assert pod.compile_topology("v5p-32") == ("v5p:2x2x4", None)
    assert pod.compile_topology("v5p-8") == ("v5p:2x2x1", None)
    assert pod.compile_topology("v6e-64") == ("v6e:8x8", None)
    assert pod.compile_topology("v6e-8") == ("v6e:2x4", None)
    assert pod.compile_topology("v6e-1") == ("v6e:2x2", 1)
    assert pod.compile_topology("v5litepod-256") == ("v5e:16x16", None)
    assert pod.compile_topology("v5litepod-128") == ("v5e:8x16", None)
    for accelerator in ("v5p-64", "v6e-64", "v5litepod-256", "v5p-16"):
        topology, _ = pod.compile_topology(accelerator)
        assert len(co.tpu_devices(topology)) == pod.chips(accelerator)  # libtpu accepts the name


def test_pod_refuses_a_run_that_does_not_fit_and_force_goes_ahead(tmp_path):
    # 4 layers of 405B widths, Llama-3 vocabulary: 21 GB of weights per v5e chip (15.75 GB usable).
    too_big = dataclasses.replace(preset("llama-3.1-405b"), name="wide-llama", n_layers=4, n_heads=16, n_kv_heads=8,
                                  d_ff=200_000)
    checkpoint = fake_checkpoint(tmp_path / "ckpt", too_big)
    sl = plan_lib.make_slice(too_big, co.tpu_devices("v5e:2x2"), "1x4")
    assert sl.weights > sl.hbm
    common = ["create", "--dry_run", "--name=intro", "--zone=us-east5-a", "--accelerator_type=v5litepod-4",
              f"--checkpoint={checkpoint}", "--sweep_config=configs/sweeps/quickstart.py",
              "--sweep_arg=--config.layers=1,2", "--sweep_arg=--config.words=Dust"]
    proc = run("launch.tpu.pod", *common, tmp_path=tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "the plan says this run does not fit v5e:2x2" in errors[0], proc.stderr[-3000:]
    assert "--force" in errors[0]
    assert "gcloud" not in proc.stdout and "does NOT fit" in proc.stdout
    assert "compiling generation (" in proc.stderr  # the plan compiled the sweep's program
    forced = run("launch.tpu.pod", *common, "--force", tmp_path=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "warning: --force" in forced.stderr
    assert forced.stdout.splitlines()[-1].startswith("+ gcloud compute tpus tpu-vm create intro")
