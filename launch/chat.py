"""Ask a converted model one question (greedy), e.g.

    python -m launch.chat --checkpoint=checkpoints/smollm2 --question="What is the capital of France?"

Bad input ends with one `error: ...` line naming the fix and a non-zero exit, never a traceback.
"""
import sys
from typing import Optional

from absl import app, flags

from launch.common import load_model

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", "checkpoints/smollm2", "Checkpoint folder written by launch.convert.")
    flags.DEFINE_string("question", "What is the capital of France?", "The user turn.")
    flags.DEFINE_integer("max_new_tokens", 64, "Generation budget.")
    flags.DEFINE_bool("system_header", True, "Use the chat template's default system block.")


def question_error(question: str) -> Optional[str]:
    """Why `question` cannot be asked (None: it can). Bytes of argv that are not UTF-8 reach
    Python as lone surrogates, which no tokenizer or terminal can encode."""
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(question[e.start]) - 0xDC00  # surrogateescape maps byte b to U+DC00 + b
        what = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else f"character {question[e.start]!r}"
        return (f"--question is not valid UTF-8 text ({what} at position {e.start}); pass the question "
                "as UTF-8 (check the terminal's encoding, e.g. LANG=C.UTF-8)")
    return None


def max_new_tokens_error(max_new_tokens: int) -> Optional[str]:
    if max_new_tokens < 1:
        return (f"--max_new_tokens={max_new_tokens}: the answer needs at least one token; "
                "pass --max_new_tokens=1 or more")
    return None


def main(argv):
    del argv
    # Checked before the model loads: a typo should not cost a load.
    problem = question_error(FLAGS.question) or max_new_tokens_error(FLAGS.max_new_tokens)
    if problem:
        sys.exit(f"error: {problem}")
    try:
        lm = load_model(FLAGS.checkpoint)
    except OSError as e:  # e.g. an unreadable checkpoint folder
        sys.exit(f"error: cannot read --checkpoint={FLAGS.checkpoint}: {e}")
    try:
        answer = lm.chat(FLAGS.question, max_new_tokens=FLAGS.max_new_tokens, system_header=FLAGS.system_header)
    except ValueError as e:  # the checkpoint has no tokenizer; the prompt + answer exceed the model's positions
        sys.exit(f"error: {e}")
    print(f"Q: {FLAGS.question}\nA: {answer}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
