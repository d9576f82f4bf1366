"""Lindsey's protocol and the 405B replication's, on the same weights, into one results folder and
one report: two arms, each with its own vectors, strengths, grader and strict definition.

- Lindsey's arm: the paper's prompt and window, mean-difference vectors of Lindsey's 50 words,
  strengths 1/2/4/8 (raw), graded offline by the heuristic (the paper's criteria; Lindsey's strict).
- The replication's arm: its canonical run (`replication_405b_canonical`): love and all_caps
  contrast vectors, norm-matched at every position, magnitudes 5-18, doubled BOS, graded by its
  own judge (all four booleans: the replication's strict).

Layers are depth fractions here (the replication's layer 84 of 126 = 0.67) so the config runs on
any Llama; override with --config.layers=... (every arm alike). Offline, grade the replication's
arm with a self-hosted judge: --config.grader=lindsey_injected_thought=heuristic,
replication_405b_injected_thought=replication:llm:CKPT,replication_405b_thinking_about=replication:llm:CKPT
"""
from configs.sweeps.lindsey2025 import get_config as lindsey
from configs.sweeps.replication_405b_canonical import get_config as replication


def get_config():
    return (lindsey().replace(layers=(0.67,)), replication().replace(layers=(0.67,)))
