"""The public Llama-3.1-405B replication's canonical run (its judged file is in shared/data):
layer 84, magnitudes 5/10/12/15/18, concepts love and all_caps as unit contrast-pair vectors,
norm-matched and injected at all positions, 20 trials per cell, 40 + 40 controls, both prompts,
temperature 1, top_p 1, 200 new tokens."""
from jax_introspect.experiment.sweep_config import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        protocols=("replication_405b_injected_thought", "replication_405b_thinking_about"),
        words=("love", "all_caps"),
        vector_method="contrast_pairs",
        layers=(84,),
        strengths=(5.0, 10.0, 12.0, 15.0, 18.0),
        trials_per_cell=20,
        cell_per_word=True,
        control_trials=40,
        max_new_tokens=200,
    )
