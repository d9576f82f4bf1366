"""Checkpoint layout: one orbax checkpoint per unit (globals, then one per decoder layer).

    NAME/
      manifest.json        written last; a folder without it is not a checkpoint
      config.json          ModelConfig
      tokenizer/           tokenizer files (optional)
      params/globals/      orbax: embed, final_norm[, lm_head]
      params/layer_000/    orbax: attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down
      ...

Why units: a stacked `[n_layers, ...]` array of a 405B model (e.g. 220 GB of MLP weights) cannot
be assembled in host memory, while one layer (~6.4 GB in bf16) can. Conversion therefore writes
layer by layer, and loading restores each layer straight into its target sharding and copies it
into the stacked, donated device buffer. Conversion stages everything in `NAME.incomplete/`
and renames it to NAME only when complete, so an interrupted run never looks finished; re-running
the same conversion resumes from the layers already written. Replacing a checkpoint renames the
old one to `NAME.replaced/` first and deletes it only once the new one is in place, and the writer
deletes nothing that is not a checkpoint (or staging folder) of ours.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_introspect import config as config_lib
from jax_introspect import model as model_lib
from jax_introspect import params as params_lib
from jax_introspect import sharding as sharding_lib
from jax_introspect.config import ModelConfig

FORMAT = "jax_introspect.checkpoint/v2"
# v1 stored wq/wk/wv as [D, heads, hd] and w_gate/w_up as [D, F] (params.py has the v2 layouts).
OLD_FORMATS = ("jax_introspect.checkpoint/v1",)
MANIFEST = "manifest.json"
CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
GLOBALS = "globals"
STAGING_SUFFIX = ".incomplete"
REPLACED_SUFFIX = ".replaced"  # an old checkpoint, set aside by --overwrite until the new one is in place
_JOB = "conversion.json"
_SAVE_CHUNK_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be written or loaded; the message names the fix."""


def layer_unit(index: int) -> str:
    return f"layer_{index:03d}"


# --- paths: local folders or gs:// (read through etils.epath / tensorstore) ---------------------

def is_remote(path: str) -> bool:
    return "://" in str(path)


def normalize(path: str) -> str:
    """Absolute local path (orbax requires one) or the gs://... URL unchanged."""
    path = str(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts]) if is_remote(path) else os.path.join(path, *parts)


def _gpath(path: str):
    """A remote path object (etils.epath: gs:// through gcsfs; orbax reads the arrays itself
    through tensorstore's GCS driver)."""
    from etils import epath
    return epath.Path(path)


def _isdir(path: str) -> bool:
    return _gpath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def _exists(path: str) -> bool:
    return _gpath(path).exists() if is_remote(path) else os.path.exists(path)


def _read_json(path: str) -> dict:
    if is_remote(path):
        return json.loads(_gpath(path).read_text())
    with open(path) as f:
        return json.load(f)


def local_copy(folder: str) -> str:
    """A local folder with the files of `folder` (itself when local; a temporary copy of a
    gs:// folder, for readers that need real files such as tokenizers)."""
    if not is_remote(folder):
        return folder
    import tempfile
    local = tempfile.mkdtemp(prefix="jax_introspect_")
    for item in _gpath(folder).iterdir():
        if not item.is_dir():
            with open(os.path.join(local, item.name), "wb") as f:
                f.write(item.read_bytes())
    return local


# --- storage chunks aligned with tensor-parallel shards ------------------------------------------

# Chunk boundaries fall on every 1/64th of the axis the tensor mesh axis splits (heads, KV heads,
# MLP, vocab), so restoring any tensor-parallel shard of a split that divides 64 (or the axis)
# reads only that shard's own chunks; other axes are cut until a chunk is <= 16 MB.
_STORAGE_SPLITS = 64


def _smallest_factor(n: int) -> int:
    return next((p for p in range(2, int(n ** 0.5) + 1) if n % p == 0), n)


def storage_chunks(name: str, shape: tuple, itemsize: int, target_bytes: int = _SAVE_CHUNK_BYTES) -> tuple:
    """The chunk shape a unit array `name` (globals or one layer, no layer axis) is stored with."""
    axes = params_lib.by_name(name).axes
    rules = sharding_lib.AxisRules()
    chunk = list(shape)
    for i, logical in enumerate(axes):
        if i < len(shape) and rules.mesh_axis(logical) == sharding_lib.TENSOR:
            chunk[i] = shape[i] // math.gcd(shape[i], _STORAGE_SPLITS)
    while math.prod(chunk) * itemsize > target_bytes and max(chunk) > 1:
        i = max(range(len(chunk)), key=lambda j: chunk[j])
        chunk[i] //= _smallest_factor(chunk[i])
    return tuple(chunk)


def _chunked_numpy_handler(chunks_by_id: dict):
    """orbax's numpy handler, writing each array of `chunks_by_id` (keyed by id(array)) with the
    given zarr chunk shape instead of orbax's size-only choice."""
    import orbax.checkpoint as ocp

    class ChunkedNumpyHandler(ocp.type_handlers.NumpyHandler):
        async def _open_and_write(self, value, tspec, ts_context):
            chunks = chunks_by_id.get(id(value))
            metadata = tspec.get("metadata", {})
            if chunks is not None and "chunks" in metadata:  # zarr v2, orbax's default
                tspec = dict(tspec, metadata=dict(metadata, chunks=list(chunks)))
            return await super()._open_and_write(value, tspec, ts_context)
    # Orbax's handler deep-copies every array by default (needless: the arrays are ours and the
    # save is synchronous).
    return ChunkedNumpyHandler(deepcopy_host_arrays=False)


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


# --- writing: staged in NAME.incomplete, renamed into place; never deletes anything not ours -------

# Everything a checkpoint (or its staging folder) of ours holds; `params/` holds only units and
# orbax's temporary folders of units being written.
_OUR_ENTRIES = frozenset({MANIFEST, CONFIG, TOKENIZER_DIR, "params", _JOB})
_UNIT_ENTRY = re.compile(r"(globals|layer_\d{3,})(\.orbax-checkpoint-tmp.*)?$")
_LISTED_ENTRIES = 5


def _read_json_or_none(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent, unreadable or not JSON: not ours
        return None


def _foreign_entries(folder: str) -> list[str]:
    """The entries of `folder` that no checkpoint or staging folder of ours holds."""
    foreign = sorted(name for name in os.listdir(folder) if name not in _OUR_ENTRIES)
    params = os.path.join(folder, "params")
    if os.path.isdir(params):
        foreign += sorted(f"params/{name}" for name in os.listdir(params) if not _UNIT_ENTRY.match(name))
    elif os.path.lexists(params):
        foreign.append("params")
    return foreign


def _has_our_marker(folder: str) -> bool:
    """A manifest (complete checkpoint) or a job file (staging folder) written by this module."""
    return any(isinstance(data, dict) and data.get("format") in (FORMAT,) + OLD_FORMATS
               for data in (_read_json_or_none(os.path.join(folder, name)) for name in (MANIFEST, _JOB)))


def _has_our_layout(folder: str) -> bool:
    """Left half-way by a conversion of ours (e.g. an interrupted delete of an old checkpoint, or
    a staging folder of an older version): written units, or our ModelConfig."""
    params = os.path.join(folder, "params")
    if os.path.isdir(params):  # its entries are units (checked by _foreign_entries)
        return True
    config = _read_json_or_none(os.path.join(folder, CONFIG))
    try:
        return isinstance(config, dict) and ModelConfig.from_json_dict(config) is not None
    except (TypeError, ValueError):
        return False


def _describe_entries(entries: list[str]) -> str:
    shown = ", ".join(entries[:_LISTED_ENTRIES])
    return shown + (f" and {len(entries) - _LISTED_ENTRIES} more" if len(entries) > _LISTED_ENTRIES else "")


def _replaceable_error(path: str, role: str) -> Optional[str]:
    """Why the existing `path` may not be deleted to make room for a checkpoint (None: it may).
    `role` names it in the message (e.g. '--out')."""
    if os.path.islink(path) or not os.path.isdir(path):
        return (f"{role} {path} is a file or a link, not a checkpoint folder: choose another --out, "
                "or move it away")
    foreign = _foreign_entries(path)
    entries = foreign or sorted(os.listdir(path))
    if foreign or (entries and not (_has_our_marker(path) or _has_our_layout(path))):
        return (f"refusing to delete {role} {path}: it holds {_describe_entries(entries)}, which is not a "
                "jax_introspect checkpoint nor one left by an interrupted conversion (--overwrite only "
                "replaces those); choose another --out, or move those files away")
    return None


def _refuse_unless_ours(path: str, role: str) -> None:
    """`path`, when it exists, must be a folder this module may delete: empty, or a checkpoint
    (complete or left half-way) or staging folder of ours."""
    refusal = _replaceable_error(path, role) if os.path.lexists(path) else None
    if refusal is not None:
        raise CheckpointError(refusal)


def _remove_tree(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)


class CheckpointWriter:
    """Stages a checkpoint unit by unit; `finalize` makes it visible atomically.

    It deletes only folders of ours: with `overwrite`, `out` must hold a checkpoint of ours (or
    one left half-way) or be empty; anything else is refused with a `CheckpointError` naming what
    is there, before anything is written or deleted."""

    def __init__(self, out: str, job: dict, overwrite: bool = False):
        self.out = os.path.abspath(out.rstrip("/"))
        self.staging = self.out + STAGING_SUFFIX
        self.replaced = self.out + REPLACED_SUFFIX
        _refuse_unless_ours(self.out, "--out")
        if os.path.lexists(self.out) and not overwrite:
            raise CheckpointError(f"{self.out} already exists; choose another --out or pass --overwrite to replace it")
        _refuse_unless_ours(self.staging, "staging folder")
        _refuse_unless_ours(self.replaced, "set-aside folder")
        previous = self._read_job()
        if previous != job:
            # Left by a conversion of other input or options (or one whose job is unknown):
            # nothing in it can be reused.
            _remove_tree(self.staging)
        os.makedirs(os.path.join(self.staging, "params"), exist_ok=True)
        with open(os.path.join(self.staging, _JOB), "w") as f:
            json.dump({"format": FORMAT, "job": job}, f, indent=2, sort_keys=True)
        self.resumed = previous == job

    def _read_job(self) -> Optional[dict]:
        stored = _read_json_or_none(os.path.join(self.staging, _JOB))
        if isinstance(stored, dict) and stored.get("format") == FORMAT:
            return stored.get("job")
        return None

    def _unit_path(self, unit: str) -> str:
        return os.path.join(self.staging, "params", unit)

    def has_unit(self, unit: str) -> bool:
        # orbax writes into a temporary folder and renames it when committed.
        return os.path.isdir(self._unit_path(unit))

    def write_unit(self, unit: str, arrays: dict[str, np.ndarray]) -> None:
        # Orbax's defaults add ~2x the unit's bytes while saving: its numpy handler deep-copies
        # every array, and each array is one chunk that OCDBT buffers whole. Without the copy and
        # in <= 16 MB chunks and data files, saving adds ~200 MB whatever the unit's size
        # (benchmarks/conversion_memory.py). Chunks follow `storage_chunks`, so a sharded restore
        # reads only each host's own shards. Restored by a plain StandardCheckpointer.
        import orbax.checkpoint as ocp
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        chunks = {id(a): storage_chunks(name, a.shape, a.dtype.itemsize) for name, a in arrays.items()}
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, _chunked_numpy_handler(chunks)),
            (jax.Array, ocp.type_handlers.ArrayHandler()))  # unused; without it orbax warns
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
        save_args = {name: ocp.SaveArgs(chunk_byte_size=_SAVE_CHUNK_BYTES) for name in arrays}
        try:
            checkpointer.save(self._unit_path(unit), args=ocp.args.PyTreeSave(
                arrays, save_args=save_args, ocdbt_target_data_file_size=_SAVE_CHUNK_BYTES))
        except (OSError, ValueError) as e:  # tensorstore reports a full disk or a refused write as ValueError
            raise CheckpointError(
                f"could not write {unit} into {self.staging}: {e}. Free disk space (or make the folder "
                "writable) and re-run the same command: the units already written are kept") from e

    def finalize(self, cfg: ModelConfig, tokenizer, description: dict, dtype: str) -> str:
        cfg.save(os.path.join(self.staging, CONFIG))
        if tokenizer is not None:
            tokenizer.save(os.path.join(self.staging, TOKENIZER_DIR))
        units = [GLOBALS] + [layer_unit(i) for i in range(cfg.n_layers)]
        absent = [u for u in units if not self.has_unit(u)]
        if absent:
            raise CheckpointError(f"cannot finalize {self.out}: units {absent[:3]} were never written")
        manifest = {"format": FORMAT, "dtype": dtype, "units": units, "source": description,
                    "tokenizer": tokenizer is not None}
        with open(os.path.join(self.staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        # Killed at any point below, a checkpoint (old or new) survives and the same command
        # finishes the job: the old one is set aside, not deleted, until the new one is in place.
        if os.path.lexists(self.out):
            _remove_tree(self.replaced)  # an even older one, left by an interrupted replacement
            os.rename(self.out, self.replaced)
        os.rename(self.staging, self.out)
        os.remove(os.path.join(self.out, _JOB))
        _remove_tree(self.replaced)
        return self.out


def read_manifest(path: str) -> dict:
    path = normalize(path)
    if not _isdir(path):
        hint = (f" (an interrupted conversion left {path + STAGING_SUFFIX}: re-run the same "
                "`python -m launch.convert` command to finish it)") if _isdir(path + STAGING_SUFFIX) else \
            "; create it with `python -m launch.convert --source=... --out=" + path + "`"
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    manifest_path = join(path, MANIFEST)
    if not _exists(manifest_path):
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete jax_introspect checkpoint; "
                              "convert it again with `python -m launch.convert`")
    manifest = _read_json(manifest_path)
    if manifest.get("format") in OLD_FORMATS:
        raise CheckpointError(f"{path} was converted by an older jax_introspect ({manifest['format']}), whose weight "
                              f"layout this version does not read ({FORMAT}); convert it again: `python -m "
                              f"launch.convert --source=... --out={path} --overwrite`")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_config(path: str) -> ModelConfig:
    read_manifest(path)
    return ModelConfig.from_json_dict(_read_json(join(normalize(path), CONFIG)))


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None when it was converted without one (no weights are read)."""
    if not read_manifest(path).get("tokenizer"):
        return None
    from jax_introspect import tokenizer as tok_lib
    return tok_lib.load_tokenizer(local_copy(join(normalize(path), TOKENIZER_DIR)))


def _restore(path: str, targets: dict) -> dict:
    if not _isdir(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is damaged; convert it again")
    checkpointer = _checkpointer()
    # Shapes are checked against the stored metadata first: a unit of another model (or a config
    # that does not describe these weights) is named, not left to a tensorstore error.
    stored = checkpointer.metadata(path).item_metadata
    for name, target in targets.items():
        if name not in stored:
            raise CheckpointError(f"{path} has no array {name!r}: the checkpoint is damaged or of another format")
        if tuple(stored[name].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{path}/{name} is stored with shape {tuple(stored[name].shape)} but the checkpoint's config "
                f"expects {tuple(target.shape)}: these weights belong to another model; convert the model "
                "again or use its own config.json")
        if (jnp.dtype(stored[name].dtype) == params_lib.FP8) != (jnp.dtype(target.dtype) == params_lib.FP8):
            # Restoring casts: FP8 values read as float (or floats rounded to FP8) would pass silently.
            raise CheckpointError(
                f"{path}/{name} is stored as {jnp.dtype(stored[name].dtype)} but the checkpoint's config says "
                f"{'it is' if target.dtype == params_lib.FP8 else 'it is not'} an FP8 weight: the config does "
                "not describe these weights; convert the model again")
    return checkpointer.restore(path, targets)


def _abstract(cfg: ModelConfig, leaves, dtype, sharding_of: Callable[[str], jax.sharding.Sharding]) -> dict:
    """Restore targets of one unit: its arrays' stored shapes, in `dtype` (FP8 weights and their
    scales as stored), with their shardings."""
    return {leaf.name: jax.ShapeDtypeStruct(leaf.unit_shape(cfg), params_lib.stored_dtype(leaf, cfg, dtype),
                                            sharding=sharding_of(leaf.name))
            for leaf in leaves}


def load_params(path: str, cfg: ModelConfig, layout: sharding_lib.Layout, dtype=None,
                shardings: Optional[model_lib.Params] = None, numerics: str = config_lib.DEQUANTIZED) -> model_lib.Params:
    """Restore a checkpoint as `Params` in `dtype` (default: as stored), on `layout`'s mesh.

    `shardings`: a `Params` of `jax.sharding.Sharding`s (default: `layout.params`, which may span
    hosts). Each layer is restored straight into its target sharding (each host reads only the
    chunks of its own shards) and copied into the stacked buffer in place, so no host ever holds
    the whole model. The layout's KV heads are a multiple of the stored ones; each stored head is
    repeated (the plan for more tensor-parallel ways than KV heads, docs/sharding.md).
    `numerics` (`config.with_numerics`): an FP8 checkpoint's weights are kept as stored with their
    scales ('fp8_dynamic'), or multiplied by their scales into `dtype` as they are restored
    ('dequantized', on the devices, shard by shard).
    """
    path = normalize(path)  # orbax requires absolute paths
    manifest = read_manifest(path)
    dtype = jnp.dtype(dtype or manifest["dtype"])
    run_cfg = config_lib.with_numerics(layout.run_config(cfg), numerics)
    if shardings is None:
        shardings = layout.params(run_cfg)
    params_dir = join(path, "params")

    def sharding_of(tree, leaf: params_lib.Leaf, drop_layer_axis: bool):
        """The leaf's target sharding; a scale that is dequantized away has its weight's output axes."""
        target = getattr(tree, leaf.name)
        if target is None:
            return layout.sharding(*leaf.axes)
        return _drop_leading_axis(target) if drop_layer_axis else target

    global_leaves = params_lib.global_leaves(cfg)
    global_sharding = {leaf.name: sharding_of(shardings, leaf, False) for leaf in global_leaves}
    globals_ = _restore(join(params_dir, GLOBALS), _abstract(cfg, global_leaves, dtype, global_sharding.get))
    globals_ = _to_run_numerics(globals_, cfg, run_cfg, dtype, global_sharding)

    layer_shardings = shardings.layers
    layer_leaves = params_lib.layer_leaves(cfg)
    restore_sharding = {leaf.name: sharding_of(layer_shardings, leaf, True) for leaf in layer_leaves}
    expanders = {}
    if run_cfg.n_kv_heads != cfg.n_kv_heads:
        # The stored heads do not split over the tensor axis: restore wk/wv (and their scales) whole
        # on each device (one layer's, small) and repeat each head into its copies in the target sharding.
        for leaf in layer_leaves:
            if "kv_heads" in leaf.axes:
                axis = leaf.axes.index("kv_heads")
                target = restore_sharding[leaf.name]
                restore_sharding[leaf.name] = _replicate_axis(target, axis)
                expanders[leaf.name] = _expander(run_cfg.n_kv_heads // cfg.n_kv_heads, axis, target)
    stacked = _zeros_layers(run_cfg, dtype, layer_shardings)
    for index in range(cfg.n_layers):
        layer = _restore(join(params_dir, layer_unit(index)), _abstract(cfg, layer_leaves, dtype, restore_sharding.get))
        layer = _to_run_numerics(layer, cfg, run_cfg, dtype, restore_sharding)
        layer = {name: expanders[name](x) if name in expanders else x for name, x in layer.items()}
        stacked = _insert_layer(stacked, model_lib.LayerParams(**layer), jnp.int32(index))
    return model_lib.Params(layers=stacked, lm_head=globals_.pop("lm_head", None), **globals_)


def _to_run_numerics(unit: dict, cfg: ModelConfig, run_cfg: ModelConfig, dtype, sharding: dict) -> dict:
    """One restored unit as the run config holds it: FP8 weights that `run_cfg` does not run as FP8
    become weight * scale in `dtype` (with the weight's `sharding`), their scales dropped."""
    unit = dict(unit)
    for name in cfg.quantization.weights if cfg.quantization else ():
        if name in unit and not params_lib.is_quantized(name, run_cfg):
            scale = unit.pop(params_lib.scale_name(name))
            broadcast = params_lib.by_name(name).scale_shape(cfg)
            unit[name] = _dequantizer(sharding[name], jnp.dtype(dtype), broadcast)(unit[name], scale)
    return unit


@functools.lru_cache(maxsize=None)
def _dequantizer(out_sharding: jax.sharding.Sharding, dtype, broadcast: tuple):
    """FP8 weight x float32 scale [out...] (reshaped to `broadcast`: `Leaf.scale_shape`) -> `dtype`,
    what compressed-tensors' decompression computes (the product in float32, then one rounding)."""
    return jax.jit(lambda w, scale: (w.astype(jnp.float32) * scale.reshape(broadcast)).astype(dtype),
                   out_shardings=out_sharding)


def abstract_params(cfg: ModelConfig, dtype) -> model_lib.Params:
    return model_lib.params_tree(cfg, lambda leaf: jax.ShapeDtypeStruct(
        leaf.param_shape(cfg), params_lib.stored_dtype(leaf, cfg, dtype)))


def _drop_leading_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


def _replicate_axis(sharding: jax.sharding.Sharding, axis: int) -> jax.sharding.Sharding:
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = list(sharding.spec) + [None] * (axis + 1 - len(sharding.spec))
        spec[axis] = None
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return sharding


def _expander(repeats: int, axis: int, out_sharding: jax.sharding.Sharding):
    """K KV heads on `axis` (e.g. wk [D, K, hd], its scale [K, hd]) -> K * repeats, each head
    repeated in place (head j -> j // repeats)."""
    return jax.jit(lambda x: jnp.repeat(x, repeats, axis=axis), out_shardings=out_sharding)


def _zeros_layers(cfg: ModelConfig, dtype, layer_shardings: model_lib.LayerParams) -> model_lib.LayerParams:
    make = jax.jit(lambda: model_lib.LayerParams(**{
        leaf.name: jnp.zeros(leaf.param_shape(cfg), params_lib.stored_dtype(leaf, cfg, dtype))
        for leaf in params_lib.layer_leaves(cfg)}), out_shardings=layer_shardings)
    return make()


# Donating the stack lets XLA write the layer in place: peak device memory is model + one layer.
def _insert_layer_impl(stacked, layer, index):
    return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, index, 0), stacked, layer)


_insert_layer = jax.jit(_insert_layer_impl, donate_argnums=0)
