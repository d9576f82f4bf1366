"""Peak host memory of `python -m launch.convert` on synthetic multi-shard HF checkpoints.

    python -m benchmarks.conversion_memory --sizes=0.5,1,2,4 [--dtype=float32] [--output=table.md]

For each size a Llama-shaped HF folder (config.json, one safetensors shard per decoder layer, one
for the embedding and one for the head, and model.safetensors.index.json) is written tensor by
tensor in small chunks, so this process never holds more than a few MB of it. The converter then
runs in its own process; its peak RSS is the kernel's `ru_maxrss` for that process (from `wait4`
in a small launcher process, see `_LAUNCHER`), cross-checked by sampling its RSS every 20 ms.

"RSS growth" is peak RSS minus the peak RSS of converting a tiny model of the same width (one
layer, 256-token vocab, ~70 MB): the fixed cost of the interpreter, jax, orbax and tensorstore is
subtracted, and what is left is what the conversion itself adds. A converter that streams one
layer at a time shows the same growth at every size.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INDEX = "model.safetensors.index.json"
_CHUNK = 1 << 22  # elements generated and written at a time (16 MB of float32)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Llama dimensions of the synthetic model (defaults: a ~64 MB float32 decoder layer)."""

    hidden: int = 1024
    intermediate: int = 4096
    vocab: int = 32000
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 128

    def layer_tensors(self, i: int) -> dict[str, tuple[int, ...]]:
        D, F, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        p = f"model.layers.{i}."
        return {p + "input_layernorm.weight": (D,), p + "self_attn.q_proj.weight": (q, D),
                p + "self_attn.k_proj.weight": (kv, D), p + "self_attn.v_proj.weight": (kv, D),
                p + "self_attn.o_proj.weight": (D, q), p + "post_attention_layernorm.weight": (D,),
                p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                p + "mlp.down_proj.weight": (D, F)}

    def layer_bytes(self) -> int:
        return 4 * sum(int(np.prod(s)) for s in self.layer_tensors(0).values())

    def global_bytes(self) -> int:  # embedding + untied head + final norm
        return 4 * (2 * self.vocab * self.hidden + self.hidden)

    def layers_for(self, target_bytes: float) -> int:
        return max(1, round((target_bytes - self.global_bytes()) / self.layer_bytes()))


def _hf_config(shape: Shape, n_layers: int) -> dict:
    """A Llama-3.1-style config.json (rope_scaling + top-level rope_theta)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "num_hidden_layers": n_layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
            "vocab_size": shape.vocab, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def _write_safetensors(path: str, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator) -> int:
    """Write float32 tensors (norms: ones; matrices: uniform in [-0.02, 0.02)) chunk by chunk."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in tensors.items():
            remaining = int(np.prod(shape))
            while remaining:
                n = min(remaining, _CHUNK)
                if len(shape) == 1:
                    chunk = np.ones(n, np.float32)
                else:
                    chunk = rng.random(n, dtype=np.float32)
                    chunk -= 0.5
                    chunk *= 0.04
                f.write(memoryview(chunk))
                remaining -= n
    return 8 + len(blob) + offset


def write_synthetic_hf(folder: str, target_gb: float, shape: Shape = Shape(), n_layers: Optional[int] = None,
                       seed: int = 0) -> dict:
    """A multi-shard HF Llama folder of about `target_gb` GB (1e9 bytes) of float32 weights
    (or exactly `n_layers` layers). Returns {"layers", "bytes", "shards"}."""
    n_layers = n_layers or shape.layers_for(target_gb * 1e9)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    D = shape.hidden
    shards = [{"model.embed_tokens.weight": (shape.vocab, D)}]
    shards += [shape.layer_tensors(i) for i in range(n_layers)]
    shards += [{"model.norm.weight": (D,), "lm_head.weight": (shape.vocab, D)}]
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(os.path.join(folder, name), tensors, rng)
        weight_map.update(dict.fromkeys(tensors, name))
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(_hf_config(shape, n_layers), f, indent=2)
    return {"layers": n_layers, "bytes": total, "shards": len(shards)}


# Runs the converter and prints its exact peak RSS. A dedicated small process is needed: a child
# spawned (vfork + exec) straight from a big parent, such as pytest with torch loaded, inherits that
# parent's peak RSS in its `ru_maxrss` (Linux carries the pre-exec high-water mark over exec).
_LAUNCHER = """
import json, os, subprocess, sys
log = open(sys.argv[1], "w")
proc = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


def measure_conversion(source: str, out: str, dtype: str = "float32", poll_s: float = 0.02) -> dict:
    """Run `python -m launch.convert` in a child process: its peak RSS in bytes (the kernel's
    `ru_maxrss`, and the largest of its RSS sampled every `poll_s` s, as a cross-check) and wall time."""
    import psutil
    cmd = [sys.executable, "-m", "launch.convert", f"--source={source}", f"--out={out}", f"--dtype={dtype}"]
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        start = time.monotonic()
        launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, log.name, *cmd], cwd=REPO,
                                    stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        sampled_peak = 0
        while launcher.poll() is None:
            try:
                converters = psutil.Process(launcher.pid).children()
                sampled_peak = max([sampled_peak] + [c.memory_info().rss for c in converters])
            except psutil.Error:  # exited between the poll and the sample
                pass
            time.sleep(poll_s)
        wall = time.monotonic() - start
        report = launcher.stdout.read()
        launcher.stdout.close()
        try:
            result = json.loads(report)
        except json.JSONDecodeError:
            result = {"returncode": f"launcher failed ({launcher.returncode}): {report!r}"}
        if result["returncode"] != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result['returncode']}):\n{log.read()[-3000:]}")
    return {"peak_rss": result["maxrss_kb"] * 1024, "sampled_peak_rss": sampled_peak, "wall_s": wall}


def run(sizes_gb: Sequence[float], dtype: str = "float32", workdir: Optional[str] = None,
        shape: Shape = Shape(), log=print) -> list[dict]:
    """Baseline (a tiny model of the same width) then each size. Rows carry bytes, layers,
    peak_rss, growth (peak_rss - the baseline's), wall_s; every folder is deleted after use."""
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="conversion_memory_", dir="/tmp")
    try:
        need = 2.1 * max(sizes_gb) * 1e9  # a source and its checkpoint exist together
        free = shutil.disk_usage(workdir).free
        if free < need:
            raise RuntimeError(f"{workdir}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB")

        def one(label, target_gb, model_shape, n_layers=None):
            src, out = os.path.join(workdir, f"{label}_hf"), os.path.join(workdir, f"{label}_ckpt")
            t = time.monotonic()
            try:
                info = write_synthetic_hf(src, target_gb, model_shape, n_layers=n_layers)
                log(f"{label}: wrote {info['bytes'] / 1e9:.2f} GB ({info['layers']} layers, "
                    f"{info['shards']} shards) in {time.monotonic() - t:.1f} s; converting")
                result = measure_conversion(src, out, dtype)
            finally:
                for path in (src, out, out + ".incomplete"):
                    shutil.rmtree(path, ignore_errors=True)
            log(f"{label}: peak RSS {result['peak_rss'] / 2**20:.0f} MB, {result['wall_s']:.1f} s")
            return {"label": label, **info, **result}

        baseline = one("tiny", 0, dataclasses.replace(shape, vocab=256), n_layers=1)
        rows = [baseline]
        for gb in sizes_gb:
            row = one(f"{gb:g}GB", gb, shape)
            rows.append({**row, "growth": row["peak_rss"] - baseline["peak_rss"]})
        baseline["growth"] = 0
        return rows
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def markdown_table(rows: list[dict], dtype: str = "float32") -> str:
    mb = lambda b: f"{b / 2**20:,.0f}"
    lines = [f"Conversion to {dtype} (`python -m launch.convert`); MB = 2^20 bytes; growth = peak RSS "
             "minus the tiny model's peak RSS.", "",
             "| model | size GB | layers | shards | peak RSS MB | sampled peak MB | growth MB | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bytes'] / 1e9:.2f} | {r['layers']} | {r['shards']} | "
                     f"{mb(r['peak_rss'])} | {mb(r['sampled_peak_rss'])} | {mb(r['growth'])} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.5,1,2,4", help="comma-separated sizes in GB (1e9 bytes)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new one in /tmp)")
    parser.add_argument("--output", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    rows = run(sizes, dtype=args.dtype, workdir=args.workdir,
               log=lambda msg: print(msg, file=sys.stderr, flush=True))
    table = markdown_table(rows, args.dtype)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
