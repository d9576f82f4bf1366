r"""Plan a run on a Cloud TPU slice from this CPU host: compile the run's programs for the slice
(libtpu's compile-only topologies, abstract weights: none read) and print what each needs per chip.

    python -m launch.tpu.plan --model=llama-3.1-405b --topology=v5p:2x4x4 --mesh=1x32 \
        --batch=32 --prompt_len=192 --max_new_tokens=200 [--dtype=bfloat16] [--max_batch] [--json=out.json]
    python -m launch.tpu.plan --model=CHECKPOINT --topology=v6e:8x8 --mesh=1x64 \
        --config=configs/sweeps/lindsey2025.py [--config.batch_size=64] [--train_config=configs/train/X.py]

`--model`: a preset (`jax_introspect.config.PRESETS`) or a checkpoint folder (its config.json and
tokenizer). `--topology`: a compile-only TPU topology, chips per axis: 'v6e:2x2' (4 chips),
'v5p:2x4x4' (32 chips = v5p-64), 'v6e:8x8', 'v5e:16x16'. With `--config` (a sweep config, its
fields overridable with `--config.FIELD=VALUE` as in launch.sweep) the batch, max_new_tokens, the
protocols' prompt lengths, the trials, the vector extraction and a self-hosted judge come from it.
`--max_batch` finds the largest generation batch that fits, by compiling. Figures per chip; times
are roofline projections (see jax_introspect/experiment/plan.py). A progress line per compile goes
to stderr; the plan to stdout (`--table`: also markdown rows; `--json=PATH`: everything).
"""
import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
_OVERRIDES: list = []


def define_flags() -> None:
    flags.DEFINE_string("model", None, "Model preset (e.g. llama-3.1-405b) or checkpoint folder.", required=True)
    flags.DEFINE_string("topology", None, "Compile-only TPU topology, e.g. v5p:2x4x4, v6e:8x8, v5e:16x16.",
                        required=True)
    flags.DEFINE_integer("chips", None, "Use only the first N chips of the topology (a slice smaller than the "
                         "smallest topology libtpu accepts, e.g. 1 chip of v6e:2x2).")
    flags.DEFINE_string("mesh", "1x-1", "data x tensor mesh, e.g. 1x32 ('1x-1': all chips tensor-parallel).")
    flags.DEFINE_integer("batch", 32, "Generation batch (without --config).")
    flags.DEFINE_integer("prompt_len", None, "Prompt tokens after bucketing (without --config; default 192, Lindsey's "
                         "172-token prompt bucketed); with --config, only for a model without a tokenizer.")
    flags.DEFINE_integer("max_new_tokens", 100, "Generated tokens (without --config).")
    flags.DEFINE_string("dtype", "bfloat16", "Weights and KV cache dtype: bfloat16 | float32.")
    flags.DEFINE_enum("numerics", "dequantized", ["dequantized", "fp8_dynamic"], "How an FP8 checkpoint runs.")
    flags.DEFINE_string("config", None, "Sweep config (configs/sweeps/*.py): plan exactly that run; fields "
                        "overridable with --config.FIELD=VALUE.")
    flags.DEFINE_string("train_config", None, "Training config (configs/train/*.py): compile its train step too.")
    flags.DEFINE_string("judge_model", None, "Preset or checkpoint of a self-hosted judge (llm:/replication:llm: "
                        "graders) whose checkpoint is not readable here.")
    flags.DEFINE_bool("max_batch", False, "Find the largest generation batch that fits (compiles a few times).")
    flags.DEFINE_integer("batch_multiple", 1, "--max_batch: search batches that are multiples of this (and of the "
                         "mesh's data axis); e.g. 8 saves compiles of minutes each for a 405B.")
    flags.DEFINE_bool("extraction", True, "Compile the vector-extraction program.")
    flags.DEFINE_bool("table", True, "Also print the plan as markdown table rows.")
    flags.DEFINE_string("json", None, "Write the plan as JSON to this file.")


def main(argv):
    del argv
    from jax_introspect.experiment import plan as plan_lib
    sweep = None
    if FLAGS.config is not None:
        from jax_introspect.experiment import sweep_config
        try:
            sweep = sweep_config.with_overrides(sweep_config.load_config_file(FLAGS.config), _OVERRIDES)
        except ValueError as e:
            sys.exit(f"error: {e}")
        ignored = [f"--{n}" for n in ("batch", "max_new_tokens") if FLAGS[n].present]
        if ignored:
            print(f"note: {', '.join(ignored)} ignored: with --config they come from the config "
                  "(--config.batch_size=..., --config.max_new_tokens=...)", file=sys.stderr)
    elif _OVERRIDES:
        sys.exit("error: --config.FIELD overrides need --config=configs/sweeps/NAME.py")
    prompt_len = FLAGS.prompt_len if (FLAGS.prompt_len is not None or sweep is not None) else 192
    try:
        plan = plan_lib.make_plan(
            FLAGS.model, FLAGS.topology, FLAGS.mesh, batch=FLAGS.batch, prompt_len=prompt_len,
            max_new_tokens=FLAGS.max_new_tokens, dtype=FLAGS.dtype, numerics=FLAGS.numerics, sweep=sweep,
            train_config=FLAGS.train_config, max_batch=FLAGS.max_batch, judge_model=FLAGS.judge_model,
            chips=FLAGS.chips, progress=plan_lib.stderr_progress, extraction=FLAGS.extraction,
            sweep_label=FLAGS.config, batch_multiple=FLAGS.batch_multiple)
    except plan_lib.PlanError as e:
        sys.exit(f"error: {e}")
    print(plan.format_text())
    if FLAGS.table:
        print()
        print(plan.format_table())
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=2)
        print(f"plan written to {FLAGS.json}")


def parse_flags(argv):
    """absl's parser, with the sweep config's `--config.FIELD` overrides checked against its fields."""
    from launch.common import parse_config_flags
    from jax_introspect.experiment.sweep_config import FIELDS, SweepError, parse_field
    return parse_config_flags(argv, FIELDS, SweepError, parse_field, _OVERRIDES)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
