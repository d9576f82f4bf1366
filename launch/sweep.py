"""Run the introspection experiment: vectors, injected and control trials, grading, report.

    python -m launch.sweep --config=configs/sweeps/quickstart.py --checkpoint=checkpoints/smollm2 \
        --out=results/quickstart [--config.layers=0.25,0.5 --config.strengths=2.0,4.0]

List fields (protocols, words, baseline_words, layers, strengths) take the same forms:
comma-separated (`--config.words=Dust,Oceans`), a list literal (`--config.words="('Dust','Oceans')"`)
or one value; a repeated flag replaces the earlier one. Everything that can be checked without the
weights (the config, the grader, layers and prompt lengths against the model's config.json, the
output folder) is checked before they load. Re-running the same command resumes: finished trials
are skipped. A results folder of another config is refused; one being written by another run too.
"""
import contextlib
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from jax_introspect import distributed  # defines --distributed, --coordinator_address, ... (pods)

config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/sweeps/*.py).", lock_config=True)
flags.DEFINE_string("checkpoint", None, "Checkpoint folder written by launch.convert.", required=True)
flags.DEFINE_string("out", None, "Results folder (created; resumed if it holds this config's trials).",
                    required=True)
flags.DEFINE_string("dtype", None, "Cast parameters on load (float32 | bfloat16); default: as stored.")
flags.DEFINE_bool("report", True, "Write the report when the trials are done.")
flags.DEFINE_string("mesh", None, "Device mesh data x tensor, e.g. 1x-1 (all devices tensor-parallel) or 2x4; "
                    "default: one device.")
FLAGS = flags.FLAGS

_LIST_OVERRIDES: dict = {}  # list field -> its value from the command line (the last flag wins)


def _plan(config: dict, writer: bool):
    """Check everything that needs no weights and plan the sweep: the config, the grader, the
    checkpoint's config.json and tokenizer (layers, prompt lengths)."""
    from jax_introspect import checkpoint
    from jax_introspect.experiment import grading, sweep
    sweep.validate_config(config)
    if writer or grading.parse_spec(config["grader"])[0] == "llm":
        grading.check_grader(config["grader"])
    model_config = checkpoint.load_config(FLAGS.checkpoint)
    dtype = FLAGS.dtype or checkpoint.read_manifest(FLAGS.checkpoint)["dtype"]
    if dtype not in ("float32", "bfloat16"):
        raise sweep.SweepError(f"--dtype={dtype}: choose float32 or bfloat16")
    tokenizer = checkpoint.load_tokenizer(FLAGS.checkpoint)
    return sweep.plan_sweep(config, model_config, tokenizer, FLAGS.checkpoint, dtype), model_config


def _sweep(stack: contextlib.ExitStack) -> None:
    from jax_introspect.experiment import files, report, results, sweep
    from launch.common import load_model
    writer = distributed.is_primary()  # on a pod every process computes; process 0 writes
    config = sweep.config_to_dict(FLAGS.config)
    config.update(_LIST_OVERRIDES)
    plan, model_config = _plan(config, writer)
    if writer:  # the folder is checked, locked and bound before the weights load
        results.check_output_folder(FLAGS.out, sweep.estimated_bytes(plan, model_config))
        stack.enter_context(files.FolderLock(FLAGS.out))
        results.ResultsStore(FLAGS.out, plan.binding)
    lm = load_model(FLAGS.checkpoint, dtype=FLAGS.dtype, mesh=FLAGS.mesh)
    summary = sweep.run_sweep(lm, config, FLAGS.out, is_writer=writer, plan=plan)
    if writer:
        print(f"trials: {summary['trials']} ({summary['resumed_from']} already done, {summary['ran']} run now) "
              f"-> {summary['results']}")
        if FLAGS.report:
            path = report.write_report(report.load_run(FLAGS.out), os.path.join(FLAGS.out, "report"))
            for warning in report.read_warnings(path):
                print(f"warning: {warning}", file=sys.stderr)
            print(f"report: {path}")


def main(argv):
    del argv
    if FLAGS.config is None:
        sys.exit("error: --config=configs/sweeps/NAME.py is required")
    try:  # join the pod's process group before anything else touches jax
        distributed.initialize_from_flags()
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    from jax_introspect.experiment import files, grading
    try:
        with contextlib.ExitStack() as stack:
            _sweep(stack)
    # ValueError: SweepError, ConfigError, CheckpointError, ResultsError, ReportError, ...
    except (ValueError, FileNotFoundError, grading.GradingError, files.FolderBusyError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a disk that fills up or goes read-only mid-run: finished trials are on disk
        sys.exit(f"error: {e}; the trials finished so far are saved in {FLAGS.out}: free the disk and re-run the "
                 "same command to continue")


def _split_config_args(argv: list) -> tuple[list, list]:
    """(argv without the list fields' `--config.FIELD` flags, [(field, value), ...] in order).
    Both `--config.FIELD=VALUE` and `--config.FIELD VALUE` are understood."""
    from jax_introspect.experiment.sweep import CONFIG_FIELDS, LIST_FIELDS
    kept, lists, i = [argv[0]], [], 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            kept += argv[i:]
            break
        if arg.startswith("--config."):
            name, has_value, value = arg[len("--config."):].partition("=")
            field = name.split(".", 1)[0]
            if field not in CONFIG_FIELDS:
                sys.exit(f"error: unknown config field {field!r} in {arg!r}; fields: {', '.join(CONFIG_FIELDS)}")
            if field in LIST_FIELDS:
                if not has_value:
                    if i + 1 >= len(argv):
                        sys.exit(f"error: {arg} needs a value, e.g. {arg}=a,b")
                    i, value = i + 1, argv[i + 1]
                lists.append((field, value))
                i += 1
                continue
        kept.append(arg)
        i += 1
    return kept, lists


def parse_flags(argv):
    """absl's parser, with one-line errors instead of tracebacks, and the list fields parsed here:
    ml_collections would read `--config.words=Dust,Oceans` as one word and append repeated flags."""
    from jax_introspect.experiment import sweep
    argv, lists = _split_config_args(list(argv))
    try:
        for field, value in lists:
            _LIST_OVERRIDES[field] = list(sweep.parse_list(field, value))
    except sweep.SweepError as e:
        sys.exit(f"error: {e}")
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
