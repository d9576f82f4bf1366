"""A real, small run on SmolLM2-135M-Instruct in a few minutes on 2 CPU cores: Lindsey's prompt
and vectors, 6 words, two layers, three strengths, short answers, the offline heuristic grader."""
from configs.sweeps.base import base_config


def get_config():
    config = base_config()
    config.words = ("Dust", "Oceans", "Bread", "Snow", "Silver", "Volcanoes")
    config.layers = (0.33, 0.5)
    config.strengths = (2.0, 4.0, 8.0)
    config.trials_per_cell = 6
    config.control_trials = 12
    config.max_new_tokens = 48
    config.batch_size = 24
    return config
