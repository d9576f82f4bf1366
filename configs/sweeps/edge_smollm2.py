"""Find the edge on SmolLM2-135M-Instruct (experiment/edge.py): per layer, the injection strength
where the heuristic grader's coherent rate falls to 50%, by bisection of [1, 65] to a bracket of
2 strength units on 8-trial probes, then the rest of 96 trials per layer over 5 strengths around it.
The dense grid it replaces (every strength 1, 3, ..., 65 at the search's per-strength count) is in
edge.json beside the result. Lindsey's prompt and vectors, the quickstart's words and layers; the
readout is off (it does not change the search)."""
from jax_introspect.experiment.sweep_config import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        words=("Dust", "Oceans", "Bread", "Snow", "Silver", "Volcanoes"),
        layers=(0.33, 0.5),
        strengths=(1.0, 65.0),
        edge_search=True,
        edge_target=0.5,
        edge_tolerance=2.0,
        edge_probe_trials=8,
        edge_budget=96,
        edge_dense_strengths=5,
        control_trials=12,
        max_new_tokens=48,
        batch_size=16,
        batches_per_call=1,
        readout=False,
    )
