"""The public Llama-3.1-405B replication's canonical run (its judged file is in shared/data):
layer 84, magnitudes 5/10/12/15/18, concepts love and all_caps as unit contrast-pair vectors,
norm-matched and injected at all positions, 20 trials per cell, 40 + 40 controls, both prompts,
temperature 1, top_p 1, 200 new tokens."""
from configs.sweeps.base import base_config


def get_config():
    config = base_config()
    config.protocols = ("replication_405b_injected_thought", "replication_405b_thinking_about")
    config.words = ("love", "all_caps")
    config.vector_method = "contrast_pairs"
    config.layers = (84,)
    config.strengths = (5.0, 10.0, 12.0, 15.0, 18.0)
    config.trials_per_cell = 20
    config.cell_per_word = True
    config.control_trials = 40
    config.max_new_tokens = 200
    return config
