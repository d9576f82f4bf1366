"""Lindsey (2026)'s sweep: 50 concept words, strengths 1/2/4/8, 50 trials per strength per layer
(one word per trial), 100 control trials, evenly spaced layers, temperature 1, 100 new tokens
(shared/research/lindsey_protocol.md section 2)."""
from configs.sweeps.base import base_config


def get_config():
    config = base_config()
    config.layers = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    return config
