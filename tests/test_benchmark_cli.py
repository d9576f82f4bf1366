"""Every benchmark's `python -m benchmarks.NAME -h` prints its usage and exits 0. argparse %-formats
help strings only when it prints them, so a bare '%' in one (benchmarks/sweep_engine.py's
--no_nnsight said "within 3% of") passes every run and breaks only the help a user asks for."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _is_argparse_script(path: pathlib.Path) -> bool:
    source = path.read_text()
    return "__main__" in source and "argparse" in source


BENCHMARKS = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py")
                    if _is_argparse_script(path))


def test_the_benchmarks_are_found():
    assert "sweep_engine" in BENCHMARKS and len(BENCHMARKS) >= 10, BENCHMARKS


@pytest.mark.parametrize("name", BENCHMARKS)
def test_help_prints_usage(name):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "-h"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
