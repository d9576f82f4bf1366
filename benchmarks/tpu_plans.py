"""The plans of docs/tpu.md ("what fits where"): `launch.tpu.plan` for Llama-3.1-405B/70B/8B on
Cloud TPU slices, compiled on this CPU host (libtpu), and the table made from their JSON.

    python -m benchmarks.tpu_plans [--out=benchmarks/data/tpu_plans] [--only=l405_v5p64,...]  # ~30 min
    python -m benchmarks.tpu_plans --table_only   # the table from the JSON files already there
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SWEEPS = "configs/sweeps/"
RUNS = {  # name -> launch.tpu.plan arguments
    "l405_v5p32": "--model=llama-3.1-405b --topology=v5p:2x2x4 --mesh=1x16 --config=SWEEPSlindsey2025.py",
    "l405_v5p64": "--model=llama-3.1-405b --topology=v5p:2x4x4 --mesh=1x32 --config=SWEEPSlindsey2025.py --max_batch",
    "l405_v6e64": "--model=llama-3.1-405b --topology=v6e:8x8 --mesh=1x64 --config=SWEEPSlindsey2025.py --max_batch "
                  "--batch_multiple=8",
    "l405_v5e256": "--model=llama-3.1-405b --topology=v5e:16x16 --mesh=2x128 --config=SWEEPSlindsey2025.py",
    "r405_v5p32": "--model=llama-3.1-405b --topology=v5p:2x2x4 --mesh=1x16 --config=SWEEPSreplication_405b_canonical.py "
                  "--noextraction",
    "r405_v5p64": "--model=llama-3.1-405b --topology=v5p:2x4x4 --mesh=1x32 --config=SWEEPSreplication_405b_canonical.py "
                  "--noextraction",
    "r405_v6e64": "--model=llama-3.1-405b --topology=v6e:8x8 --mesh=1x64 --config=SWEEPSreplication_405b_canonical.py "
                  "--noextraction",
    "r405_v5e256": "--model=llama-3.1-405b --topology=v5e:16x16 --mesh=2x128 "
                   "--config=SWEEPSreplication_405b_canonical.py --noextraction",
    "l70_v5p8": "--model=llama-3.1-70b --topology=v5p:2x2x1 --mesh=1x4 --config=SWEEPSlindsey2025.py",
    "l70_v6e8": "--model=llama-3.1-70b --topology=v6e:2x4 --mesh=1x8 --config=SWEEPSlindsey2025.py --max_batch "
                "--batch_multiple=8",
    "l70_v5e16": "--model=llama-3.1-70b --topology=v5e:4x4 --mesh=1x16 --config=SWEEPSlindsey2025.py",
    "t70_v5p8": "--model=llama-3.1-70b --topology=v5p:2x2x1 --mesh=1x4 --config=SWEEPSlindsey2025.py --noextraction "
                "--train_config=configs/train/detect_llama31.py",
    "l8_v6e4": "--model=llama-3.1-8b --topology=v6e:2x2 --mesh=1x4 --config=SWEEPSlindsey2025.py "
               "--train_config=configs/train/detect_llama31.py",
    "l8_v5e4": "--model=llama-3.1-8b --topology=v5e:2x2 --mesh=1x4 --config=SWEEPSlindsey2025.py",
    "t405_v5p64": "--model=llama-3.1-405b --topology=v5p:2x4x4 --mesh=1x32 --config=SWEEPSlindsey2025.py "
                  "--noextraction --train_config=configs/train/detect_llama31_pod.py",
}
SLICE_NAMES = {"v5p:2x2x4": "v5p-32", "v5p:2x4x4": "v5p-64", "v6e:8x8": "v6e-64", "v5e:16x16": "v5litepod-256",
               "v5p:2x2x1": "v5p-8", "v6e:2x4": "v6e-8", "v5e:4x4": "v5litepod-16", "v6e:2x2": "v6e-4",
               "v5e:2x2": "v5litepod-4"}


def _gb(n):
    return "-" if n is None else f"{n / 1e9:.2f}"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def rows(name: str, plan: dict) -> list[str]:
    """Markdown rows of one plan: its programs (train-only runs: the train step), the first generation
    row carrying the largest batch and the projections."""
    sweep = os.path.basename(plan["sweep"]["config"]).removesuffix(".py") if plan.get("sweep") else "-"
    where = f"{SLICE_NAMES.get(plan['topology'], plan['topology'])} (`{plan['topology']}`)"
    out = []
    for i, p in enumerate(plan["programs"]):
        if name.startswith("t") and not p["program"].startswith("train"):
            continue
        first = p["program"] == "generation" and i == 0
        best = plan.get("max_batch") if first else None
        projection = plan.get("projection") or {}
        step = f"{projection['decode_step_s'] * 1e3:.1f} ms" if first and projection else ""
        whole = _duration(plan["sweep"]["generation_s"]) if first and plan.get("sweep") else ""
        fits = "yes" if p["fits"] else "**no**"
        largest = f"{best['batch']} ({best['compiles']})" if best else ""
        kv = _gb(p["kv_cache"]) if p["kv_cache"] else "-"
        out.append(f"| {plan['model']} | {sweep} | {where} | {plan['mesh']} | {p['program']} | {p['batch']} | "
                   f"{p['prompt_len']} + {p['max_new_tokens']} | {_gb(p['weights'])} | {kv} | {_gb(p['temp'])} | "
                   f"{_gb(p['total'])} | {_gb(p['hbm'])} | {fits} | {largest} | {step} | {whole} |")
    return out


def table(folder: str) -> str:
    head = ("| model | sweep | slice (topology) | mesh | program | batch | prompt + new | weights/chip GB | "
            "KV cache GB | XLA temp GB | total/chip GB | usable HBM GB | fits | largest batch (compiles) | "
            "projected decode step | projected sweep generation |\n"
            "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    lines = [head]
    for name in RUNS:
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                lines += rows(name, json.load(f))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/data/tpu_plans")
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--table_only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        os.makedirs(args.out, exist_ok=True)
        for name in (args.only.split(",") if args.only else RUNS):
            cmd = [sys.executable, "-m", "launch.tpu.plan", "--notable", f"--json={args.out}/{name}.json",
                   *RUNS[name].replace("SWEEPS", SWEEPS).split()]
            print(f"{name}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
