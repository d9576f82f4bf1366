"""Training introspection (issue 14): data made from the project's own protocols, SFT / DPO /
bias-vector objectives on an adapter (`jax_introspect.adapters`), an optax loop with orbax
checkpoints. See docs/training.md."""
