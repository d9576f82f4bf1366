"""jax_introspect: concept-injection introspection experiments on Llama-3.x in JAX/Flax."""
from jax_introspect import inject
from jax_introspect.config import ModelConfig
from jax_introspect.inject import Injection
from jax_introspect.lm import Generation, LanguageModel, load

__all__ = ["Generation", "Injection", "LanguageModel", "ModelConfig", "inject", "load"]
