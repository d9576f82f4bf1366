"""HF model folders: config.json + safetensors (one file, or shards with their index json).

Only headers are read up front; each tensor is read when the writer asks for it, so peak memory
follows the largest tensor, not the model.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jax_introspect import config as config_lib
from jax_introspect.convert.source import ConversionError, Source, SourceTensor

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "original/tokenizer.model", "tokenizer.model")


def _shard_files(folder: str) -> list[str]:
    index_path = os.path.join(folder, _INDEX)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index_path} is not a valid safetensors index ({e}); re-download it") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        if missing:
            raise ConversionError(
                f"{folder}: shard(s) {missing} listed in {_INDEX} are missing; "
                "download the complete model folder (all model-*-of-*.safetensors files)")
        return [os.path.join(folder, f) for f in files]
    single = os.path.join(folder, _SINGLE)
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if found:
        raise ConversionError(f"{folder}: safetensors files {found[:3]} but no {_INDEX}; "
                              "a sharded checkpoint needs its index json")
    raise ConversionError(f"{folder}: no {_SINGLE} or {_INDEX}; is this an HF Llama model folder?")


def _read_header(path: str) -> tuple[dict, int]:
    """The safetensors JSON header and where the data starts, checked against the file size
    (catches truncation before anything is written)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path} is truncated ({size} bytes); re-download it")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise ConversionError(f"{path} is truncated or not a safetensors file (header of "
                                  f"{header_len} bytes in a {size}-byte file); re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path} has a corrupt header ({e}); re-download it") from e
    header.pop("__metadata__", None)
    data_end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise ConversionError(f"{path} is truncated: its header describes {8 + header_len + data_end} "
                              f"bytes but the file has {size}; re-download it")
    return header, 8 + header_len


_DTYPES = {"F32": np.float32, "BF16": np.dtype("bfloat16"), "F16": np.float16,
           "F8_E4M3": np.dtype("float8_e4m3fn")}  # compressed-tensors FP8 weights


def _loader(path: str, name: str, info: dict, data_start: int):
    """Read one tensor with a plain seek + read: no mmap stays behind to inflate RSS, and
    bfloat16 works (safetensors' numpy reader rejects it)."""
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ConversionError(f"{path}: tensor {name} has dtype {info['dtype']}; "
                              f"only {sorted(_DTYPES)} are supported")
    begin, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    if (end - begin) != count * np.dtype(dtype).itemsize:
        raise ConversionError(f"{path}: tensor {name} spans {end - begin} bytes, which does not fit "
                              f"shape {info['shape']} {info['dtype']}; the file is corrupt — re-download it")

    def load() -> np.ndarray:
        array = np.empty(info["shape"], dtype=dtype)
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
                raise ConversionError(f"{path} ended inside tensor {name}; re-download it")
        return array.astype(np.float32) if dtype == np.float16 else array
    return load


def _loaded_dtype(safetensors_dtype: str) -> np.dtype:
    """The dtype `_loader` returns a tensor in (F16 is widened to float32); unknown dtypes are
    refused by `_loader` itself."""
    dtype = np.dtype(_DTYPES.get(safetensors_dtype, np.float32))
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def find_tokenizer(folder: str):
    from jax_introspect import tokenizer as tok_lib
    for rel in _TOKENIZER_FILES:
        path = os.path.join(folder, rel)
        if os.path.exists(path):
            return tok_lib.from_hf_json(path) if rel.endswith(".json") else tok_lib.from_tiktoken_model(path)
    return None


def open_folder(folder: str) -> Source:
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder} is not a folder; pass an HF model folder, a .gguf file or 'smollm2'")
    cfg = config_lib.from_hf_config_file(folder)
    tensors: dict[str, SourceTensor] = {}
    files = _shard_files(folder)
    for path in files:
        header, data_start = _read_header(path)
        for name, info in header.items():
            if name in tensors:
                raise ConversionError(f"tensor {name} appears in both {tensors[name].file} and {path}")
            tensors[name] = SourceTensor(name=name, file=path, shape=tuple(info["shape"]),
                                         load=_loader(path, name, info, data_start),
                                         dtype=_loaded_dtype(info["dtype"]))
    description = {"format": "hf-safetensors", "path": os.path.abspath(folder),
                   "files": [os.path.basename(p) for p in files],
                   "bytes": sum(os.path.getsize(p) for p in files)}
    return Source(config=cfg, tensors=tensors, description=description, tokenizer=find_tokenizer(folder))
