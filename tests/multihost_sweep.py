"""`python -m launch.sweep` as one process of a simulated pod, for tests/test_multihost.py.

launch/sweep.py gets its multi-host wiring from jax_introspect.distributed (the --distributed,
--coordinator_address, --num_processes, --process_id, --distributed_timeout, --host_log_dir
flags) plus a --mesh flag. While launch/sweep.py does not yet call them itself, this shim adds
exactly that wiring around its main(): join the process group before anything touches jax,
then load the checkpoint onto the mesh. Once launch/sweep.py does it, the shim adds nothing.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from jax_introspect import distributed  # noqa: E402,F401  (defines the distributed flags)
from launch import sweep  # noqa: E402

if "mesh" not in flags.FLAGS:
    flags.DEFINE_string("mesh", None, "data x tensor mesh, e.g. 2x4 (default: one device).")
FLAGS = flags.FLAGS


def main(argv):
    distributed.initialize_from_flags()  # idempotent: a no-op when launch.sweep calls it again
    import jax_introspect
    load = jax_introspect.load

    def load_on_mesh(path, dtype=None, **kw):
        kw.setdefault("mesh", FLAGS.mesh)
        return load(path, dtype=dtype, **kw)
    jax_introspect.load = load_on_mesh
    sweep.main(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=sweep.parse_flags)
