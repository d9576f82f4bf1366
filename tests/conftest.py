"""Shared fixtures: tiny random Llama-3.1 checkpoints built with transformers, converted with
`launch.convert`. transformers/torch are the independent reference throughout."""
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# One JAX persistent compilation cache for the whole run: many tests compile the same small
# programs (a sweep's engine, extraction and judge programs on the same tiny shapes, again in each
# resumed or repeated run), and on 2 cores XLA's compiles are most of a small sweep's time (a tiny
# three-experiment sweep: 17 compiles, 36 of its 72 s). Set before JAX is imported, in the xdist
# controller, so the workers and every subprocess they start (launch.sweep, ...) inherit it. What
# the tests assert is unchanged: a cached executable is the compiled program, and the compile-count
# tests count jit's in-memory cache (`_cache_size`), which a persistent-cache hit still fills.
# Compile-only TPU executables cannot be loaded back (JAX: "PjRtCompiler must be constructed with a
# Client"): those compile afresh each time (pytest.ini ignores the warning JAX gives).
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_introspect_tests_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each, or torch and XLA oversubscribe the CPUs.
    torch.set_num_threads(1)

from tests import hf_reference  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> (hf_folder, checkpoint_folder, torch model) for each tiny variant, built lazily."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = hf_reference.build_and_convert(name, root)
        return cache[name]
    return get


# Test files by their time on CI (2 workers, 2026-12-01), longest first. launch/run_tests.sh runs
# pytest-xdist with --dist loadfile --no-loadscope-reorder: files go to the workers in collection
# order, so the longest start first and the short ones even out the end (xdist's own order, by test
# count, left the TPU compile files, few tests but minutes each, to run last on one worker).
LONGEST_FIRST = ("test_tpu_plan.py", "test_tpu_compile.py", "test_parity.py", "test_replication_vectors.py",
                 "test_reliability_sweep.py", "test_adapters.py", "test_smollm2.py", "test_sweep.py",
                 "test_lindsey_experiments.py", "test_multihost.py", "test_injection.py", "test_sharding.py",
                 "test_grading.py", "test_training.py", "test_fp8.py", "test_replication_judge.py",
                 "test_engine.py", "test_report.py", "test_model_parity.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable: files stay whole


def pytest_unconfigure(config):
    # The controller made the cache (workers inherit its path): it removes it when the run ends.
    if _OWN_COMPILATION_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
