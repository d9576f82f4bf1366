"""The public Llama-3.1-405B replication's canonical run (its judged file is in shared/data):
layer 84, magnitudes 5/10/12/15/18, concepts love and all_caps as unit contrast-pair vectors of its
exact sentences, norm-matched and injected at all positions, 20 trials per cell, 40 + 40 controls,
both prompts, temperature 1, top_p 1, 200 new tokens, the doubled BOS its vLLM run had, graded by
its own judge (Claude Sonnet 4.6 on its four booleans).

To inject exactly the GPU run's vectors instead of extracting them:
    --config.vector_method=files --config.vector_files=vector_love_...layer84....pt,vector_all_caps_...layer84....pt
"""
from jax_introspect.experiment.grading import REPLICATION_GRADER
from jax_introspect.experiment.sweep_config import SweepConfig

PROTOCOLS = ("replication_405b_injected_thought", "replication_405b_thinking_about")


def get_config() -> SweepConfig:
    return SweepConfig(
        protocols=PROTOCOLS,
        words=("love", "all_caps"),
        vector_method="contrast_pairs",
        layers=(84,),
        strengths=(5.0, 10.0, 12.0, 15.0, 18.0),
        trials_per_cell=20,
        cell_per_word=True,
        control_trials=40,
        max_new_tokens=200,
        double_bos=True,
        # one per protocol, so a config that adds Lindsey's protocol must name its grader too
        grader=",".join(f"{protocol}={REPLICATION_GRADER}" for protocol in PROTOCOLS),
    )
