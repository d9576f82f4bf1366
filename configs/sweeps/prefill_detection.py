"""Lindsey (2026)'s prefill detection ("did you mean to say that?") on SmolLM2-135M-Instruct: the
pair's word prefilled as the assistant's answer, then "Did you mean to say that, or was it an
accident?"; injected trials add the word's concept vector on the sentence's tokens (before the
prefill), controls do not (protocol prefill_detection, protocols/data/lindsey_experiments.json).
Graded by the paper's grader prompt on a self-hosted judge (SmolLM2 itself: a weak judge, the only
one here; `--config.grader=heuristic` for the offline rules). 10 pairs, greedy (ours).
docs/experiments.md."""
from jax_introspect.experiment.protocols.experiments import all_pairs
from jax_introspect.experiment.sweep_config import SweepConfig

WORDS = tuple(w for _, w in all_pairs()[:10])


def get_config() -> SweepConfig:
    return SweepConfig(
        protocols=("prefill_detection",),
        words=WORDS,
        layers=(0.33, 0.5, 0.67),
        strengths=(4.0, 8.0, 16.0, 32.0),
        trials_per_cell=len(WORDS),
        control_trials=len(WORDS),
        temperature=0.0,
        max_new_tokens=32,
        batch_size=24,
        grader="llm:checkpoints/smollm2",
    )
