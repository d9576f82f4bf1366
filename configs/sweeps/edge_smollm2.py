"""Find the edge on SmolLM2-135M-Instruct (experiment/edge.py): per layer, the injection strength
where the heuristic grader's coherent rate falls to 50%, by bisection of [1, 40] to a bracket of
2 strength units on 16-trial probes, then the rest of 192 trials per layer over 5 strengths around
it. The dense grid it replaces (every strength 1, 3, ..., 39 at the search's most-sampled count) is
in edge.json beside the result. Lindsey's prompt and vectors, the quickstart's words and layers;
the readout is off (it does not change the search).

Why 40: the heuristic grader calls near-empty output (whitespace, a few stray tokens: fewer than 12
words, below every degeneracy rule) coherent, and SmolLM2's answers turn into that above strength
~40 at these layers, so its coherent rate rises again there (a grid of 8 trials per cell, layer 10:
8/8 at 4-16, 6/8 at 24, 4/8 at 32, 5/8 at 48, 5/8 at 65; layer 15: 7/8 at 4-12, 3/8 at 16 and 24,
0/8 at 32, 6/8 at 48, 4/8 at 65). Bisection needs a monotone curve: the range stays below it."""
from jax_introspect.experiment.sweep_config import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        words=("Dust", "Oceans", "Bread", "Snow", "Silver", "Volcanoes"),
        layers=(0.33, 0.5),
        strengths=(1.0, 40.0),
        edge_search=True,
        edge_target=0.5,
        edge_tolerance=2.0,
        edge_probe_trials=16,
        edge_budget=192,
        edge_dense_strengths=5,
        control_trials=12,
        max_new_tokens=48,
        batch_size=32,
        batches_per_call=1,
        readout=False,
    )
