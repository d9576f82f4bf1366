"""The code's structure as facts: the model side never imports the experiment side, and absl
flags are defined only by an entry point's `__main__`, never by importing a module."""
import json
import subprocess
import sys

from tests import hf_reference as ref

EXPERIMENT_SIDE = ("jax_introspect.experiment", "jax_introspect.parity")


def _python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ref.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_model_side_never_imports_the_experiment_side():
    found = _python(f"""
import importlib, json, pkgutil, sys
import jax_introspect

def walk(path, prefix):  # pkgutil.walk_packages would import the experiment package to look inside
    for m in pkgutil.iter_modules(path, prefix):
        if m.name.startswith({EXPERIMENT_SIDE!r}):
            continue
        yield m.name
        if m.ispkg:
            yield from walk([m.module_finder.path + "/" + m.name.rsplit(".", 1)[1]], m.name + ".")

names = list(walk(jax_introspect.__path__, "jax_introspect."))
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith({EXPERIMENT_SIDE!r}))
print(json.dumps({{"model_side": names, "experiment_loaded": loaded}}))
""")
    # the whole model side was imported ...
    assert {"jax_introspect.model", "jax_introspect.inject", "jax_introspect.generate", "jax_introspect.lm",
            "jax_introspect.sharding", "jax_introspect.checkpoint", "jax_introspect.config", "jax_introspect.tokenizer",
            "jax_introspect.distributed", "jax_introspect.convert.source"} <= set(found["model_side"])
    # ... and not one experiment-side module came with it
    assert found["experiment_loaded"] == []


LAUNCH_MODULES = ("launch.sweep", "launch.chat", "launch.convert", "launch.report", "launch.parity",
                  "launch.positive_control", "launch.gpu_reference", "launch.tpu.pod", "launch.common", "launch.train")


def test_importing_modules_defines_no_flags():
    found = _python(f"""
import importlib, json, pkgutil
from absl import app, flags, logging  # absl's own flags (--logtostderr, --pdb, ...) come with these
before = set(flags.FLAGS)
import jax_introspect
for m in pkgutil.walk_packages(jax_introspect.__path__, "jax_introspect."):
    importlib.import_module(m.name)
for name in {LAUNCH_MODULES!r}:
    importlib.import_module(name)
print(json.dumps(sorted(set(flags.FLAGS) - before)))
""")
    assert found == []
