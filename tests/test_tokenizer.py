"""Tokenizer parity tests: every expectation comes from an independent reference implementation
(Meta's llama-models tokenizer and chat format, HF transformers), never from our own output."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may download

from pathlib import Path

import gguf
import numpy as np
import pytest

from jax_introspect import tokenizer as tk
from jax_introspect.tokenizer import Message

SAMPLE_TEXT = (
    "Trial 1: Do you detect an injected thought? If so, what is it about?\n\n"
    "I don't notice anything unusual.\n\nTrial 2: The word is \"ALL CAPS\".  Café, naïve, 日本語, 🙂🙃!\n"
    "Numbers: 3.14159, 1234567, -42, 1e-9.\n\n\n"
    "def f(x):\n    return {'a': [x ** 2 for _ in range(10)]}\t# comment\n"
    "    \n  \t trailing spaces   \n"
    "They'll say it's fine; we've seen <|eot_id|> and <|im_end|> in text too."
)

DIALOGS = [
    [Message("user", "Hello there!")],
    [
        Message("user", "Tell me about the ocean.\n"),
        Message("assistant", "  The ocean is vast.  "),
        Message("user", "Trial 1: Do you detect an injected thought?"),
    ],
]
SMOLLM2_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


# ---------------------------------------------------------------------------------------------
# Fixtures (module-scoped: each tokenizer is loaded once).


@pytest.fixture(scope="module")
def llama_model_path():
    return tk.llama3_tokenizer_model_path()


@pytest.fixture(scope="module")
def llama_ref(llama_model_path):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(Path(llama_model_path))


@pytest.fixture(scope="module")
def llama_ours(llama_model_path):
    return tk.from_tiktoken_model(llama_model_path)


@pytest.fixture(scope="module")
def smol_path():
    return tk.smollm2_gguf_path()


@pytest.fixture(scope="module")
def smol_hf(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smol_path), gguf_file=os.path.basename(smol_path))


@pytest.fixture(scope="module")
def smol_ours(smol_path):
    return tk.from_gguf(smol_path)


def meta_ids(ref, text):
    return ref.encode(text, bos=False, eos=False, allowed_special="all")


def as_dicts(dialog):
    return [{"role": m.role, "content": m.content} for m in dialog]


# ---------------------------------------------------------------------------------------------
# Llama-3 via tiktoken, against Meta's tokenizer.


def test_llama3_ids_match_meta(llama_ours, llama_ref):
    assert llama_ours.encode(SAMPLE_TEXT) == meta_ids(llama_ref, SAMPLE_TEXT)
    assert llama_ours.vocab_size == llama_ref.n_words == 128256


def test_llama3_decode_round_trip(llama_ours, llama_ref):
    ids = meta_ids(llama_ref, SAMPLE_TEXT)
    assert llama_ours.decode(ids) == SAMPLE_TEXT
    assert llama_ours.decode(np.asarray(ids)) == llama_ref.decode(ids)


def test_llama3_special_tokens_match_meta(llama_ours, llama_ref):
    for name, ref_id in llama_ref.special_tokens.items():
        assert llama_ours.token_to_id(name) == ref_id, name
        assert llama_ours.decode([ref_id]) == name
    names = [name for name, i in llama_ref.special_tokens.items() if 128000 <= i <= 128009]
    assert [llama_ours.encode(n) for n in names] == [[llama_ref.special_tokens[n]] for n in names]
    assert llama_ours.bos_id == llama_ref.bos_id
    assert set(llama_ours.eos_ids) == set(llama_ref.stop_tokens)
    assert llama_ours.pad_id == llama_ref.pad_id


def _meta_dialog_ids(ref, dialog):
    # llama_models' ChatFormat imports pillow, which the test extras install.
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    # ChatFormat writes contents verbatim while the HF template trims them: trim here, except the
    # system message, which the tests pass exactly as the template would render it.
    messages = [RawMessage(role=m.role, content=m.content if m.role == "system" else m.content.strip()) for m in dialog]
    return ChatFormat(ref).encode_dialog_prompt(messages).tokens


@pytest.mark.parametrize("dialog", DIALOGS)
def test_llama3_chat_with_default_system_header_matches_meta(llama_ours, llama_ref, dialog):
    # Meta's ChatFormat writes no date lines itself; given them as the system message, it must
    # produce exactly what the official HF template writes by default.
    with_system = [Message("system", "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")]
    expected = _meta_dialog_ids(llama_ref, with_system + dialog)
    assert llama_ours.encode_chat(dialog, system_header=True) == expected
    assert llama_ours.encode_chat(as_dicts(dialog)) == expected


@pytest.mark.parametrize("dialog", DIALOGS)
def test_llama3_chat_without_system_header_matches_meta(llama_ours, llama_ref, dialog):
    assert llama_ours.encode_chat(dialog, system_header=False) == _meta_dialog_ids(llama_ref, dialog)


def test_llama3_explicit_system_message_matches_meta(llama_ours, llama_ref):
    dialog = [Message("system", "You are a helpful assistant"), Message("user", "Who are you?")]
    assert llama_ours.encode_chat(dialog, system_header=False) == _meta_dialog_ids(llama_ref, dialog)
    dated = [Message("system", tk.LLAMA3_DATE_HEADER + "You are a helpful assistant"), dialog[1]]
    assert llama_ours.encode_chat(dialog, system_header=True) == _meta_dialog_ids(llama_ref, dated)


def test_llama3_chat_text_matches_prompt_format_doc(llama_ours):
    # The literal example in Meta's llama3_1/prompt_format.md.
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnswer who are you in the form of jeopardy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    dialog = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Answer who are you in the form of jeopardy?"},
    ]
    assert llama_ours.chat_prompt(dialog, system_header=False) == expected


def test_llama3_save_load_round_trip(llama_ours, llama_ref, tmp_path):
    llama_ours.save(str(tmp_path))
    loaded = tk.load_tokenizer(str(tmp_path))
    assert loaded.encode(SAMPLE_TEXT) == meta_ids(llama_ref, SAMPLE_TEXT)
    assert (loaded.kind, loaded.bos_id, loaded.pad_id) == ("llama3", llama_ref.bos_id, llama_ref.pad_id)
    assert set(loaded.eos_ids) == set(llama_ref.stop_tokens)


# ---------------------------------------------------------------------------------------------
# Llama-3 via an HF tokenizer.json built by transformers from the same ranks.


@pytest.fixture(scope="module")
def llama_hf_json(llama_model_path, llama_ref, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=llama_model_path, pattern=llama_ref.pat_str).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend)
    # add_tokens keeps the id order; additional_special_tokens gave wrong ids.
    hf.add_tokens(sorted(llama_ref.special_tokens, key=llama_ref.special_tokens.get), special_tokens=True)
    directory = tmp_path_factory.mktemp("llama_hf")
    hf.backend_tokenizer.save(str(directory / "tokenizer.json"))
    return str(directory / "tokenizer.json")


def test_llama3_hf_json_ids_match_meta(llama_hf_json, llama_ref):
    ours = tk.from_hf_json(llama_hf_json)
    assert ours.kind == "llama3"
    assert ours.encode(SAMPLE_TEXT) == meta_ids(llama_ref, SAMPLE_TEXT)
    assert ours.encode_chat(DIALOGS[1], system_header=False) == _meta_dialog_ids(llama_ref, DIALOGS[1])
    assert (ours.vocab_size, ours.bos_id, ours.pad_id) == (128256, llama_ref.bos_id, llama_ref.pad_id)
    assert set(ours.eos_ids) == set(llama_ref.stop_tokens)
    assert ours.decode(meta_ids(llama_ref, SAMPLE_TEXT)) == SAMPLE_TEXT


# ---------------------------------------------------------------------------------------------
# SmolLM2 via GGUF, against transformers' GGUF tokenizer.


def test_smollm2_ids_match_transformers(smol_ours, smol_hf):
    assert smol_ours.encode(SAMPLE_TEXT) == smol_hf.encode(SAMPLE_TEXT, add_special_tokens=False)
    assert smol_ours.decode(smol_hf.encode(SAMPLE_TEXT, add_special_tokens=False)) == SAMPLE_TEXT
    assert smol_ours.vocab_size == len(smol_hf) == 49152


def test_smollm2_special_ids(smol_ours, smol_hf):
    im_end = smol_hf.convert_tokens_to_ids("<|im_end|>")
    assert smol_ours.kind == "chatml"
    assert im_end in smol_ours.eos_ids and smol_hf.eos_token_id in smol_ours.eos_ids
    assert smol_ours.pad_id == smol_hf.pad_token_id
    assert smol_ours.bos_id is None  # the GGUF says add_bos_token = False


@pytest.mark.parametrize("dialog", DIALOGS + [[Message("system", "Be terse."), Message("user", "Hi")]])
def test_smollm2_chat_prompt_matches_transformers(smol_ours, smol_hf, dialog):
    expected = smol_hf.apply_chat_template(as_dicts(dialog), tokenize=False, add_generation_prompt=True)
    assert smol_ours.chat_prompt(dialog) == expected
    assert smol_ours.encode_chat(dialog) == smol_hf.encode(expected, add_special_tokens=False)
    no_prompt = smol_hf.apply_chat_template(as_dicts(dialog), tokenize=False, add_generation_prompt=False)
    assert smol_ours.chat_prompt(dialog, add_generation_prompt=False) == no_prompt


def test_smollm2_system_header_false_drops_default_system(smol_ours, smol_hf):
    expected = smol_hf.apply_chat_template(as_dicts(DIALOGS[0]), tokenize=False, add_generation_prompt=True)
    assert expected.startswith(SMOLLM2_DEFAULT_SYSTEM)
    assert smol_ours.chat_prompt(DIALOGS[0], system_header=False) == expected[len(SMOLLM2_DEFAULT_SYSTEM) :]


def test_smollm2_save_load_round_trip(smol_ours, smol_hf, tmp_path):
    smol_ours.save(str(tmp_path))
    loaded = tk.load_tokenizer(str(tmp_path))
    prompt = smol_hf.apply_chat_template(as_dicts(DIALOGS[1]), tokenize=False, add_generation_prompt=True)
    for text in (SAMPLE_TEXT, prompt):
        assert loaded.encode(text) == smol_hf.encode(text, add_special_tokens=False)
    assert loaded.chat_prompt(DIALOGS[1]) == prompt
    assert (loaded.kind, loaded.bos_id, loaded.eos_ids, loaded.pad_id) == (
        "chatml",
        None,
        smol_ours.eos_ids,
        smol_hf.pad_token_id,
    )


def test_smollm2_hf_folder_saved_by_transformers(smol_hf, tmp_path):
    # The tokenizer.json + tokenizer_config.json (+ chat template) transformers writes, not ours.
    smol_hf.save_pretrained(str(tmp_path))
    ours = tk.from_hf_json(str(tmp_path / "tokenizer.json"))
    expected = smol_hf.apply_chat_template(as_dicts(DIALOGS[1]), tokenize=False, add_generation_prompt=True)
    assert ours.kind == "chatml"
    assert ours.chat_prompt(DIALOGS[1]) == expected
    assert ours.encode(SAMPLE_TEXT) == smol_hf.encode(SAMPLE_TEXT, add_special_tokens=False)
    assert smol_hf.eos_token_id in ours.eos_ids and ours.pad_id == smol_hf.pad_token_id


# ---------------------------------------------------------------------------------------------
# Offsets.


@pytest.fixture(scope="module", params=["llama3", "smollm2"])
def any_tokenizer(request, llama_ours, smol_ours):
    return llama_ours if request.param == "llama3" else smol_ours


def test_offsets_tile_the_text(any_tokenizer):
    ids, offsets = any_tokenizer.encode_with_offsets(SAMPLE_TEXT)
    assert ids == any_tokenizer.encode(SAMPLE_TEXT)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    pieces = [SAMPLE_TEXT[start:end] for start, end in zip(offsets, offsets[1:] + [len(SAMPLE_TEXT)])]
    assert "".join(pieces) == SAMPLE_TEXT


def test_anchor_inside_merged_newline_token(llama_ours, llama_ref):
    text = "I don't notice anything.\n\nTrial 1: Do you detect an injected thought?"
    ref_ids = meta_ids(llama_ref, text)
    (merged_id,) = meta_ids(llama_ref, ".\n\n")  # Meta's tokenizer merges ".\n\n" into one token
    merged_index = ref_ids.index(merged_id)
    assert llama_ref.decode([ref_ids[merged_index + 1]]) == "Trial"
    _, offsets = llama_ours.encode_with_offsets(text)
    assert tk.token_index_at_char(offsets, text.index("\n\nTrial 1")) == merged_index
    assert tk.token_index_at_char(offsets, text.index("Trial 1")) == merged_index + 1


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_missing_tokenizer_model_names_file_and_fix(tmp_path):
    missing = str(tmp_path / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="llama-models==0.3.0") as error:
        tk.from_tiktoken_model(missing)
    assert missing in str(error.value)


def test_gguf_without_tokenizer_metadata(tmp_path):
    path = str(tmp_path / "empty.gguf")
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_block_count(1)
    writer.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="no tokenizer metadata") as error:
        tk.from_gguf(path)
    assert path in str(error.value)


def test_missing_saved_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="Tokenizer.save"):
        tk.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("bad", [[{"role": "narrator", "content": "x"}], []])
def test_bad_messages_raise(any_tokenizer, bad):
    with pytest.raises(ValueError):
        any_tokenizer.chat_prompt(bad)
