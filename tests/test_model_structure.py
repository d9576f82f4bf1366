"""The decoder is one scan over stacked layers: the traced program does not grow with depth."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jax_introspect import checkpoint, config, model


def _traced_size(cfg):
    params = checkpoint.abstract_params(cfg, jnp.float32)
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    valid = jax.ShapeDtypeStruct((2, 8), bool)
    cache = jax.eval_shape(lambda: model.init_cache(cfg, 2, 8, jnp.float32))

    def run(params, tokens, valid, cache):
        return model.forward(params, cfg, tokens, model.prompt_positions(valid), valid, cache)
    jaxpr = jax.make_jaxpr(run)(params, tokens, valid, cache)
    text = str(jaxpr)
    return len(text.splitlines()), text.count("scan[")


@pytest.mark.parametrize("preset", ["smollm2-135m", "llama-3.2-1b"])
def test_program_size_independent_of_depth(preset):
    base = config.preset(preset)
    shallow = _traced_size(dataclasses.replace(base, n_layers=2))
    deep = _traced_size(dataclasses.replace(base, n_layers=base.n_layers))
    assert shallow == deep
    assert shallow[1] == 1, "exactly one scan over the layers"
