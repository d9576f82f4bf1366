"""Runs sharded checks in a fresh process, where the number of simulated CPU devices can still be
chosen (XLA_FLAGS must be set before jax is imported; pytest's own process has one device).

    python tests/sharded_worker.py parity   --checkpoint=CKPT --out=OUT.json
    python tests/sharded_worker.py generate --checkpoint=CKPT --mesh=2x4 --out=OUT [--devices=4
           --process_id=I --num_processes=N --coordinator=127.0.0.1:PORT]
    python tests/sharded_worker.py restore  --checkpoint=CKPT --mesh=1x8 --out=OUT [multi-process flags]
    python tests/sharded_worker.py synthetic --checkpoint=CKPT --out=INFO.json --layers=12 ...

Results are JSON written by process 0 only (every process computes).
"""
import argparse
import json
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["parity", "generate", "restore", "synthetic", "errors"])
    p.add_argument("--checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--mesh", default="1x-1")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--process_id", type=int)
    p.add_argument("--num_processes", type=int)
    p.add_argument("--coordinator")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=8192)
    return p.parse_args()


ARGS = _args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import jax  # noqa: E402

from jax_introspect import distributed  # noqa: E402

if ARGS.coordinator:
    distributed.initialize("auto", ARGS.coordinator, ARGS.num_processes, ARGS.process_id, ARGS.timeout)

import jax_introspect  # noqa: E402
from jax_introspect import checkpoint, inject, sharding  # noqa: E402


def _write(obj):
    if distributed.is_primary():
        tmp = ARGS.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.replace(tmp, ARGS.out)


def _batch(cfg):
    """A fixed batch of 5 ragged prompts: injected (raw and norm-matched, different layers and
    windows), one clean row and one sampled row."""
    rng = np.random.RandomState(7)
    lengths = [11, 6, 14, 9, 12]
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in lengths]
    vectors = rng.standard_normal((5, cfg.d_model)).astype(np.float32)
    injection = inject.make(layer=[0, 1, 2, 1, 2], strength=[4.0, 0.0, 1.0, -3.0, 2.0], vector=vectors,
                            start=[2, 0, 5, 3, 0], norm_match=[False, False, True, False, True])
    return prompts, injection, [0.0, 0.0, 0.0, 0.0, 0.8]


def _run(lm, max_new_tokens=8):
    prompts, injection, temperature = _batch(lm.config)
    logits = lm.logits(prompts, injection=injection)
    residuals = lm.residuals(prompts, injection=injection)
    gens = lm.generate(prompts, max_new_tokens=max_new_tokens, injection=injection, temperature=temperature,
                       seed=3, trial_ids=[f"trial/{i}" for i in range(len(prompts))], return_logits=True)
    return logits, residuals, gens


def parity():
    """Every mesh of 1, 2, 4 and 8 devices against one device."""
    base = jax_introspect.load(ARGS.checkpoint)
    ref_logits, ref_resid, ref_gens = _run(base)
    devices = jax.devices()
    report = {"meshes": {}, "device_count": len(devices)}
    for spec, n in [("1x1", 1), ("1x2", 2), ("2x1", 2), ("1x4", 4), ("2x2", 4), ("1x8", 8), ("2x4", 8),
                    ("8x1", 8)]:
        mesh = sharding.make_mesh(spec, devices[:n])
        lm = jax_introspect.load(ARGS.checkpoint, mesh=mesh)
        logits, resid, gens = _run(lm)
        p = lm.params.layers
        report["meshes"][spec] = {
            "logits": float(np.abs(logits - ref_logits).max()),
            "residuals": float(np.abs(resid - ref_resid).max()),
            "step_logits": max(float(np.abs(a.logits - b.logits).max()) for a, b in zip(gens, ref_gens)),
            "tokens_equal": all(a.token_ids == b.token_ids for a, b in zip(gens, ref_gens)),
            "kv_heads": lm.layout.kv_heads,
            "wq_spec": str(lm.params.layers.wq.sharding.spec),
            "wk_shape": list(p.wk.shape),
            "wk_shard": list(p.wk.addressable_shards[0].data.shape),
            "wq_shard": list(p.wq.addressable_shards[0].data.shape),
            "embed_shard": list(lm.params.embed.addressable_shards[0].data.shape),
            "mesh_devices": len(lm.layout.mesh.devices.flat),
            "axis_types": [str(t) for t in lm.layout.mesh.axis_types],
            "param_shardings_match": all(
                x.sharding.is_equivalent_to(s, x.ndim) for x, s in
                zip(jax.tree.leaves(lm.params), jax.tree.leaves(lm.layout.params(lm.run_config)))),
        }
    report["tokens"] = [g.token_ids for g in ref_gens]
    _write(report)


def errors():
    """Bad meshes: the errors' texts."""
    cfg = checkpoint.load_config(ARGS.checkpoint)
    out = {}
    for name, call in [
        ("mesh_3x1_on_8", lambda: sharding.make_mesh("3x1")),
        ("mesh_3x-1_on_8", lambda: sharding.make_mesh("3x-1")),
        ("mesh_garbage", lambda: sharding.make_mesh("two-by-four")),
        ("tensor_3_heads", lambda: sharding.Layout.for_model(sharding.make_mesh("1x3", jax.devices()[:3]), cfg)),
        ("load_tensor_3", lambda: jax_introspect.load(ARGS.checkpoint, mesh=sharding.make_mesh("1x3", jax.devices()[:3]))),
    ]:
        try:
            call()
            out[name] = None
        except sharding.LayoutError as e:
            out[name] = f"LayoutError: {e}"
    _write(out)


def generate():
    lm = jax_introspect.load(ARGS.checkpoint, mesh=ARGS.mesh)
    _, _, gens = _run(lm)
    shared = distributed.broadcast_from_primary({"from": jax.process_index(), "ids": [g.token_ids for g in gens]})
    with open(f"{ARGS.out}.p{jax.process_index()}", "w") as f:
        json.dump({"process": jax.process_index(), "broadcast": shared}, f)
    _write({"process_count": jax.process_count(), "device_count": jax.device_count(),
            "mesh": "x".join(map(str, lm.layout.mesh.devices.shape)),
            "records": [{"trial_id": f"trial/{i}", "token_ids": g.token_ids, "finished": g.finished,
                         "logits": g.logits.tolist()} for i, g in enumerate(gens)]})


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def _rss():
    return _status("VmRSS")


def _reset_peak():
    """Start the kernel's peak-RSS counter (VmHWM) afresh, so the peak is the load's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rchar():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])


def restore():
    """Peak RSS and bytes read while restoring onto the mesh (this process's part)."""
    import gc
    mesh = sharding.make_mesh(ARGS.mesh)
    jax.jit(lambda x: x + 1)(np.zeros(4))  # backends up before measuring
    gc.collect()
    reset = _reset_peak()
    rss0, rchar0 = _rss(), _rchar()
    began = time.time()
    lm = jax_introspect.load(ARGS.checkpoint, mesh=mesh)
    jax.block_until_ready(lm.params)
    seconds = time.time() - began
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = sum(s.data.nbytes for x in jax.tree.leaves(lm.params) for s in x.addressable_shards)
    result = {"process": jax.process_index(), "processes": jax.process_count(), "mesh": ARGS.mesh, "peak_reset": reset,
              "rss_before": rss0, "peak_rss": peak, "growth": peak - rss0, "rss_after": _rss(),
              "read_bytes": _rchar() - rchar0, "local_param_bytes": held, "seconds": round(seconds, 2)}
    with open(f"{ARGS.out}.p{jax.process_index()}", "w") as f:
        json.dump(result, f)


def synthetic():
    """A random float32 checkpoint of ~ARGS size written unit by unit with the converter's writer."""
    from jax_introspect.config import ModelConfig
    from jax_introspect import params
    cfg = ModelConfig(vocab_size=ARGS.vocab, d_model=ARGS.d_model, n_layers=ARGS.layers, n_heads=8, n_kv_heads=2,
                      head_dim=ARGS.d_model // 8, d_ff=ARGS.d_ff, rope_theta=5e5, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, name="synthetic")
    rng = np.random.default_rng(0)
    writer = checkpoint.CheckpointWriter(ARGS.checkpoint, {"synthetic": True}, overwrite=True)
    total = 0
    units = [(checkpoint.GLOBALS, params.unit_shapes(cfg, params.global_leaves(cfg)))]
    units += [(checkpoint.layer_unit(i), params.unit_shapes(cfg, params.LAYER)) for i in range(cfg.n_layers)]
    for unit, shapes in units:
        arrays = {n: (rng.standard_normal(s, np.float32) * 0.02) for n, s in shapes.items()}
        total += sum(a.nbytes for a in arrays.values())
        writer.write_unit(unit, arrays)
    writer.finalize(cfg, None, {"synthetic": True}, "float32")
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ARGS.checkpoint) for f in fs)
    _write({"bytes": total, "params": cfg.num_params, "stored_bytes": stored})


if __name__ == "__main__":
    {"parity": parity, "generate": generate, "restore": restore, "synthetic": synthetic, "errors": errors}[ARGS.mode]()
