"""Positive control for injection: does injecting a word's vector make the model talk about it?

    python -m launch.positive_control --checkpoint=checkpoints/smollm2 --layer=0.5 \
        --strengths=0,0.5,1,2,4 --positions=last,word --trials=4

For each concept vector recipe (`--positions`), asks "What are you thinking about right now?"
with the vector injected at all positions and prints the rate at which answers name the word, as
a markdown table (words x strengths); "naming" is the heuristic grader's whole-word match of the
word and its inflections.
"""
from absl import app, flags

from launch.common import load_model

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", "checkpoints/smollm2", "Checkpoint folder.")
    flags.DEFINE_list("words", ["Dust", "Oceans", "Bread", "Snow", "Milk", "Silver"], "Concept words.")
    flags.DEFINE_float("layer", 0.5, "Layer index (>= 1) or depth fraction (< 1).")
    flags.DEFINE_list("strengths", ["0", "0.5", "1", "2", "4"], "Injection strengths.")
    flags.DEFINE_list("positions", ["last", "word"], "Concept vector read positions (see vectors.py).")
    flags.DEFINE_integer("trials", 4, "Sampled answers per word and strength.")
    flags.DEFINE_integer("max_new_tokens", 32, "Answer length.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    del argv
    import numpy as np

    from jax_introspect import inject
    from jax_introspect.experiment import protocols, vectors
    from jax_introspect.experiment.grading.heuristic import names_concept
    lm = load_model(FLAGS.checkpoint)
    n = lm.config.n_layers
    layer = int(FLAGS.layer) if FLAGS.layer >= 1 else min(int(round(FLAGS.layer * n)), n - 1)
    strengths = [float(s) for s in FLAGS.strengths]
    prompt = lm.tokenizer.chat_prompt(protocols.protocol("thinking_about")["messages"])
    print(f"model {lm.config.name}, layer {layer} of {n}, {FLAGS.trials} sampled answers per cell, "
          f"temperature 1, {FLAGS.max_new_tokens} tokens; cells: answers naming the word\n")
    for position in FLAGS.positions:
        concept = vectors.concept_vectors(lm, FLAGS.words, protocols.baseline_words(), position=position)
        cells = [(w, s, t) for s in strengths for w in FLAGS.words for t in range(FLAGS.trials)]
        injection = inject.make(layer, [s for _, s, _ in cells],
                                np.stack([concept.vector(w, layer) for w, _, _ in cells]), start=protocols.ALL_POSITIONS)
        out = lm.generate([prompt] * len(cells), max_new_tokens=FLAGS.max_new_tokens, injection=injection,
                          temperature=1.0, seed=FLAGS.seed, trial_ids=[f"{w}/{s}/{t}" for w, s, t in cells])
        hit = {(w, s, t): names_concept(w, g.text) for (w, s, t), g in zip(cells, out)}
        print(f"### vectors read at the `{position}` token\n")
        print("| word | " + " | ".join(f"s={s:g}" for s in strengths) + " |")
        print("|---|" + "---|" * len(strengths))
        for w in FLAGS.words:
            row = [f"{sum(hit[(w, s, t)] for t in range(FLAGS.trials))}/{FLAGS.trials}" for s in strengths]
            print(f"| {w} | " + " | ".join(row) + " |")
        totals = [sum(hit[(w, s, t)] for w in FLAGS.words for t in range(FLAGS.trials)) for s in strengths]
        print("| **all** | " + " | ".join(f"**{k}/{len(FLAGS.words) * FLAGS.trials}**" for k in totals) + " |\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
