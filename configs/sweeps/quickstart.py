"""A real, small run on SmolLM2-135M-Instruct in a few minutes on 2 CPU cores: Lindsey's prompt
and vectors, 6 words, two layers, three strengths, short answers, the offline heuristic grader."""
from jax_introspect.experiment.sweep_config import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        words=("Dust", "Oceans", "Bread", "Snow", "Silver", "Volcanoes"),
        layers=(0.33, 0.5),
        strengths=(2.0, 4.0, 8.0),
        trials_per_cell=6,
        control_trials=12,
        max_new_tokens=48,
        batch_size=24,
    )
