"""Detection + identification training for Llama-3.1-8B/70B/405B-Instruct on a TPU pod (not run
here: a plausible starting point, sized after Rivera 2025, arXiv 2511.21399, LoRA on injected
trials: held-out detection 1.2% -> 95%, identification 0.4% -> 85%).

    python -m launch.train --config=configs/train/detect_llama31.py --checkpoint=gs://BUCKET/llama-3.1-70b \
        --out=runs/detect_llama31_70b --mesh=1x-1 [--config.objective=dpo --config.learning_rate=5e-6]

- Lindsey's prompt, injections at two thirds of depth (Lindsey's best layer region; 405B: layer 84
  of 126 is the replication's), strengths uniform in [1, 8] (Lindsey's sweep range), all four
  windows (single_token is Rivera's), half the examples controls; 30 training words, Lindsey's other 20 held out.
- LoRA rank 16 on wq/wk/wv/wo of every layer (peft's alpha = 2 * rank). On a mesh whose tensor
  axis exceeds the 8 KV heads, drop wk/wv from lora_targets (the loop refuses them there).
- 400 optimizer steps of 32 examples (8 per micro-batch x 4 accumulated): 12,800 examples.
  batch_size must split over the mesh's data axis (DPO: 2 x batch_size rows).
- For DPO (Macar et al. 2026, arXiv 2603.21396: DPO elicits detection where SFT does not) use
  --config.objective=dpo --config.learning_rate=5e-6 --config.dpo_beta=0.1; for their bias-vector
  variant --config.trainable=bias (bias at the injection layer; lr ~1e-3).
"""
from jax_introspect.experiment.training.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        heldout_fraction=0.4,
        layers=(0.67,),
        strength_range=(1.0, 8.0),
        windows=("protocol", "single_token", "last_token", "all_positions"),
        control_fraction=0.5,
        trainable="lora",
        lora_rank=16,
        lora_alpha=32.0,
        lora_targets=("wq", "wk", "wv", "wo"),
        objective="sft",
        steps=400,
        batch_size=8,
        grad_accum=4,
        learning_rate=1e-4,
        warmup_steps=20,
        checkpoint_every=50,
        keep_checkpoints=3,
    )
