"""Shared fixtures: tiny random Llama-3.1 checkpoints built with transformers, converted with
`launch.convert`. transformers/torch are the independent reference throughout."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each, or torch and XLA oversubscribe the CPUs.
    torch.set_num_threads(1)

from tests import hf_reference  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> (hf_folder, checkpoint_folder, torch model) for each tiny variant, built lazily."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = hf_reference.build_and_convert(name, root)
        return cache[name]
    return get
