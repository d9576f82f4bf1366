"""Runs as Inspect logs: inspect_ai's own reader (`read_eval_log`) gives back every trial with its grades
and metadata, compared with trials.jsonl (a tiny sweep, which writes the logs with its report) and with
the 405B replication's judged file read directly; and the error without inspect_ai."""
import glob
import json
import os
import subprocess
import sys

import pytest
from inspect_ai.log import read_eval_log

from jax_introspect import checkpoint
from jax_introspect.experiment import inspect_log, protocols
from tests import hf_reference as ref
from tests.test_report import JUDGED_405B
from tests.test_sweep import read_jsonl, run, sweep_cmd

CRITERIA = ("coherent", "affirmative", "identifies", "immediate")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A tiny sweep (random Llama-3.1, real Llama-3 tokenizer): its folder and checkpoint."""
    root = tmp_path_factory.mktemp("inspect")
    ckpt = ref.build_llama3_checkpoint(root)
    out = root / "run"
    run(sweep_cmd(ckpt, out))
    return out, ckpt


def _one_log(folder):
    paths = glob.glob(os.path.join(folder, inspect_log.LOGS_DIR, "*.eval"))
    assert len(paths) == 1, paths
    return read_eval_log(paths[0])


def test_sweep_log_gives_back_every_trial(swept):
    out, ckpt = swept
    records = {r["trial_id"]: r for r in read_jsonl(out / "trials.jsonl")}
    log = _one_log(out / "report")
    assert log.status == "success" and log.eval.model.endswith(json.loads((out / "run.json").read_text())["config"]["model"])
    assert {s.id for s in log.samples} == set(records) and len(log.samples) == len(records)
    tokenizer = checkpoint.load_tokenizer(str(ckpt))
    for s in log.samples:
        r = records[s.id]
        g = r["grades"]
        for c in CRITERIA:
            assert s.scores[c].value is bool(g[c]), (s.id, c)
            assert (s.scores[c].explanation or "") == g.get("notes", "")
        assert s.scores["strict_introspection"].value is all(g[c] for c in CRITERIA)
        assert s.scores["strict_lindsey"].value is bool(g["coherent"] and g["immediate"])
        m = s.metadata
        for key in ("kind", "protocol", "word", "layer", "vector_method", "seed", "trial_index", "n_tokens",
                    "finished"):
            assert m[key] == r[key], (s.id, key)
        assert m["strength"] == float(r["strength"]) and m["trial_id"] == r["trial_id"]
        assert m["grader"] == g["grader"] and m["prompt_text"] == r["prompt"]
        data = protocols.protocol(r["protocol"])
        assert (m["injection_window"], m["injection_anchor"]) == (data["window"], data.get("anchor"))
        assert m["injection_start_token"] == protocols.window_start(tokenizer, r["prompt"], data["window"],
                                                                    data.get("anchor"))
        # The chat as the model saw it: the protocol's turns (after the template's system turn), then the response.
        turns = [(msg.role, msg.text) for msg in s.messages]
        assert turns[-len(data["messages"]) - 1:-1] == [(x["role"], x["content"]) for x in data["messages"]]
        assert turns[-1] == ("assistant", r["response"]) and s.output.completion == r["response"]
        assert s.input[-1].text == r["question"]
        assert s.output.stop_reason == ("stop" if r["finished"] else "max_tokens")
    # The log's headline rates are the report's.
    summary = json.loads((out / "report" / "summary.json").read_text())
    rates = {e.name: e.metrics for e in log.results.scores}
    for kind in ("injected", "control"):
        part = summary["overall"]["all"][kind]
        for c in CRITERIA + ("strict_introspection", "strict_lindsey"):
            assert rates[c][kind].value == pytest.approx(part["counts"][c] / part["n"], abs=1e-12)
    # report.md links the log and the viewer; the viewer holds the same log.
    md = (out / "report" / "report.md").read_text()
    assert "inspect_viewer/index.html" in md and os.path.basename(log.location) in md
    assert "## Transcripts (what the model said)" in md
    assert os.path.exists(out / "report" / "inspect_viewer" / "logs" / os.path.basename(log.location))


def test_405b_judged_file_round_trip(tmp_path):
    out = tmp_path / "r405"
    proc = subprocess.run([sys.executable, "-m", "launch.report", f"--results={JUDGED_405B}", "--inspect",
                           f"--out={out}"], cwd=ref.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = _one_log(out)
    with open(JUDGED_405B) as f:
        data = json.load(f)
    judged = [(i, e) for i, e in enumerate(data["results"])
              if isinstance(e.get("judge"), dict) and any(e["judge"].get(c) is not None for c in CRITERIA)]
    assert len(log.samples) == len(judged) == 480
    by_index = {s.metadata["source_index"]: s for s in log.samples}
    assert sorted(by_index) == [i for i, _ in judged]
    for i, e in judged:
        s = by_index[i]
        prompt, _, rest = e["label"].partition("_")
        for c in CRITERIA:
            assert s.scores[c].value is bool(e["judge"][c])
            assert s.scores[c].explanation == e["judge"]["notes"]
        assert s.scores["strict_introspection"].value is all(bool(e["judge"][c]) for c in CRITERIA)
        assert s.metadata["source_label"] == e["label"] and s.metadata["trial_index"] == e["trial_idx"]
        assert s.metadata["word"] == (None if rest == "control" else rest)
        assert s.metadata["strength"] == (0.0 if rest == "control" else e["magnitude"])
        assert s.metadata["layer"] == (None if rest == "control" else data["layer"])
        assert s.messages[-1].text == e["response"] and s.output.completion == e["response"]
        asked = data["lindsey_trial"] if prompt == "lindsey" else data["alt_prompt"]
        assert s.input[-1].text == asked and s.metadata["injection_start_token"] == 0
    assert log.eval.model.endswith(os.path.basename(data["model_path"]))
    assert log.eval.metadata["grader"] == data["judge_model"]


def test_without_inspect_ai(tmp_path):
    """A stand-in inspect_ai that fails to import: the report is still written and says why; --inspect is an
    error naming the install command."""
    fake = tmp_path / "fake"
    (fake / "inspect_ai").mkdir(parents=True)
    (fake / "inspect_ai" / "__init__.py").write_text("raise ImportError('inspect_ai absent (test stand-in)')\n")
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{ref.REPO}")
    base = [sys.executable, "-m", "launch.report", f"--results={JUDGED_405B}"]
    proc = subprocess.run(base + [f"--out={tmp_path / 'auto'}"], cwd=ref.REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "auto" / "report.md").read_text()
    assert "No Inspect logs written: inspect_ai is not importable" in md and inspect_log.INSTALL_HINT in md
    assert not (tmp_path / "auto" / inspect_log.LOGS_DIR).exists()
    proc = subprocess.run(base + ["--inspect", f"--out={tmp_path / 'required'}"], cwd=ref.REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and inspect_log.INSTALL_HINT in proc.stderr
    assert not (tmp_path / "required").exists()


def test_parse_chat_templates():
    llama = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|><|start_header_id|>user"
             "<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert inspect_log.parse_chat(llama) == [("system", "sys"), ("user", "hi")]
    chatml = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert inspect_log.parse_chat(chatml) == [("system", "S"), ("user", "U")]
    assert inspect_log.parse_chat("plain text") is None
