"""Lindsey (2026)'s sweep: 50 concept words, strengths 1/2/4/8, 50 trials per strength per layer
(one word per trial), 100 control trials, evenly spaced layers, temperature 1, 100 new tokens
(shared/research/lindsey_protocol.md section 2). Every other field: `SweepConfig`'s defaults."""
from jax_introspect.experiment.sweep_config import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(layers=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
