"""Lindsey (2026)'s "distinguishing thoughts from text" on SmolLM2-135M-Instruct, small enough for a
few minutes on 2 CPU cores: 10 of the paper's 50 sentence/word pairs, each sentence shown with the
concept vector of its (unrelated) word injected on the sentence's tokens only, asked "what word"
and "repeat" (protocols thoughts_vs_text_word / _repeat, protocols/data/lindsey_experiments.json).
Greedy decoding (ours: the transcription check wants the model's best answer; the paper's trials
sampled at temperature 1 elsewhere), so one trial per pair per cell. Graded without a judge
(named: heuristic identification of the word; exact: normalised exact match). docs/experiments.md."""
from jax_introspect.experiment.protocols.experiments import all_pairs
from jax_introspect.experiment.sweep_config import SweepConfig

WORDS = tuple(w for _, w in all_pairs()[:10])


def get_config() -> SweepConfig:
    return SweepConfig(
        protocols=("thoughts_vs_text_word", "thoughts_vs_text_repeat"),
        words=WORDS,
        layers=(0.2, 0.33, 0.5, 0.67),
        strengths=(2.0, 4.0, 8.0, 16.0, 32.0),
        trials_per_cell=len(WORDS),
        control_trials=len(WORDS),
        temperature=0.0,
        max_new_tokens=32,
        batch_size=24,
    )
