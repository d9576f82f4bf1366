"""Lindsey (2026)'s intentional control on SmolLM2-135M-Instruct: 'Write "{sentence}" Think about
{word} ...' vs "Don't think about {word}" and the rewarded / punished variants (protocols
intentional_*, protocols/data/lindsey_experiments.json), no injection; the cosine between the
residual stream on the written tokens and the word's concept vector at every layer
(`lindsey_experiments.measure`). 20 of the paper's 50 sentence/word pairs, the same pairs in every
condition (paired differences); greedy decoding (ours). docs/experiments.md."""
from jax_introspect.experiment.protocols.experiments import all_pairs
from jax_introspect.experiment.sweep_config import SweepConfig

WORDS = tuple(w for _, w in all_pairs()[:20])


def get_config() -> SweepConfig:
    return SweepConfig(
        protocols=("intentional_think", "intentional_dont_think", "intentional_rewarded", "intentional_punished"),
        words=WORDS,
        trials_per_cell=len(WORDS),
        control_trials=0,
        temperature=0.0,
        max_new_tokens=24,
        batch_size=20,
    )
