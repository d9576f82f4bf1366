"""`detect_llama31` for a pod slice whose tensor axis exceeds Llama-3.1's 8 KV heads (e.g. the 405B
on v5p-64, mesh 1x32): the KV heads are held duplicated there, and the training loop trains no LoRA
on wk/wv then, so LoRA covers wq and wo only. Micro-batches of 4 x 8 accumulated (the same 32
examples per optimizer step): the plan found the 405B's train step at 8 rows needs 104.4 GB per v5p
chip of 102.8 usable (XLA temp 76 GB: the activations kept for the backward pass through 126
layers, which are not rematerialised). Plan it before paying (docs/training.md):

    python -m launch.tpu.plan --model=llama-3.1-405b --topology=v5p:2x4x4 --mesh=1x32 \\
        --config=configs/sweeps/lindsey2025.py --train_config=configs/train/detect_llama31_pod.py
"""
import dataclasses
import os

from jax_introspect.experiment.files import run_get_config
from jax_introspect.experiment.training.config import TrainConfig, TrainConfigError


def get_config() -> TrainConfig:
    base = run_get_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "detect_llama31.py"),
                          "configs/train", TrainConfigError)
    return dataclasses.replace(base, lora_targets=("wq", "wo"), batch_size=4, grad_accum=8)
