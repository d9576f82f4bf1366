"""Detection + identification SFT on SmolLM2-135M-Instruct (checkpoints/smollm2), sized for 2 CPU
cores in about 30 minutes: LoRA rank 8 on wq/wv/wo of every layer, Lindsey's prompt, injections at
layer 15 of 30 (depth 0.5) with strengths drawn from [2, 8] in four windows (the protocol's,
last_token, single_token: Rivera 2025's final prompt token only, all_positions), half the
examples controls; 30 training words, 20 of Lindsey's 50 held out (split_seed 0) for evaluation
with `launch.sweep --adapter=RUN/adapter --config.words=<held-out words>` (run.json lists them)."""
from jax_introspect.experiment.training.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        heldout_fraction=0.4,
        layers=(0.5,),
        strength_range=(2.0, 8.0),
        windows=("protocol", "last_token", "single_token", "all_positions"),
        control_fraction=0.5,
        trainable="lora",
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets=("wq", "wv", "wo"),
        objective="sft",
        steps=80,
        batch_size=4,
        grad_accum=2,
        learning_rate=1e-3,
        warmup_steps=8,
        checkpoint_every=10,
    )
