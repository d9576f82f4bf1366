"""Run the introspection experiment: vectors, injected and control trials, grading, report.

    python -m launch.sweep --config=configs/sweeps/quickstart.py --checkpoint=checkpoints/smollm2 \
        --out=results/quickstart [--config.layers=0.25,0.5 --config.strengths=2.0,4.0]

Re-running the same command resumes: finished trials are skipped. A results folder of another
config is refused.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from jax_introspect import distributed  # defines --distributed, --coordinator_address, ... (pods)
from launch.common import load_model

config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/sweeps/*.py).", lock_config=True)
flags.DEFINE_string("checkpoint", None, "Checkpoint folder written by launch.convert.", required=True)
flags.DEFINE_string("out", None, "Results folder (created; resumed if it holds this config's trials).",
                    required=True)
flags.DEFINE_string("dtype", None, "Cast parameters on load (float32 | bfloat16); default: as stored.")
flags.DEFINE_bool("report", True, "Write the report when the trials are done.")
flags.DEFINE_string("mesh", None, "Device mesh data x tensor, e.g. 1x-1 (all devices tensor-parallel) or 2x4; "
                    "default: one device.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.config is None:
        sys.exit("error: --config=configs/sweeps/NAME.py is required")
    try:  # join the pod's process group before anything else touches jax
        distributed.initialize_from_flags()
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    from jax_introspect import report, sweep
    writer = distributed.is_primary()  # on a pod every process computes; process 0 writes
    config = sweep.config_to_dict(FLAGS.config)
    try:
        sweep.validate_config(config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    lm = load_model(FLAGS.checkpoint, dtype=FLAGS.dtype, mesh=FLAGS.mesh)
    try:
        summary = sweep.run_sweep(lm, config, FLAGS.out, is_writer=writer)
    except (ValueError, FileNotFoundError) as e:  # SweepError, CheckpointError, ResultsError, ...
        sys.exit(f"error: {e}")
    if writer:
        print(f"trials: {summary['trials']} ({summary['resumed_from']} already done, {summary['ran']} run now) "
              f"-> {summary['results']}")
        if FLAGS.report:
            path = report.write_report(report.load_run(FLAGS.out), os.path.join(FLAGS.out, "report"))
            print(f"report: {path}")


def parse_flags(argv):
    """absl's parser, with a one-line error for an unknown `--config.FIELD` instead of a traceback."""
    from jax_introspect.sweep import CONFIG_FIELDS
    for arg in argv[1:]:
        if arg.startswith("--config."):
            field = arg[len("--config."):].split("=", 1)[0].split(".", 1)[0]
            if field not in CONFIG_FIELDS:
                sys.exit(f"error: unknown config field {field!r} in {arg!r}; fields: {', '.join(CONFIG_FIELDS)}")
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
