"""Run the introspection experiment: vectors, injected and control trials, grading, report.

    python -m launch.sweep --config=configs/sweeps/quickstart.py --checkpoint=checkpoints/smollm2 \
        --out=results/quickstart [--config.layers=0.25,0.5 --config.strengths=2.0,4.0]

`--config` names a file whose `get_config()` returns a `SweepConfig`; `--config.FIELD=VALUE`
overrides one of its fields (`--helpfull` lists them), parsed by the field's type; list fields
(protocols, words, baseline_words, layers, strengths, vector_files) take the same forms: comma-separated
(`--config.words=Dust,Oceans`), a list literal (`--config.words="('Dust','Oceans')"`) or one
value; a repeated flag replaces the earlier one. Everything that can be checked without the
weights (the config, the graders, layers and prompt lengths against the model's config.json, vector
files against the words, layers and width, an `--adapter` folder against the model, the output folder) is checked
before they load. Re-running the same command resumes: finished trials are skipped. A results folder of another
config (or adapter) is refused; one being written by another run too.
"""
import contextlib
import os
import sys

from absl import app, flags

from jax_introspect import distributed

FLAGS = flags.FLAGS
_OVERRIDES: list = []  # [(field, text)] from the command line, in order (the last of a field wins)


def define_flags() -> None:
    from jax_introspect.experiment.sweep_config import describe_fields
    flags.DEFINE_string("config", None, "Sweep config file (configs/sweeps/*.py); its fields are overridden with "
                        "--config.FIELD=VALUE:\n" + describe_fields())
    flags.DEFINE_string("checkpoint", None, "Checkpoint folder written by launch.convert.", required=True)
    flags.DEFINE_string("out", None, "Results folder (created; resumed if it holds this config's trials).",
                        required=True)
    flags.DEFINE_string("dtype", None, "Cast parameters on load (float32 | bfloat16); default: as stored.")
    flags.DEFINE_enum("numerics", "dequantized", ["dequantized", "fp8_dynamic"],
                      "How a checkpoint converted from FP8 weights runs: dequantized (bf16/f32 weights) or "
                      "fp8_dynamic (weights as stored, inputs of each quantized linear layer rounded through "
                      "e4m3 per token, as vLLM ran the 405B replication); see docs/numerics.md.")
    flags.DEFINE_string("adapter", None, "Adapter folder (written by jax_introspect.adapters.save): LoRA / residual "
                        "bias the model runs with; the results folder is bound to its digest.")
    flags.DEFINE_bool("report", True, "Write the report when the trials are done.")
    flags.DEFINE_string("mesh", None, "Device mesh data x tensor, e.g. 1x-1 (all devices tensor-parallel) or 2x4; "
                        "default: one device.")
    distributed.define_flags()


def _plan(arms: tuple, writer: bool):
    """Check everything that needs no weights and plan the sweep (every arm): every protocol's
    grader, the checkpoint's config.json and tokenizer (layers, prompt lengths), the vector files."""
    from jax_introspect import adapters, checkpoint
    from jax_introspect.experiment import grading, sweep, sweep_config
    specs = dict.fromkeys(spec for arm in arms for spec in sweep_config.grader_specs(arm).values())
    for spec in specs:
        if writer or grading.is_self_hosted(spec):  # the graders this process will build
            grading.check_grader(spec)
    model_config = checkpoint.load_config(FLAGS.checkpoint)
    dtype = FLAGS.dtype or checkpoint.read_manifest(FLAGS.checkpoint)["dtype"]
    if dtype not in ("float32", "bfloat16"):
        raise sweep.SweepError(f"--dtype={dtype}: choose float32 or bfloat16")
    tokenizer = checkpoint.load_tokenizer(FLAGS.checkpoint)
    adapter = _read_adapter(model_config) if FLAGS.adapter else None
    plan = sweep.plan_experiment(arms, model_config, tokenizer, FLAGS.checkpoint, dtype, FLAGS.numerics,
                                 None if adapter is None else adapters.digest(adapter))
    return plan, model_config, adapter


def _read_adapter(model_config):
    """The `--adapter` folder's adapter (host arrays), checked against the model's config.json."""
    from jax_introspect import adapters
    from jax_introspect import config as config_lib
    from jax_introspect.experiment import sweep
    try:
        run_config = config_lib.with_numerics(model_config, FLAGS.numerics)
    except config_lib.ConfigError as e:
        raise sweep.SweepError(f"--numerics: {e}") from e
    try:
        adapter, _, _ = adapters.load(FLAGS.adapter, run_config)
    except adapters.AdapterError as e:
        raise sweep.SweepError(f"--adapter: {e}") from e
    return adapter


def _sweep(stack: contextlib.ExitStack) -> None:
    from jax_introspect.experiment import files, report, results, sweep, sweep_config
    from launch.common import load_model
    writer = distributed.is_primary()  # on a pod every process computes; process 0 writes
    arms = sweep_config.with_overrides(sweep_config.load_config_file(FLAGS.config), _OVERRIDES)
    plan, model_config, adapter = _plan(arms, writer)
    if writer:  # the folder is checked, locked and bound before the weights load
        results.check_output_folder(FLAGS.out, sweep.estimated_bytes(plan, model_config))
        stack.enter_context(files.FolderLock(FLAGS.out))
        results.ResultsStore(FLAGS.out, plan.binding)
    lm = load_model(FLAGS.checkpoint, dtype=FLAGS.dtype, mesh=FLAGS.mesh, numerics=FLAGS.numerics)
    if adapter is not None:
        lm = lm.with_adapter(adapter)
    summary = sweep.run_sweep(lm, arms, FLAGS.out, is_writer=writer, plan=plan)
    if writer:
        print(f"trials: {summary['trials']} ({summary['resumed_from']} already done, {summary['ran']} run now) "
              f"-> {summary['results']}")
        for edge in summary.get("edge", []):  # an edge search (edge.json)
            from jax_introspect.experiment import edge as edge_lib
            print("\n".join(edge_lib.format_lines(edge)))
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


def split_config_args(argv: list) -> tuple[list, list]:
    """(argv without the `--config.FIELD` flags, [(field, value), ...] in order)."""
    from launch.common import split_config_args as split
    from jax_introspect.experiment.sweep_config import FIELDS, SweepError
    return split(argv, FIELDS, SweepError)


def parse_flags(argv):
    """absl's parser, with the `--config.FIELD` overrides checked against the config's fields and types."""
    from launch.common import parse_config_flags
    from jax_introspect.experiment.sweep_config import FIELDS, SweepError, parse_field
    return parse_config_flags(argv, FIELDS, SweepError, parse_field, _OVERRIDES)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
