"""The replication's follow-up: layers 70/84/90/100, magnitudes 10 to 12 in steps of 0.5,
Lindsey's prompt only, 40 controls at each layer as it ran them (160; strict 0/800 and false
positives 0/160 on GPUs). Everything else as the canonical run."""
from configs.sweeps.replication_405b_canonical import get_config as canonical
from jax_introspect.experiment.sweep_config import SweepConfig


def get_config() -> SweepConfig:
    return canonical().replace(
        protocols=("replication_405b_injected_thought",),
        layers=(70, 84, 90, 100),
        strengths=(10.0, 10.5, 11.0, 11.5, 12.0),
        controls_per_layer=True,
    )
