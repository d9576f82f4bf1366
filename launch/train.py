"""Train introspection into an adapter (LoRA and/or a residual bias) on injected trials.

    python -m launch.train --config=configs/train/detect_smollm2.py --checkpoint=checkpoints/smollm2 \
        --out=runs/NAME [--config.steps=50 --config.objective=dpo] [--mesh=2x1]

`--config` names a file whose `get_config()` returns a `TrainConfig`
(jax_introspect/experiment/training/config.py); `--config.FIELD=VALUE` overrides a field, parsed by
its type (tuple fields: comma-separated or a Python literal). The config, the data plan (layers,
prompt lengths against config.json and the tokenizer), the adapter spec and the output folder are
checked before the weights load. Re-running the same command resumes from the latest checkpoint
in `--out` (the same loss curve as an uninterrupted run). See docs/training.md.
"""
import sys

from absl import app, flags

FLAGS = flags.FLAGS
_OVERRIDES: list = []


def define_flags() -> None:
    from jax_introspect.experiment.training.config import describe_fields
    flags.DEFINE_string("config", None, "Training config file (configs/train/*.py); fields are overridden with "
                        "--config.FIELD=VALUE:\n" + describe_fields())
    flags.DEFINE_string("checkpoint", None, "Base model checkpoint folder written by launch.convert.", required=True)
    flags.DEFINE_string("out", None, "Run folder (created; resumed if it holds this config's run).", required=True)
    flags.DEFINE_string("dtype", None, "Cast parameters on load (float32 | bfloat16); default: as stored.")
    flags.DEFINE_string("mesh", None, "Device mesh data x tensor, e.g. 2x1 (data-parallel) or 1x8; default: one "
                        "device.")
    flags.DEFINE_bool("progress", True, "tqdm progress bar.")


def _train() -> None:
    from jax_introspect import checkpoint
    from jax_introspect.experiment.training import config as config_lib
    from jax_introspect.experiment.training import loop
    from launch.common import load_model
    config = config_lib.with_overrides(config_lib.load_config_file(FLAGS.config), _OVERRIDES)
    model_config = checkpoint.load_config(FLAGS.checkpoint)
    tokenizer = checkpoint.load_tokenizer(FLAGS.checkpoint)
    plan = loop.check_before_load(config, FLAGS.checkpoint, FLAGS.out, model_config, tokenizer)
    print(f"training words ({len(plan.train_words)}): {', '.join(plan.train_words)}")
    print(f"held-out words ({len(plan.heldout_words)}): {', '.join(plan.heldout_words)}")
    lm = load_model(FLAGS.checkpoint, dtype=FLAGS.dtype, mesh=FLAGS.mesh)
    summary = loop.train(lm, config, FLAGS.out, checkpoint=FLAGS.checkpoint, plan=plan, progress=FLAGS.progress)
    print(f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} over {summary['steps']} steps; "
          f"adapter: {FLAGS.out}/adapter; curve: {summary['loss_png']}")


def main(argv):
    del argv
    if FLAGS.config is None:
        sys.exit("error: --config=configs/train/NAME.py is required")
    try:
        _train()
    except (ValueError, FileNotFoundError) as e:  # TrainConfigError, TrainError, DataError, AdapterError, ...
        sys.exit(f"error: {e}")


def split_config_args(argv: list) -> tuple[list, list]:
    """(argv without the `--config.FIELD` flags, [(field, value), ...] in order)."""
    from launch.common import split_config_args as split
    from jax_introspect.experiment.training.config import FIELDS, TrainConfigError
    return split(argv, FIELDS, TrainConfigError)


def parse_flags(argv):
    """absl's parser, with the `--config.FIELD` overrides checked against the config's fields and types."""
    from launch.common import parse_config_flags
    from jax_introspect.experiment.training.config import FIELDS, TrainConfigError, parse_field
    return parse_config_flags(argv, FIELDS, TrainConfigError, parse_field, _OVERRIDES)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
