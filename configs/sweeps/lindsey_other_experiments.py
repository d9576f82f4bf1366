"""All three of Lindsey (2026)'s other experiments in one sweep (one results folder, one report):
the arms of thoughts_vs_text.py, prefill_detection.py and intentional_control.py, each with its
own protocols, strengths and grader (docs/experiments.md). Layers are depth fractions, so it runs
on any model; --config.FIELD=VALUE changes every arm alike."""
from configs.sweeps.intentional_control import get_config as intentional_control
from configs.sweeps.prefill_detection import get_config as prefill_detection
from configs.sweeps.thoughts_vs_text import get_config as thoughts_vs_text


def get_config():
    return (thoughts_vs_text(), prefill_detection(), intentional_control())
