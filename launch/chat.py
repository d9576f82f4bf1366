"""Ask a converted model one question (greedy), e.g.

    python -m launch.chat --checkpoint=checkpoints/smollm2 --question="What is the capital of France?"
"""
from absl import app, flags

from launch.common import load_model

flags.DEFINE_string("checkpoint", "checkpoints/smollm2", "Checkpoint folder written by launch.convert.")
flags.DEFINE_string("question", "What is the capital of France?", "The user turn.")
flags.DEFINE_integer("max_new_tokens", 64, "Generation budget.")
flags.DEFINE_bool("system_header", True, "Use the chat template's default system block.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    lm = load_model(FLAGS.checkpoint)
    answer = lm.chat(FLAGS.question, max_new_tokens=FLAGS.max_new_tokens, system_header=FLAGS.system_header)
    print(f"Q: {FLAGS.question}\nA: {answer}")


if __name__ == "__main__":
    app.run(main)
