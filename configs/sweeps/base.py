"""Defaults shared by every sweep config; each field is overridable from the command line,
e.g. `--config.layers=70,84 --config.strengths=1.0,2.0`."""
from ml_collections import ConfigDict

from jax_introspect.experiment import protocols


def base_config() -> ConfigDict:
    return ConfigDict({
        # Protocol names from jax_introspect/experiment/protocols/data/prompts.json. Injected trials run on
        # every protocol; control trials (no injection) too.
        "protocols": ("lindsey_injected_thought",),
        # Lindsey's 50 concepts and 100 baseline words (jax_introspect/experiment/protocols/data, with sources).
        "words": tuple(protocols.concept_words()),
        "baseline_words": tuple(protocols.baseline_words()),
        "vector_method": "mean_difference",  # mean_difference | contrast_pairs | random
        "vector_position": "last",       # mean_difference: "last" (the paper) or "word"
        "template": "Tell me about {word}",
        "layers": (0.5,),                # ints: layer indices; floats in [0, 1]: fractions of depth
        "strengths": (1.0, 2.0, 4.0, 8.0),
        "trials_per_cell": 50,           # injected trials per (protocol, layer, strength[, word]) cell
        "cell_per_word": False,          # False: words cycle through a cell's trials (the paper)
        "control_trials": 100,           # per protocol
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 100,
        "seed": 0,
        "grader": "heuristic",           # heuristic | llm:<checkpoint> | api:anthropic:<model> | api:openai:<model>
        "batch_size": 32,
        "system_header": True,           # the chat template's default system block
    })
