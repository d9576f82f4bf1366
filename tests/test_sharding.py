"""Meshes, axis rules and sharded execution. The sharded runs happen in a subprocess with 8
simulated CPU devices (tests/sharded_worker.py): this process already has jax with one device."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import jax_introspect
from jax_introspect import checkpoint, config, params, sharding
from tests import hf_reference as ref

WORKER = os.path.join(ref.REPO, "tests", "sharded_worker.py")


def run_worker(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, WORKER, *args], cwd=ref.REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"worker {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """8 query heads, 2 KV heads (so 4- and 8-way tensor parallelism duplicate KV heads), briefly
    trained so greedy tokens have clear winners."""
    root = tmp_path_factory.mktemp("sharded")
    ref.build_hf_model("gqa_untied", str(root / "hf"), train_steps=100, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=8)
    ref.run_convert(str(root / "hf"), str(root / "ckpt"))
    return str(root / "ckpt")


def abstract_mesh(data, tensor):
    return AbstractMesh((data, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)


# --- rules and layouts, without devices -------------------------------------------------------

def test_rules_map_every_array_axis_in_one_table():
    rules = sharding.AxisRules()
    axes = lambda name: params.by_name(name).param_axes  # noqa: E731
    assert rules.spec(axes("wq")) == P(None, "tensor", None, None)
    assert rules.spec(axes("wo")) == P(None, "tensor", None, None)
    assert rules.spec(axes("w_gate")) == P(None, "tensor", None)
    assert rules.spec(axes("w_down")) == P(None, "tensor", None)
    assert rules.spec(axes("embed")) == P("tensor", None)
    assert rules.spec(axes("lm_head")) == P(None, "tensor")
    assert rules.spec(sharding.CACHE_AXES["k"]) == P(None, "data", "tensor", None, None)
    assert rules.spec(sharding.INJECTION_AXES["vector"]) == P("data", None)
    assert rules.spec(sharding.ACTIVATION_AXES["logits"]) == P("data", None, "tensor")
    with pytest.raises(sharding.LayoutError, match="no axis rule for logical axis 'experts'"):
        rules.spec(("experts",))
    with pytest.raises(sharding.LayoutError, match="map twice onto one mesh axis"):
        rules.replace(embed="tensor").spec(axes("wq"))


@pytest.mark.parametrize("spec,n,expected", [("2x4", 8, (2, 4)), ("1x-1", 8, (1, 8)), ("-1x2", 8, (4, 2)),
                                              ((8, 1), 8, (8, 1)), ("1x1", 1, (1, 1))])
def test_mesh_shapes(spec, n, expected):
    assert sharding.parse_mesh_shape(spec, n) == expected


@pytest.mark.parametrize("spec,n,message", [
    ("3x1", 8, r"mesh '3x1' = 3x1 needs 3 devices but 8 are given"),
    ("3x-1", 8, r"3 does not divide the 8 devices"),
    ("2x4x1", 8, r"need two axis sizes"),
    ("0x8", 8, r"need two axis sizes"),
    ("-1x-1", 8, r"need two axis sizes"),
    ("twoxfour", 8, r"write it as DATAxTENSOR"),
])
def test_bad_mesh_shapes(spec, n, message):
    with pytest.raises(sharding.LayoutError, match=message):
        sharding.parse_mesh_shape(spec, n)


def test_tensor_axis_must_divide_the_query_heads():
    cfg = dataclasses.replace(config.preset("llama-3.1-8b"), n_heads=4, n_kv_heads=2)
    with pytest.raises(sharding.LayoutError, match=r"'tensor' mesh axis of size 3 does not divide the model's "
                                                   r"n_heads=4 query heads.*\[1, 2, 4\]"):
        sharding.Layout.for_model(abstract_mesh(1, 3), cfg)


@pytest.mark.parametrize("tensor,kv_heads", [(1, 8), (2, 8), (4, 8), (8, 8), (16, 16), (32, 32), (64, 64),
                                             (128, 128)])
def test_llama_405b_kv_head_plan(tensor, kv_heads):
    cfg = config.preset("llama-3.1-405b")
    layout = sharding.Layout.for_model(abstract_mesh(1, tensor), cfg)
    assert layout.kv_heads == kv_heads == sharding.kv_heads_for(cfg, tensor)
    assert layout.kv_heads % tensor == 0 and cfg.n_heads % layout.kv_heads == 0
    assert layout.run_config(cfg).n_kv_heads == kv_heads and layout.run_config(cfg).q_per_kv * kv_heads == 128


def test_kv_plan_for_awkward_head_counts():
    # 12 query heads, 4 KV heads on 3-way tensor parallelism: lcm(4, 3) = 12 KV heads.
    cfg = dataclasses.replace(config.preset("llama-3.1-8b"), n_heads=12, n_kv_heads=4)
    assert sharding.Layout.for_model(abstract_mesh(1, 3), cfg).kv_heads == 12
    assert sharding.Layout.for_model(abstract_mesh(1, 6), cfg).kv_heads == 12
    assert sharding.Layout.for_model(abstract_mesh(1, 2), cfg).kv_heads == 4


def test_axes_that_do_not_split_are_replicated():
    cfg = dataclasses.replace(config.preset("smollm2-135m"), n_heads=9, n_kv_heads=3)  # vocab 49152, d_ff 1536
    layout = sharding.Layout.for_model(abstract_mesh(1, 9), cfg)
    assert layout.rules.mesh_axis("vocab") is None and layout.rules.mesh_axis("mlp") is None
    assert layout.rules.mesh_axis("heads") == "tensor" and layout.kv_heads == 9


def test_sizing_arithmetic_for_405b_on_v5p_32():
    cfg = config.preset("llama-3.1-405b")
    need = sharding.per_device_bytes(cfg, data=1, tensor=16, batch=32, prompt_len=192, new_tokens=100)
    D, L, V, F, hd = 16384, 126, 128256, 53248, 128
    per_layer = 2 * D + 2 * D * 8 * hd + 2 * D * 1 * hd + 3 * D * F / 16  # q/o 8 heads, k/v 1 head
    assert need["weights"] == int((L * per_layer + 2 * V / 16 * D + D) * 2)
    assert need["kv_cache"] == 2 * L * 32 * 292 * 1 * hd * 2
    assert need["kv_heads"] == 16
    assert 51e9 < need["total"] < 53e9  # docs/tpu.md: 51.9 GB of a v5p chip's 95 GB


# --- checkpoint storage -----------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"])
def test_storage_chunks_align_with_every_tensor_split(preset):
    cfg = config.preset(preset)
    for leaf in params.global_leaves(cfg) + params.LAYER:
        name, shape = leaf.name, leaf.unit_shape(cfg)
        chunk = checkpoint.storage_chunks(name, shape, 2)
        assert math.prod(chunk) * 2 <= 16 << 20, (name, chunk)
        for axis, logical in enumerate(leaf.axes):
            if sharding.AxisRules().mesh_axis(logical) != "tensor":
                continue
            for tensor in (2, 4, 8, 16, 32, 64):
                if shape[axis] % tensor == 0:
                    assert (shape[axis] // tensor) % chunk[axis] == 0, (name, tensor, chunk)


def test_converter_writes_head_aligned_chunks(tiny8):
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(os.path.join(tiny8, "params", "layer_000")).item_metadata
    assert meta["wq"].storage.chunk_shape == (1, 64, 8)  # [heads, embed, head_dim]: one head a chunk
    assert meta["wk"].storage.chunk_shape == (1, 64, 8)
    assert meta["wo"].storage.chunk_shape == (1, 8, 64)
    assert meta["w_gate"].storage.chunk_shape == (2, 64)  # [mlp, embed]: 128 / 64 rows


def test_checkpoint_of_another_model_is_named(tiny8, tmp_path):
    other = tmp_path / "other_hf"
    ref.build_hf_model("gqa_untied", str(other), intermediate_size=96, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=8)
    ref.run_convert(str(other), str(tmp_path / "other"))
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny8, mixed)
    shutil.rmtree(mixed / "params" / "layer_001")
    shutil.copytree(tmp_path / "other" / "params" / "layer_001", mixed / "params" / "layer_001")
    with pytest.raises(checkpoint.CheckpointError, match=r"layer_001/w_gate is stored with shape \(96, 64\) but "
                                                         r"the checkpoint's config expects \(128, 64\): these "
                                                         r"weights belong to another model"):
        jax_introspect.load(str(mixed))
    # A config.json that describes another model than the weights.
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny8, swapped)
    shutil.copy(tmp_path / "other" / "config.json", swapped / "config.json")
    with pytest.raises(checkpoint.CheckpointError, match="belong to another model"):
        jax_introspect.load(str(swapped), mesh=sharding.make_mesh("1x1", jax.devices()[:1]))


def test_gcs_paths_are_read_through_epath(tiny8, monkeypatch):
    """gs:// checkpoints: the URL reaches epath and orbax untouched (no abspath), here served from
    a local folder by stand-ins for both."""
    from etils import epath
    url = "gs://bucket/models/tiny8/"
    assert checkpoint.normalize(url) == "gs://bucket/models/tiny8"
    assert checkpoint.join("gs://bucket/x", "params", "globals") == "gs://bucket/x/params/globals"
    local = lambda p: str(p).replace("gs://bucket/models/tiny8", tiny8)  # noqa: E731
    seen = []

    def gpath(p):
        seen.append(str(p))
        return epath.Path(local(p))
    monkeypatch.setattr(checkpoint, "_gpath", gpath)
    real = checkpoint._checkpointer

    class Translating:
        def __init__(self):
            self.inner = real()

        def metadata(self, path):
            assert str(path).startswith("gs://")
            seen.append(str(path))
            return self.inner.metadata(local(path))

        def restore(self, path, targets):
            assert str(path).startswith("gs://")
            return self.inner.restore(local(path), targets)
    monkeypatch.setattr(checkpoint, "_checkpointer", Translating)
    lm = jax_introspect.load(url)
    assert lm.path == "gs://bucket/models/tiny8"
    assert "gs://bucket/models/tiny8/manifest.json" in seen
    assert "gs://bucket/models/tiny8/params/layer_002" in seen
    monkeypatch.undo()
    expected = jax_introspect.load(tiny8)
    np.testing.assert_array_equal(lm.logits([[1, 2, 3]]), expected.logits([[1, 2, 3]]))


def test_one_device_is_a_1x1_mesh(tiny8):
    """Without a mesh a model runs on a 1x1 mesh: the same programs and shardings as mesh='1x1',
    bit for bit; explicit shardings= put it on the mesh (or the one device) they name."""
    base = jax_introspect.load(tiny8)
    assert base.layout.mesh.devices.shape == (1, 1) and base.layout.mesh.axis_names == sharding.MESH_AXES
    lm = jax_introspect.load(tiny8, mesh=sharding.make_mesh("1x1", jax.devices()[:1]))
    assert lm.layout == base.layout
    assert isinstance(lm.params.layers.wq.sharding, jax.sharding.NamedSharding)
    assert lm.layout.mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    tokens = [[5, 6, 7, 8], [9, 10]]
    np.testing.assert_array_equal(lm.logits(tokens), base.logits(tokens))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for shardings in (base.layout.params(base.run_config), jax.tree.map(lambda _: single, base.params)):
        other = jax_introspect.load(tiny8, shardings=shardings)
        assert other.layout == base.layout
        np.testing.assert_array_equal(other.logits(tokens), base.logits(tokens))
    # A LanguageModel built from params alone runs on the mesh they live on.
    assert jax_introspect.LanguageModel(base.config, base.params).layout == base.layout
    with pytest.raises(ValueError, match="either mesh= or shardings="):
        jax_introspect.load(tiny8, mesh=lm.layout.mesh, shardings=base.params)


def test_make_mesh_falls_back_only_for_a_partial_slice(monkeypatch):
    """jax.make_mesh asserts that TPU devices form a whole slice (a cuboid without holes); only
    that falls back to a plain mesh, with a warning. Other errors propagate."""
    warnings = []
    monkeypatch.setattr(sharding.logging, "warning", lambda msg, *args: warnings.append(msg % args))

    def partial_slice(*args, **kwargs):
        raise AssertionError('Constructed mesh contains a "hole"')
    monkeypatch.setattr(jax, "make_mesh", partial_slice)
    mesh = sharding.make_mesh("1x1", jax.devices()[:1])
    assert mesh.axis_names == sharding.MESH_AXES and mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert len(warnings) == 1 and "ignores the interconnect" in warnings[0] and "hole" in warnings[0]

    def broken(*args, **kwargs):
        raise RuntimeError("backend failure")
    monkeypatch.setattr(jax, "make_mesh", broken)
    with pytest.raises(RuntimeError, match="backend failure"):
        sharding.make_mesh("1x1", jax.devices()[:1])


# --- 8 simulated devices ----------------------------------------------------------------------

def test_meshes_of_1_2_4_8_devices_match_one_device(tiny8, tmp_path):
    out = tmp_path / "parity.json"
    run_worker("parity", f"--checkpoint={tiny8}", f"--out={out}")
    report = json.loads(out.read_text())
    assert report["device_count"] == 8
    meshes = report["meshes"]
    assert {"1x8", "2x4", "8x1"} <= set(meshes)
    for spec, r in meshes.items():
        data, tensor = map(int, spec.split("x"))
        assert r["mesh_devices"] == data * tensor
        assert r["axis_types"] == ["AxisType.Auto", "AxisType.Auto"]
        assert r["tokens_equal"], spec
        assert r["logits"] <= 1e-5 and r["step_logits"] <= 1e-5 and r["residuals"] <= 1e-5, (spec, r)
        assert r["param_shardings_match"], spec
        assert r["kv_heads"] == max(2, tensor)  # 2 stored KV heads, duplicated to one per device
        assert r["wq_shard"] == [3, 8 // tensor, 64, 8]  # [layers, heads, embed, head_dim]
        assert r["wk_shard"] == [3, 1 if tensor > 1 else 2, 64, 8]
        assert r["embed_shard"] == [256 // tensor, 64]
    # The batch mixes injected, clean and sampled rows: the generations are not all the same.
    assert len({tuple(t) for t in report["tokens"]}) == 5


def test_bad_meshes_on_8_devices(tiny8, tmp_path):
    out = tmp_path / "errors.json"
    run_worker("errors", f"--checkpoint={tiny8}", f"--out={out}")
    errors = json.loads(out.read_text())
    assert "needs 3 devices but 8 are given" in errors["mesh_3x1_on_8"]
    assert "3 does not divide the 8 devices" in errors["mesh_3x-1_on_8"]
    assert "write it as DATAxTENSOR" in errors["mesh_garbage"]
    for key in ("tensor_3_heads", "load_tensor_3"):
        assert "'tensor' mesh axis of size 3 does not divide the model's n_heads=8" in errors[key]
