"""Issue 11, "nothing lost, nothing silently wrong", on the model side:

1. `launch.convert --overwrite` replaces only a checkpoint of ours (never a results folder or a
   file), deletes only staging folders of ours, and a kill while replacing keeps a checkpoint.
2. A config.json whose `rope_scaling` and `rope_parameters` contradict each other is refused;
   agreeing ones convert and match HF transformers.
3. A missing `max_position_embeddings` (or GGUF context length) follows transformers' default,
   and a prompt past the model's positions is refused before any compute.
4. `launch.chat` / `launch.convert` on bad input: one `error:` line naming the fix, a non-zero
   exit and no traceback.

HF transformers (LlamaConfig, LlamaForCausalLM) is the independent reference. The failing CLI runs
are ~2 s subprocesses each (mostly imports) and run concurrently in one module fixture."""
import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax_introspect
from jax_introspect import checkpoint as ckpt
from jax_introspect import config as config_lib
from tests import hf_reference
from tests.test_convert_errors import _edit_config, kill_when_stopped

MODEL = "gqa_untied"  # 3 layers, untied head, llama3 rope, max_position_embeddings=512


# --- helpers -------------------------------------------------------------------------------------

def _python(*args):
    """`python ARGS` in the repository (args may be bytes: argv that is not UTF-8) -> (exit code, stderr)."""
    proc = subprocess.run([sys.executable, *args], cwd=hf_reference.REPO, capture_output=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc.returncode, proc.stderr.decode(errors="replace")


def snapshot(path) -> dict:
    """relative path -> bytes of every file under `path` (or of `path` itself)."""
    path = pathlib.Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def error_line(stderr: str, expected=()) -> str:
    """The last stderr line, checked to be a one-line `error:` naming every `expected` part."""
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), stderr[-2000:]
    for part in expected:
        assert part in line, f"{part!r} not in the error line:\n{line}"
    return line


# A converter run that first applies a prelude (e.g. a resource limit, or a stop point).
_CONVERT_WITH = """
import os, runpy, signal, sys
{prelude}
sys.argv[0] = "launch.convert"
runpy.run_module("launch.convert", run_name="__main__", alter_sys=True)
"""
# A full disk, as an unprivileged test can make one: a write taking a file past 16 KB fails (EFBIG
# instead of ENOSPC). The job file fits; the first unit (a 64 KB embedding) does not.
_SMALL_DISK = """
import resource
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
"""
# Stops (SIGSTOP) right before the staged checkpoint is renamed onto --out ($STOP_BEFORE_RENAME_TO).
_STOP_BEFORE_RENAME_ONTO_OUT = """
rename = os.rename
def stopping_rename(src, dst):
    if os.fspath(dst) == os.environ["STOP_BEFORE_RENAME_TO"]:
        os.kill(os.getpid(), signal.SIGSTOP)
    rename(src, dst)
os.rename = stopping_rename
"""


@pytest.fixture(scope="module")
def tokenizer_checkpoint(tmp_path_factory):
    """A 2-layer tiny Llama-3.1 with the real Llama-3 tokenizer (what `launch.chat` needs)."""
    return hf_reference.build_llama3_checkpoint(tmp_path_factory.mktemp("llama3_tok"))


# --- every bad input, run concurrently -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Given:
    hf_dir: str  # a tiny HF Llama-3.1 folder (MODEL)
    ckpt_dir: str  # its checkpoint, converted without a tokenizer
    tokenizer_ckpt: str  # a tiny Llama-3.1 checkpoint with the Llama-3 tokenizer


@dataclasses.dataclass
class Case:
    argv: list  # after `python`
    expected: list  # parts of the error line
    keep: list = dataclasses.field(default_factory=list)  # paths whose bytes must survive unchanged
    absent: list = dataclasses.field(default_factory=list)  # paths that must not exist afterwards
    present: list = dataclasses.field(default_factory=list)  # paths that must exist afterwards


def _convert_argv(source, out, *extra):
    return ["-m", "launch.convert", f"--source={source}", f"--out={out}", *extra]


def _no_checkpoint(out):
    return [out, out + ckpt.STAGING_SUFFIX]


def _results_folder(root, given):
    # What a sweep writes: the folder `launch.convert --overwrite` used to delete.
    res = root / "results"
    (res / "report").mkdir(parents=True)
    (res / "trials.jsonl").write_text('{"trial": 1}\n')
    (res / "run.json").write_text('{"model": "llama"}')
    np.savez(res / "vectors.npz", v=np.arange(4.0))
    (res / "report" / "index.html").write_text("<html></html>")
    return Case(_convert_argv(given.hf_dir, res, "--overwrite"),
                [str(res), "trials.jsonl", "run.json", "vectors.npz", "report", "not a jax_introspect checkpoint",
                 "choose another --out"], keep=[res], absent=[str(res) + ckpt.STAGING_SUFFIX])


def _out_is_file(overwrite):
    def make(root, given):
        path = root / "notes.txt"
        path.write_text("keep me")
        return Case(_convert_argv(given.hf_dir, path, *(["--overwrite"] if overwrite else [])),
                    [str(path), "is a file", "choose another --out"], keep=[path],
                    absent=[str(path) + ckpt.STAGING_SUFFIX])
    return make


def _foreign_staging(root, given):
    # NAME.incomplete that the converter did not stage: its conversion.json is someone else's.
    out = root / "model"
    staging = pathlib.Path(str(out) + ckpt.STAGING_SUFFIX)
    staging.mkdir()
    (staging / "conversion.json").write_text('{"experiment": "mine"}')
    (staging / "data.csv").write_text("a,b\n1,2\n")
    return Case(_convert_argv(given.hf_dir, out), [str(staging), "data.csv", "not a jax_introspect checkpoint"],
                keep=[staging], absent=[out])


def _edited_source(root, hf_dir, name, edit):
    folder = root / name
    shutil.copytree(hf_dir, folder)
    _edit_config(str(folder), edit)
    return folder


def _llama3_rope_in_rope_scaling(cfg):
    """transformers 5 layout with a stale plain `rope_parameters` next to Llama-3.1's `rope_scaling`."""
    cfg["rope_scaling"] = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    cfg["rope_theta"] = 500000.0


def _rope_conflict(root, given):
    src = _edited_source(root, given.hf_dir, "rope_conflict_hf", _llama3_rope_in_rope_scaling)
    out = str(root / "rope_conflict_ckpt")
    return Case(_convert_argv(src, out),
                [os.path.join(src, "config.json"), "rope_scaling", "rope_parameters", "llama3 RoPE",
                 "default RoPE", "transformers uses rope_scaling", "delete the wrong one"], absent=_no_checkpoint(out))


def _config_edit(name, edit, expected):
    def make(root, given):
        src = _edited_source(root, given.hf_dir, f"{name}_hf", edit)
        out = str(root / f"{name}_ckpt")
        return Case(_convert_argv(src, out), [os.path.join(src, "config.json"), *expected], absent=_no_checkpoint(out))
    return make


def _config_not_an_object(root, given):
    src = root / "config_list_hf"
    shutil.copytree(given.hf_dir, src)
    (src / "config.json").write_text("[1, 2]")
    out = str(root / "config_list_ckpt")
    return Case(_convert_argv(src, out), [str(src / "config.json"), "not an object"], absent=_no_checkpoint(out))


def _tokenizer_missing(root, given):
    out = str(root / "tok_missing_ckpt")
    return Case(_convert_argv(given.hf_dir, out, f"--tokenizer={root / 'nowhere' / 'tokenizer.json'}"),
                ["tokenizer.json", "not found"], absent=_no_checkpoint(out))


def _tokenizer_not_a_tokenizer(root, given):
    path = root / "weights.model"
    path.write_bytes(bytes(range(256)))
    out = str(root / "tok_garbage_ckpt")
    return Case(_convert_argv(given.hf_dir, out, f"--tokenizer={path}"),
                [f"--tokenizer={path}", "is not a tokenizer file", "tokenizer.json"], absent=_no_checkpoint(out))


def _out_inside_a_file(root, given):
    path = root / "a_file"
    path.write_text("x")
    return Case(_convert_argv(given.hf_dir, path / "ckpt"), [str(path), "Not a directory", "writable"], keep=[path])


def _disk_full(root, given):
    out = str(root / "full_disk_ckpt")
    return Case(["-c", _CONVERT_WITH.format(prelude=_SMALL_DISK), f"--source={given.hf_dir}", f"--out={out}"],
                ["could not write globals", out + ckpt.STAGING_SUFFIX, "Free disk space", "re-run the same command"],
                absent=[out], present=[os.path.join(out + ckpt.STAGING_SUFFIX, "conversion.json")])


def _chat(*args, expected):
    def make(root, given):
        return Case(["-m", "launch.chat", f"--checkpoint={given.tokenizer_ckpt}", *args], expected)
    return make


def _chat_without_tokenizer(root, given):
    return Case(["-m", "launch.chat", f"--checkpoint={given.ckpt_dir}"],
                [given.ckpt_dir, "has no tokenizer", "--tokenizer"])


def _chat_missing_checkpoint(root, given):
    missing = str(root / "no_such_ckpt")
    return Case(["-m", "launch.chat", f"--checkpoint={missing}"], [missing, "does not exist", "launch.convert"])


CASES = {
    # 1: nothing of the user's is ever deleted
    "overwrite_results_folder": _results_folder,
    "out_is_file": _out_is_file(overwrite=False),
    "out_is_file_overwrite": _out_is_file(overwrite=True),
    "foreign_staging_folder": _foreign_staging,
    # 2: contradicting rope fields
    "rope_scaling_contradicts_rope_parameters": _rope_conflict,
    # 4: launch.convert
    "config_without_vocab_size": _config_edit("no_vocab", lambda c: c.pop("vocab_size"), ["no vocab_size"]),
    "config_null_hidden_size": _config_edit("null_hidden", lambda c: c.update(hidden_size=None),
                                            ["hidden_size=None", "positive integer"]),
    "config_not_an_object": _config_not_an_object,
    "tokenizer_missing": _tokenizer_missing,
    "tokenizer_not_a_tokenizer": _tokenizer_not_a_tokenizer,
    "out_inside_a_file": _out_inside_a_file,
    "disk_full": _disk_full,
    # 4: launch.chat
    "chat_zero_new_tokens": _chat("--max_new_tokens=0", expected=["--max_new_tokens=0", "at least one token"]),
    "chat_question_not_utf8": _chat(b"--question=caf\xe9 \xff", expected=["--question", "not valid UTF-8", "0xe9"]),
    "chat_prompt_past_positions": _chat("--question=" + "hello " * 600,
                                        expected=["max_position_embeddings=512", "shorten the prompt"]),
    "chat_without_tokenizer": _chat_without_tokenizer,
    "chat_missing_checkpoint": _chat_missing_checkpoint,
}


@pytest.fixture(scope="module")
def failures(tiny_models, tokenizer_checkpoint, tmp_path_factory):
    """case -> (Case, snapshots of its `keep` paths before the run, exit code, stderr)."""
    hf_dir, ckpt_dir, _ = tiny_models(MODEL)
    given = Given(hf_dir, ckpt_dir, tokenizer_checkpoint)
    cases, before = {}, {}
    for name, make in CASES.items():
        cases[name] = make(tmp_path_factory.mktemp(name), given)
        before[name] = [snapshot(p) for p in cases[name].keep]
    with concurrent.futures.ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2))) as pool:
        runs = {name: pool.submit(_python, *case.argv) for name, case in cases.items()}
        return {name: (cases[name], before[name], *runs[name].result()) for name in cases}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_error_line_and_loses_nothing(failures, name):
    case, before, returncode, stderr = failures[name]
    assert returncode != 0, f"{name}: exit 0\n{stderr[-2000:]}"
    error_line(stderr, case.expected)
    for path, files in zip(case.keep, before):
        assert snapshot(path) == files, f"{path} changed"
    for path in case.absent:
        assert not os.path.lexists(path), f"{path} was left behind"
    for path in case.present:
        assert os.path.exists(path), f"{path} is gone"


# --- 1: --overwrite replaces checkpoints of ours, and a kill while replacing keeps one -------------

def test_overwrite_replaces_our_checkpoint_or_an_empty_folder(tiny_models, tmp_path):
    hf_dir, old_ckpt, _ = tiny_models(MODEL)
    ours, empty = tmp_path / "ours", tmp_path / "empty"
    shutil.copytree(old_ckpt, ours)
    empty.mkdir()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(hf_reference.run_convert, hf_dir, str(out), dtype="bfloat16", extra=["--overwrite"])
                       for out in (ours, empty)]:
            future.result()
    for out in (ours, empty):
        assert ckpt.read_manifest(str(out))["dtype"] == "bfloat16"  # the new checkpoint
        assert sorted(os.listdir(out)) == [ckpt.CONFIG, ckpt.MANIFEST, "params"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "ours"]  # nothing staged or set aside is left


def test_killed_while_replacing_a_checkpoint_keeps_one(tiny_models, tmp_path):
    hf_dir, old_ckpt, _ = tiny_models(MODEL)
    out = tmp_path / "model"
    shutil.copytree(old_ckpt, out)
    old_files = snapshot(out)
    args = [f"--source={hf_dir}", f"--out={out}", "--dtype=bfloat16", "--overwrite"]
    kill_when_stopped(_CONVERT_WITH.format(prelude=_STOP_BEFORE_RENAME_ONTO_OUT), args, tmp_path / "log.txt",
                      point="the rename onto --out", env={"STOP_BEFORE_RENAME_TO": str(out)})

    # Killed after the old checkpoint made way and before the new one moved in: the old one is
    # still whole, in some folder beside --out.
    survivors = [p.name for p in tmp_path.iterdir() if p.is_dir() and snapshot(p) == old_files]
    assert survivors, sorted(os.listdir(tmp_path))

    # The same command finishes the job and tidies up.
    hf_reference.run_convert(hf_dir, str(out), dtype="bfloat16", extra=["--overwrite"])
    assert ckpt.read_manifest(str(out))["dtype"] == "bfloat16"
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model"]


# --- 2: rope_scaling next to rope_parameters --------------------------------------------------------

def _llama3_rope_in_rope_scaling_without_theta(cfg):
    """As above but no top-level rope_theta: transformers then gives rope_scaling its default 10000."""
    _llama3_rope_in_rope_scaling(cfg)
    del cfg["rope_theta"]


@pytest.mark.parametrize("edit, theta_transformers_uses", [(_llama3_rope_in_rope_scaling, 500000.0),
                                                            (_llama3_rope_in_rope_scaling_without_theta, 10000.0)])
def test_contradicting_rope_fields_are_refused(tiny_models, tmp_path, edit, theta_transformers_uses):
    from transformers import LlamaConfig
    src = _edited_source(tmp_path, tiny_models(MODEL)[0], "hf", edit)
    reference = LlamaConfig.from_pretrained(src).rope_parameters
    assert reference["rope_type"] == "llama3" and reference["rope_theta"] == theta_transformers_uses
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.from_hf_config_file(str(src))
    message = str(info.value)
    for part in ("rope_scaling={", "rope_parameters={", f"llama3 RoPE with rope_theta={theta_transformers_uses}",
                 "default RoPE with rope_theta=500000.0", "transformers uses rope_scaling", "delete the wrong one"):
        assert part in message, f"{part!r} not in {message}"


def test_agreeing_rope_fields_convert_and_match_transformers(tiny_models, tmp_path):
    import torch
    from transformers import LlamaForCausalLM
    hf_dir, plain_ckpt, _ = tiny_models(MODEL)
    src = _edited_source(tmp_path, hf_dir, "hf", lambda c: c.update(rope_scaling=dict(c["rope_parameters"])))
    out = str(tmp_path / "ckpt")
    hf_reference.run_convert(str(src), out)
    lm = jax_introspect.load(out)
    assert lm.config == dataclasses.replace(ckpt.load_config(plain_ckpt), name="hf")  # llama3 RoPE, as stored
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()  # reads both fields itself
    tokens = np.random.RandomState(0).randint(0, 256, (2, 64))
    theirs, _ = hf_reference.hf_logits_and_hidden(model, tokens)
    assert np.abs(lm.logits(tokens) - theirs).max() < 1e-4  # float32 throughout


# --- 3: positions --------------------------------------------------------------------------------

def test_missing_max_position_embeddings_follows_transformers(tiny_models, tmp_path):
    from transformers import LlamaConfig
    src = _edited_source(tmp_path, tiny_models(MODEL)[0], "hf", lambda c: c.pop("max_position_embeddings"))
    reference = LlamaConfig.from_pretrained(src).max_position_embeddings
    assert config_lib.from_hf_config_file(str(src)).max_position_embeddings == reference == 2048


_GGUF_META = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
              "llama.block_count": 2, "llama.feed_forward_length": 128,
              "llama.attention.layer_norm_rms_epsilon": 1e-5}


def test_gguf_without_context_length_follows_transformers():
    from transformers import LlamaConfig

    def positions(meta):
        return config_lib.from_gguf_metadata(meta, vocab_size=256, has_output_tensor=True,
                                             source="x.gguf").max_position_embeddings
    # transformers reads llama.context_length into max_position_embeddings, else LlamaConfig's default.
    assert positions(_GGUF_META) == LlamaConfig().max_position_embeddings
    assert positions({**_GGUF_META, "llama.context_length": 4096}) == 4096


def test_check_context_refuses_past_the_positions():
    cfg = dataclasses.replace(config_lib.preset("llama-3.2-1b"), max_position_embeddings=512)
    config_lib.check_context(cfg, 512)
    config_lib.check_context(cfg, 500, max_new_tokens=12)
    with pytest.raises(config_lib.ContextTooLongError,
                       match=r"prompt of 500 tokens \+ 13 new tokens needs 513 positions.*"
                             r"max_position_embeddings=512: shorten the prompt or lower max_new_tokens"):
        config_lib.check_context(cfg, 500, max_new_tokens=13)
    with pytest.raises(ValueError, match=r"prompt of 513 tokens needs 513 positions"):
        config_lib.check_context(cfg, 513)


def test_prompt_past_the_positions_is_refused_before_any_compute(tiny_models, monkeypatch):
    from jax_introspect import lm as lm_lib
    lm = jax_introspect.load(tiny_models(MODEL)[1])
    limit = lm.config.max_position_embeddings

    def model_ran(*args, **kwargs):
        raise AssertionError("the model ran on a prompt past its positions")
    monkeypatch.setattr(lm_lib, "_prefill", model_ran)
    monkeypatch.setattr(lm_lib.generate_lib, "generate_tokens", model_ran)
    ragged = [[1] * 3, [1] * (limit + 1)]
    with pytest.raises(config_lib.ContextTooLongError, match=f"{limit + 1} tokens.*max_position_embeddings={limit}"):
        lm.logits(ragged)
    with pytest.raises(config_lib.ContextTooLongError, match=f"{limit + 1} tokens"):
        lm.residuals(ragged)
    with pytest.raises(config_lib.ContextTooLongError, match=f"{limit - 4} tokens \\+ 5 new tokens"):
        lm.generate([[1] * (limit - 4)], max_new_tokens=5)
    lm.check_context(limit - 4, max_new_tokens=4)
