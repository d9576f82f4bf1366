"""The sweep end to end on a tiny random Llama-3.1 with the real Llama-3 tokenizer."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import hf_reference as ref

CONFIG = "configs/sweeps/quickstart.py"
SMALL = ["--config.words=('Dust','Snow')", "--config.layers=0,1", "--config.strengths=1.0,4.0",
         "--config.trials_per_cell=2", "--config.control_trials=3", "--config.max_new_tokens=6",
         "--config.batch_size=4", "--config.batches_per_call=1", "--config.baseline_words=('Desks','Jackets','Sand')"]
# 2 layers x 2 strengths x 2 trials + 3 controls = 11 trials, 3 calls of 4.
EXPECTED_TRIALS = 11


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ref.build_llama3_checkpoint(tmp_path_factory.mktemp("sweep"))


def sweep_cmd(checkpoint, out, *extra, config=CONFIG):
    return [sys.executable, "-m", "launch.sweep", f"--config={config}", f"--checkpoint={checkpoint}",
            f"--out={out}", *SMALL, *extra]


def run(cmd, check=True):
    proc = subprocess.run(cmd, cwd=ref.REPO, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_writes_records_summary_and_heatmaps(checkpoint, tmp_path):
    out = tmp_path / "run"
    proc = run(sweep_cmd(checkpoint, out))
    records = read_jsonl(out / "trials.jsonl")
    assert len(records) == EXPECTED_TRIALS
    assert len({r["trial_id"] for r in records}) == EXPECTED_TRIALS
    injected = [r for r in records if r["kind"] == "injected"]
    controls = [r for r in records if r["kind"] == "control"]
    assert len(injected) == 8 and len(controls) == 3
    assert {(r["layer"], r["strength"]) for r in injected} == {(0, 1.0), (0, 4.0), (1, 1.0), (1, 4.0)}
    assert {r["word"] for r in injected} == {"Dust", "Snow"} and all(r["word"] is None for r in controls)
    for r in records:
        assert set(r["grades"]) >= {"coherent", "affirmative", "identifies", "immediate"}
        assert r["n_tokens"] <= 6 and r["prompt"].startswith("<|begin_of_text|>")
        assert "Trial 1" in r["question"]
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["config_hash"] == records[0]["config_hash"]
    report_dir = out / "report"
    assert "report:" in proc.stdout and (report_dir / "report.md").exists()
    pngs = list(report_dir.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["overall"]["all"]["injected"]["n"] == 8
    assert summary["overall"]["all"]["control"]["n"] == 3
    assert (out / "vectors.npz").exists()


def test_rerun_is_a_no_op_and_kill_minus_9_resumes_exactly(checkpoint, tmp_path):
    complete = tmp_path / "complete"
    run(sweep_cmd(checkpoint, complete, "--noreport"))
    reference = {r["trial_id"]: r for r in read_jsonl(complete / "trials.jsonl")}
    again = run(sweep_cmd(checkpoint, complete, "--noreport"))
    assert f"({EXPECTED_TRIALS} already done, 0 run now)" in again.stdout
    assert len(read_jsonl(complete / "trials.jsonl")) == EXPECTED_TRIALS

    killed = tmp_path / "killed"
    proc = subprocess.Popen(sweep_cmd(checkpoint, killed, "--noreport"), cwd=ref.REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = killed / "trials.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and 0 < len(path.read_text().splitlines()) < EXPECTED_TRIALS:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_jsonl(path)
    assert 0 < len(before) < EXPECTED_TRIALS, "the kill must land mid-run"
    run(sweep_cmd(checkpoint, killed, "--noreport"))
    after = read_jsonl(path)
    ids = [r["trial_id"] for r in after]
    assert len(ids) == len(set(ids)) == EXPECTED_TRIALS and set(ids) == set(reference)
    for r in before:  # trials finished before the kill keep their text
        assert after[ids.index(r["trial_id"])]["response"] == r["response"]
    for r in after:  # and every trial's text is what an uninterrupted run produced (per-trial keys)
        assert r["response"] == reference[r["trial_id"]]["response"]


@pytest.mark.parametrize("extra,message", [
    (["--config.colour=3"], "unknown config field 'colour'"),
    (["--config.words=('Dust','Dust')"], "repeats ['Dust']"),
    (["--config.layers=0,7"], "layer 7 is beyond the model"),
    (["--config.strengths=1.0,nan"], "finite"),
])
def test_bad_config_is_refused_and_nothing_written(checkpoint, tmp_path, extra, message):
    out = tmp_path / "bad"
    proc = run(sweep_cmd(checkpoint, out, *extra), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (out / "trials.jsonl").exists()


def test_results_folder_of_another_config_is_refused(checkpoint, tmp_path):
    out = tmp_path / "run"
    run(sweep_cmd(checkpoint, out, "--noreport"))
    before = (out / "trials.jsonl").read_bytes()
    proc = run(sweep_cmd(checkpoint, out, "--noreport", "--config.strengths=2.0,4.0"), check=False)
    assert proc.returncode != 0 and "another config" in proc.stderr
    assert (out / "trials.jsonl").read_bytes() == before


def test_missing_checkpoint_is_refused(tmp_path):
    proc = run(sweep_cmd(str(tmp_path / "nope"), tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine", ["shared", "plain"])
def test_whole_grid_compiles_once_per_prompt_bucket(checkpoint, tmp_path, engine):
    """Rows of a batch differ in word, layer, strength and control: one generation program, for
    the sweep engine (one per call shape) and for plain batches (one per batch shape)."""
    import jax_introspect
    from jax_introspect import engine as engine_lib
    from jax_introspect import generate
    from jax_introspect.experiment import sweep
    from configs.sweeps import quickstart
    config = quickstart.get_config().replace(
        words=["Dust", "Snow", "Milk"], layers=[0, 1], strengths=[0.5, 1.0, 2.0, 4.0], trials_per_cell=2,
        control_trials=4, max_new_tokens=3, batch_size=8, baseline_words=["Desks", "Sand"], engine=engine,
        batches_per_call=2)
    lm = jax_introspect.load(checkpoint)
    # Another test in this process may have compiled this very shape already: start from none.
    generate.generate_tokens.clear_cache()
    engine_lib.run.clear_cache()
    summary = sweep.run_sweep(lm, config, str(tmp_path / "grid"), progress=False)
    assert summary["ran"] == 2 * 4 * 2 + 4  # 36 trials: 3 engine calls of 16, 5 plain batches of 8
    programs = {"shared": engine_lib.run, "plain": generate.generate_tokens}
    assert programs[engine]._cache_size() == 1
    assert [p._cache_size() for e, p in programs.items() if e != engine] == [0]


def test_engine_and_plain_batches_give_the_same_texts_trial_by_trial(checkpoint, tmp_path):
    """The sweep engine (shared prefix, one prefill per cell, slot refill) changes no text: every
    trial's response equals plain batched generation's (sampled, float32; per-trial keys)."""
    import jax_introspect
    from jax_introspect.experiment import sweep
    from configs.sweeps import quickstart
    config = quickstart.get_config().replace(
        words=["Dust", "Snow", "Milk"], layers=[0, 1], strengths=[1.0, 4.0], trials_per_cell=3, control_trials=5,
        max_new_tokens=8, batch_size=4, batches_per_call=3, baseline_words=["Desks", "Sand"], temperature=1.0)
    lm = jax_introspect.load(checkpoint)
    texts = {}
    for engine in ("plain", "shared"):
        sweep.run_sweep(lm, config.replace(engine=engine), str(tmp_path / engine), progress=False)
        rows = read_jsonl(tmp_path / engine / "trials.jsonl")
        texts[engine] = {r["trial_id"]: (r["response"], r["n_tokens"], r["finished"]) for r in rows}
    assert len(texts["plain"]) == 2 * 2 * 3 + 5
    assert texts["shared"] == texts["plain"]


def test_grading_failure_keeps_responses_and_resume_grades_them(checkpoint, tmp_path, monkeypatch):
    import jax_introspect
    from jax_introspect.experiment import grading, results, sweep
    from configs.sweeps import quickstart
    config = quickstart.get_config().replace(
        words=["Dust", "Snow"], layers=[0, 1], strengths=[1.0, 4.0], trials_per_cell=2, control_trials=3,
        max_new_tokens=5, batch_size=4, batches_per_call=1, baseline_words=["Desks", "Sand"])
    lm = jax_introspect.load(checkpoint)
    real = grading.make_grader("heuristic")

    class FailsOnce(grading.Grader):
        name = real.name
        calls = 0

        def grade(self, requests, progress=False):
            FailsOnce.calls += 1
            if FailsOnce.calls == 2:  # the second batch: two graded, then the judge fails
                raise grading.GradingError("judge unreachable", partial=real.grade(requests[:2]),
                                           trial_id=requests[2].trial_id)
            return real.grade(requests)

    monkeypatch.setattr(grading, "make_grader", lambda spec, **kw: FailsOnce())
    out = str(tmp_path / "run")
    with pytest.raises(sweep.SweepError, match="grading failed at trial .*re-run"):
        sweep.run_sweep(lm, config, out, progress=False)
    graded = list(results.read_records(os.path.join(out, "trials.jsonl")))
    kept = list(results.read_records(os.path.join(out, "ungraded.jsonl")))
    assert len(graded) == 4 + 2 and len(kept) == 2

    reference = sweep.run_sweep(lm, config, str(tmp_path / "reference"), progress=False)
    summary = sweep.run_sweep(lm, config, out, progress=False)
    assert summary["ran"] == EXPECTED_TRIALS - 8  # the two kept responses were graded, not regenerated
    final = list(results.read_records(os.path.join(out, "trials.jsonl")))
    assert len(final) == len({r.trial_id for r in final}) == EXPECTED_TRIALS
    assert not os.path.exists(os.path.join(out, "ungraded.jsonl"))
    by_id = {r.trial_id: r for r in final}
    for r in kept:
        assert by_id[r.trial_id].response == r.response and by_id[r.trial_id].grades
    ref_records = {r.trial_id: r.response for r in results.read_records(reference["results"])}
    assert {k: v.response for k, v in by_id.items()} == ref_records
