"""The decoder is one scan over stacked layers: the traced program does not grow with depth; the
parameter pytrees hold exactly the leaves `params.py` declares."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jax_introspect import checkpoint, config, model, params, sharding


def _traced_size(cfg):
    abstract = checkpoint.abstract_params(cfg, jnp.float32)
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    valid = jax.ShapeDtypeStruct((2, 8), bool)
    cache = jax.eval_shape(lambda: model.init_cache(cfg, 2, 8, jnp.float32))
    layout = sharding.Layout.for_model(sharding.one_device_mesh(), cfg)

    def run(p, tokens, valid, cache):
        return model.forward(p, cfg, tokens, model.prompt_positions(valid), valid, cache, layout=layout)
    jaxpr = jax.make_jaxpr(run)(abstract, tokens, valid, cache)
    text = str(jaxpr)
    return len(text.splitlines()), text.count("scan[")


@pytest.mark.parametrize("preset", ["smollm2-135m", "llama-3.2-1b"])
def test_program_size_independent_of_depth(preset):
    base = config.preset(preset)
    shallow = _traced_size(dataclasses.replace(base, n_layers=2))
    deep = _traced_size(dataclasses.replace(base, n_layers=base.n_layers))
    assert shallow == deep
    assert shallow[1] == 1, "exactly one scan over the layers"


def test_param_pytrees_are_the_declared_leaves():
    assert [f.name for f in dataclasses.fields(model.LayerParams)] == [leaf.name for leaf in params.LAYER]
    assert {f.name for f in dataclasses.fields(model.Params)} == {leaf.name for leaf in params.GLOBAL} | {"layers"}
    assert all(leaf.per_layer for leaf in params.LAYER) and not any(leaf.per_layer for leaf in params.GLOBAL)


@pytest.mark.parametrize("tied", [False, True])
def test_shapes_shardings_and_hf_tensors_follow_the_table(tied):
    cfg = dataclasses.replace(config.preset("llama-3.1-8b"), tie_word_embeddings=tied)
    abstract = checkpoint.abstract_params(cfg, jnp.bfloat16)
    assert (abstract.lm_head is None) == tied
    assert abstract.layers.wq.shape == (32, 32, 4096, 128) and abstract.layers.w_down.shape == (32, 14336, 4096)
    layout = sharding.Layout.for_model(sharding.one_device_mesh(), cfg)
    shardings = layout.params(cfg)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    assert shardings.layers.wq.spec == layout.spec("layers", "heads", "embed", "head_dim")
    wo = params.by_name("wo")
    assert wo.hf_tensor(7) == "model.layers.7.self_attn.o_proj.weight" and wo.hf_shape(cfg) == (4096, 4096)
    assert params.by_name("lm_head").hf_shape(cfg) == (128256, 4096)
    assert ("lm_head" in params.unit_shapes(cfg, params.global_leaves(cfg))) == (not tied)
