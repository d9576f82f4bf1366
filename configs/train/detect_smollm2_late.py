"""detect_smollm2 with the adapter where the injection can be read, and more concepts: SFT on
SmolLM2-135M-Instruct (checkpoints/smollm2), about 25 minutes on 2 quiet CPU cores.

What differs from configs/train/detect_smollm2.py, and why:
- LoRA (rank 8, wq/wk/wv/wo) on layers 15-29 only: the injection is added after layer 15, so the
  layers before it see the same activations in injected and control trials and an adapter there
  can only move the prior (say "yes" more or less often), not read the injection;
- windows `protocol` (what the held-out sweep evaluates) and `single_token` (Rivera 2025);
- training concepts: the 30 training words of Lindsey's 50 plus the 99 distinct words of Lindsey's
  baseline list (129 concepts, so naming has to generalise rather than pick from 30 answers); the
  held-out 20 are those of detect_smollm2 (split_seed 0 of Lindsey's 50), never in training;
- 200 optimizer steps of 8 examples (1,600 examples), lr 2e-3.
Evaluate as docs/training.md says (`launch.sweep --adapter=RUN/adapter --config.words=<held-out>`).
"""
from jax_introspect.experiment import protocols
from jax_introspect.experiment.training import data
from jax_introspect.experiment.training.config import TrainConfig

LAYER = 15  # of SmolLM2's 30: depth 0.5, the injection layer


def get_config() -> TrainConfig:
    lindsey = TrainConfig(heldout_fraction=0.4)  # detect_smollm2's split of Lindsey's 50
    train, heldout = data.split_words(lindsey)
    extra = [w for w in dict.fromkeys(protocols.baseline_words()) if w not in train + heldout]
    return TrainConfig(
        words=tuple(train + heldout + extra),
        heldout_words=tuple(heldout),
        layers=(LAYER,),
        strength_range=(2.0, 8.0),
        windows=("protocol", "single_token"),
        control_fraction=0.5,
        trainable="lora",
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets=("wq", "wk", "wv", "wo"),
        lora_layers=tuple(range(LAYER, 30)),
        objective="sft",
        steps=200,
        batch_size=4,
        grad_accum=2,
        learning_rate=2e-3,
        warmup_steps=10,
        checkpoint_every=25,
    )
