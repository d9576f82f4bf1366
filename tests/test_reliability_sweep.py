"""Issue 11, the sweep and report side: nothing lost, nothing silently wrong, errors before compute.

Each test reproduces one defect found by a hostile run of the landed code (it failed there) and
checks the fix: the exit code, the one line the user sees, and what is on disk afterwards."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import hf_reference as ref
from tests.test_sweep import CONFIG, EXPECTED_TRIALS, SMALL, read_jsonl, run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ref.build_llama3_checkpoint(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def weightless(checkpoint, tmp_path_factory):
    """The checkpoint without its weights: a check that passes or fails on it ran before any load."""
    folder = tmp_path_factory.mktemp("weightless") / "ckpt"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("params"))
    return str(folder)


def sweep(checkpoint, out, *extra, small=True):
    return [sys.executable, "-m", "launch.sweep", f"--config={CONFIG}", f"--checkpoint={checkpoint}",
            f"--out={out}", *(SMALL if small else []), "--noreport", *extra]


def one_line_error(proc, *needles):
    """A refusal as the user sees it: nonzero exit, no traceback, a last line `error: ...`."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def listing(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, p))}


# --- 2 and 3: list fields, one syntax for all of them; duplicates; the last flag wins ---------------

@pytest.mark.parametrize("field,text,expected", [
    ("words", "Dust,Oceans,Bread", ("Dust", "Oceans", "Bread")),
    ("words", "Café,🔥", ("Café", "🔥")),
    ("words", "('Dust', 'Oceans')", ("Dust", "Oceans")),
    ("words", "'Dust','Oceans'", ("Dust", "Oceans")),
    ("words", "Dust", ("Dust",)),
    ("protocols", "thinking_about, lindsey_injected_thought", ("thinking_about", "lindsey_injected_thought")),
    ("layers", "0.5,0.67", (0.5, 0.67)),
    ("layers", "(0.5, 0.67)", (0.5, 0.67)),
    ("layers", "3,5", (3, 5)),
    ("strengths", "[2, 4.5]", (2, 4.5)),
    ("strengths", "2.0", (2.0,)),
])
def test_every_list_field_reads_the_same_forms(field, text, expected):
    from jax_introspect.experiment import sweep_config
    value = sweep_config.parse_list(field, text)
    assert value == expected and [type(v) for v in value] == [type(v) for v in expected]


@pytest.mark.parametrize("field,text,message", [
    ("words", "Dust,,Oceans", "empty entry"),
    ("words", "(1, 2)", "is not text"),
    ("strengths", "2.0,strong", "'strong' is not a number"),
    ("layers", "(0.5,", "not a valid list literal"),
])
def test_malformed_list_values_are_named(field, text, message):
    from jax_introspect.experiment import sweep_config
    with pytest.raises(sweep_config.SweepError, match=message):
        sweep_config.parse_list(field, text)


def test_repeated_flags_replace_and_both_flag_forms_are_read():
    from configs.sweeps import quickstart
    from jax_introspect.experiment import sweep_config
    from launch.sweep import split_config_args
    argv = ["sweep", "--mesh=1x1", "--config.strengths=2.0,4.0", "--config.seed=3", "--config.strengths", "4.0",
            "--config.words=Dust,Oceans"]
    kept, overrides = split_config_args(argv)
    assert kept == ["sweep", "--mesh=1x1"]
    config = sweep_config.with_overrides(quickstart.get_config(), overrides)
    assert config.strengths == (4.0,) and config.seed == 3 and config.words == ("Dust", "Oceans")  # the last wins


@pytest.mark.parametrize("field,text,value", [
    ("seed", "7", 7), ("temperature", "0", 0.0), ("cell_per_word", "true", True), ("system_header", "0", False),
    ("grader", "llm:checkpoints/x", "llm:checkpoints/x"), ("strengths", "4", (4.0,))])
def test_scalar_fields_parse_by_their_declared_type(field, text, value):
    from configs.sweeps import quickstart
    from jax_introspect.experiment import sweep_config
    config = sweep_config.with_overrides(quickstart.get_config(), [(field, text)])
    assert getattr(config, field) == value and type(getattr(config, field)) is type(value)


@pytest.mark.parametrize("field,text,message", [("seed", "1.5", "not an integer"), ("cell_per_word", "maybe", "true or false"),
                                                ("colour", "3", "unknown config field 'colour'")])
def test_bad_scalar_values_are_named(field, text, message):
    from jax_introspect.experiment import sweep_config
    with pytest.raises(sweep_config.SweepError, match=message):
        sweep_config.parse_field(field, text)


def _config(**changes):
    from configs.sweeps import quickstart
    return quickstart.get_config().replace(**changes)


@pytest.mark.parametrize("changes,message", [
    (dict(words=["Dust,Oceans", "Bread"]), "'Dust,Oceans' contains a comma"),
    (dict(strengths=[4.0, 4.0]), r"strengths repeat \['4'\]"),
    (dict(strengths=[1.0, 1.0000001]), r"strengths repeat \['1'\]"),  # one trial-id label
    (dict(layers=[3, 3]), r"layers repeat \[3\]"),
    (dict(protocols=["thinking_about", "thinking_about"]), "protocols repeat"),
    (dict(strengths=[float("inf")]), "finite"),
    (dict(strengths=["4.0"]), "strength '4.0' is not a number"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be > 0"),
    (dict(grader="api:foo"), "unknown grader spec 'api:foo'"),
])
def test_config_checks_need_no_model(changes, message):
    from jax_introspect.experiment import sweep
    with pytest.raises(sweep.SweepError, match=message):
        _config(**changes)


def test_two_layer_specs_naming_one_layer_are_refused():
    from jax_introspect.experiment import sweep
    with pytest.raises(sweep.SweepError, match="layers 0.5 and 15 are both layer 15 of this 30-layer model"):
        sweep.resolve_layers([0.5, 15], 30)


def test_comma_words_and_repeated_flags_on_the_command_line(checkpoint, tmp_path):
    out = tmp_path / "run"
    run(sweep(checkpoint, out, "--config.words=Dust,Snow", "--config.strengths=2.0,4.0", "--config.strengths=4.0"))
    records = read_jsonl(out / "trials.jsonl")
    injected = [r for r in records if r["kind"] == "injected"]
    assert {r["word"] for r in injected} == {"Dust", "Snow"}
    assert {r["strength"] for r in injected} == {4.0}
    assert len({r["trial_id"] for r in records}) == len(records) == 2 * 2 + 3


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_strength_is_one_line(weightless, tmp_path, value):
    proc = run(sweep(weightless, tmp_path / "out", f"--config.strengths=1.0,{value}"), check=False)
    one_line_error(proc, "strengths must be finite")
    assert not (tmp_path / "out").exists()


def test_duplicate_strengths_on_the_command_line(weightless, tmp_path):
    proc = run(sweep(weightless, tmp_path / "out", "--config.strengths=4.0,4.0"), check=False)
    one_line_error(proc, "strengths repeat ['4']")


# --- 10 and 11: checks that need no weights come before them -----------------------------------

@pytest.mark.parametrize("extra,env,message", [
    (["--config.layers=0,7"], {}, "layer 7 is beyond the model"),
    (["--config.grader=api:foo"], {}, "unknown grader spec 'api:foo'"),
    (["--config.grader=api:anthropic:claude-sonnet-4-6"], {"ANTHROPIC_API_KEY": ""}, "ANTHROPIC_API_KEY"),
    (["--config.grader=llm:/nonexistent"], {}, "checkpoint /nonexistent does not exist"),
    (["--config.max_new_tokens=600"], {}, "max_position_embeddings"),
])
def test_model_free_checks_run_before_the_weights_load(weightless, tmp_path, extra, env, message):
    proc = subprocess.run(sweep(weightless, tmp_path / "out", *extra), cwd=ref.REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    one_line_error(proc, message)
    assert not (tmp_path / "out" / "run.json").exists()


def test_out_that_is_a_file_is_refused_before_the_weights_load(weightless, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    proc = run(sweep(weightless, target), check=False)
    one_line_error(proc, "is a file, not a folder")
    assert target.read_text() == "mine"


def test_read_only_and_full_disks_are_refused(tmp_path, monkeypatch):
    from jax_introspect.experiment import results
    real_open = open

    def read_only(path, *args, **kw):
        if ".write-test-" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kw)
    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(results.ResultsError, match="cannot write into .*Read-only file system"):
        results.check_output_folder(str(tmp_path / "ro"))
    monkeypatch.setattr("builtins.open", real_open)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1 << 20))
    with pytest.raises(results.ResultsError, match=r"1.0 MiB free but this run writes up to about 9.5 MiB"):
        results.check_output_folder(str(tmp_path / "full"), need_bytes=int(9.5 * 2**20))


def test_estimated_bytes_bound_what_a_sweep_writes(checkpoint, tmp_path):
    from jax_introspect import checkpoint as ckpt
    from jax_introspect.experiment import sweep
    config = _config(words=["Dust", "Snow"], layers=[0, 1], strengths=[1.0, 4.0], trials_per_cell=2,
                     control_trials=3, max_new_tokens=6, batch_size=4, baseline_words=["Desks", "Sand"])
    model_config = ckpt.load_config(checkpoint)
    plan = sweep.plan_sweep(config, model_config, ckpt.load_tokenizer(checkpoint), checkpoint, "float32")
    import jax_introspect
    sweep.run_sweep(jax_introspect.load(checkpoint), config, str(tmp_path / "run"), progress=False, plan=plan)
    written = sum(os.path.getsize(tmp_path / "run" / name) for name in os.listdir(tmp_path / "run"))
    assert written < sweep.estimated_bytes(plan, model_config) < 100 * written + (8 << 20)


# --- 6: one writer per results folder ----------------------------------------------------------

HOLDER = ("import sys, time; from jax_introspect.experiment.files import FolderLock\n"
          "with FolderLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n")


def test_second_writer_is_refused_and_a_killed_writer_leaves_no_stale_lock(checkpoint, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ref.REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        began = time.monotonic()
        proc = run(sweep(checkpoint, out), check=False)
        one_line_error(proc, "is being written by another run", f"pid {holder.pid} on ")
        assert time.monotonic() - began < 120 and not (out / "trials.jsonl").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    run(sweep(checkpoint, out))  # the kernel dropped the dead writer's lock
    assert len(read_jsonl(out / "trials.jsonl")) == EXPECTED_TRIALS


def test_lock_is_reentrant_within_a_process(tmp_path):
    from jax_introspect.experiment.files import FolderLock, FolderBusyError
    with FolderLock(str(tmp_path)):
        with FolderLock(str(tmp_path)):
            pass
        other = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ref.REPO, capture_output=True,
                               text=True, timeout=120)
        assert FolderBusyError.__name__ in other.stderr and f"pid {os.getpid()}" in other.stderr
    assert not FolderLock._held


# --- 7: atomic files; a torn file is named and recovered ----------------------------------------

def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    from jax_introspect.experiment.files import atomic_write
    path = tmp_path / "vectors.npz"
    path.write_bytes(b"old")

    def dies(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), dies)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["vectors.npz"]


def test_torn_vector_cache_and_run_file_are_recovered(checkpoint, tmp_path):
    out = tmp_path / "run"
    run(sweep(checkpoint, out))
    complete = {r["trial_id"]: r for r in read_jsonl(out / "trials.jsonl")}
    vectors = np.load(out / "vectors.npz")["vectors"]
    # A kill of an older version: torn cache and run.json, the last trials lost.
    (out / "vectors.npz").write_bytes((out / "vectors.npz").read_bytes()[:1000])
    (out / "run.json").write_text((out / "run.json").read_text()[:50])
    kept = (out / "trials.jsonl").read_text().splitlines(keepends=True)[:5]
    (out / "trials.jsonl").write_text("".join(kept))
    other = run(sweep(checkpoint, out, "--config.control_trials=4"), check=False)  # can't tell: refused
    one_line_error(other, "run.json is damaged", "re-run with the config that made them")
    proc = run(sweep(checkpoint, out))
    assert f"{out}/run.json was unreadable" in proc.stderr
    assert f"{out / 'vectors.npz'} is unreadable (BadZipFile" in proc.stderr and "extracting them again" in proc.stderr
    np.testing.assert_array_equal(np.load(out / "vectors.npz")["vectors"], vectors)
    resumed = read_jsonl(out / "trials.jsonl")
    assert "".join(kept) == "".join((out / "trials.jsonl").read_text().splitlines(keepends=True)[:5])
    assert {r["trial_id"]: r["response"] for r in resumed} == {k: r["response"] for k, r in complete.items()}


def test_torn_run_file_of_other_trials_is_refused_with_what_to_do(tmp_path):
    from jax_introspect.experiment import results
    store = results.ResultsStore(str(tmp_path), {"a": 1})
    store.append([results.TrialRecord(store.hash, "t0", "control", "p", None, None, 0.0, "m", 0, 0, "", "", "", 0,
                                      True, {}, {})])
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(results.ResultsError, match=r"run.json is damaged .* restore it|run.json is damaged"):
        results.ResultsStore(str(tmp_path), {"a": 2})


# --- 8: a folder is bound to what decides the trials' texts only --------------------------------

def test_grader_batch_size_and_a_symlinked_checkpoint_resume_the_same_folder(checkpoint, tmp_path):
    out = tmp_path / "run"
    bad = run(sweep(checkpoint, out, "--config.grader=api:foo"), check=False)
    one_line_error(bad, "unknown grader spec")
    assert not (out / "run.json").exists()
    run(sweep(checkpoint, out, "--config.max_new_tokens=4"))
    link = tmp_path / "link"
    link.symlink_to(checkpoint)
    again = run(sweep(str(link), out, "--config.max_new_tokens=4", "--config.batch_size=8"))
    assert f"({EXPECTED_TRIALS} already done, 0 run now)" in again.stdout
    other = run(sweep(checkpoint, out, "--config.max_new_tokens=5"), check=False)
    one_line_error(other, "holds results of another config", "max_new_tokens: 4 -> 5")


def test_binding_leaves_out_grader_and_batch_size_and_resolves_layers():
    from jax_introspect.experiment import sweep
    a = sweep.binding(_config(grader="heuristic", batch_size=8), [15], "m", "/x", "float32")
    b = sweep.binding(_config(grader="api:openai:gpt", batch_size=32), [15], "m", "/x", "float32")
    assert a == b and "grader" not in a and a["layers"] == [15]
    assert sweep.binding(_config(), [15], "m", "/x", "bfloat16") != a  # the dtype changes the texts


def test_results_folder_of_an_earlier_version_is_migrated(tmp_path):
    from jax_introspect.experiment import results, sweep
    config = _config()
    old = dict(config.to_dict(), resolved_layers=[10, 15], model="m", checkpoint=str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({"config_hash": results.config_hash(old), "config": old}))
    new = sweep.binding(config.replace(grader="api:openai:gpt"), [10, 15], "m", str(tmp_path), "float32")
    results.ResultsStore(str(tmp_path), new)
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["config_hash"] == results.config_hash(new)
    assert written["previous_config_hashes"] == [results.config_hash(old)]


# --- 9 and 12: reports ----------------------------------------------------------------------------

def test_cut_replication_file_warns_on_stderr_and_in_the_summary(tmp_path):
    from tests.test_report import JUDGED_405B
    data = json.loads(open(JUDGED_405B).read())
    data["results"] = data["results"][:240]
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "launch.report", f"--results={cut}"], cwd=ref.REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert warning and "aggregates disagree with the counts of its results" in warning[0]
    assert "240 entries" in warning[0]
    summary = json.loads((tmp_path / "cut_report" / "summary.json").read_text())
    assert summary["warnings"] and "may be incomplete" in summary["warnings"][0]


def test_orphan_staging_folders_of_killed_report_writers_are_removed(tmp_path):
    from jax_introspect.experiment import report
    from tests.test_report import _write_synthetic
    folder = _write_synthetic(tmp_path / "run")
    out = os.path.join(folder, "report")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphans = [f".report.tmp-{dead.pid}-abc", ".report.tmp-x1y2z3"]  # a dead pid; an older version's name
    live = f".report.tmp-{os.getpid()}-live"
    for name in orphans + [live]:
        os.makedirs(os.path.join(folder, name))
    os.makedirs(os.path.join(folder, "report.old-1234"))
    open(os.path.join(folder, "report.old-1234", report.MARKER), "w").close()
    report.write_report(report.load_run(folder), out)
    left = sorted(e for e in os.listdir(folder) if e.startswith((".report", "report.")))
    assert left == [live]


def test_corrupted_middle_line_says_how_to_recover(tmp_path):
    from jax_introspect.experiment import report
    from tests.test_report import _write_synthetic
    folder = _write_synthetic(tmp_path / "run")
    path = os.path.join(folder, "trials.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    lines[3] = lines[3][:40] + "\n"
    open(path, "w").writelines(lines)
    with pytest.raises(report.ReportError) as info:
        report.load_run(folder)
    message = str(info.value)
    assert "trials.jsonl:4: not a trial record" in message and f"sed -i.bak '4d' {path}" in message
    subprocess.run(["sed", "-i.bak", "4d", path], check=True)  # the advice works
    assert report.load_run(folder).metadata["n_records"] == len(lines) - 1
