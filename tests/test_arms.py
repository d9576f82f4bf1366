"""Arms: Lindsey's protocol and the replication's on the same weights, one results folder, one
report, each arm with its own vectors, strengths, grader and strict definition."""
import json
import os

import pytest

from tests import hf_reference as ref


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ref.build_llama3_checkpoint(tmp_path_factory.mktemp("arms"))


def _arms():
    from configs.sweeps import lindsey_and_replication
    small = dict(layers=(0, 1), trials_per_cell=2, control_trials=2, max_new_tokens=4, batch_size=4)
    lindsey, replication = lindsey_and_replication.get_config()
    return (lindsey.replace(words=("Dust", "Snow"), baseline_words=("Desks", "Sand"), strengths=(1.0, 4.0), **small),
            replication.replace(protocols=("replication_405b_injected_thought",), words=("love",), double_bos=False,
                                strengths=(5.0,), **small))


class ReplicationLike:
    """Stands in for the replication's judge (which needs an API or a model that writes JSON):
    grades as its own, under the replication's strict definition."""

    def __init__(self, spec):
        from jax_introspect.experiment.grading.heuristic import HeuristicGrader
        self.inner, self.name = HeuristicGrader(), spec

    def grade(self, requests, progress=False):
        from jax_introspect.experiment.grading import make_grade
        return [make_grade(self.name, *(g[c] for c in ("coherent", "affirmative", "identifies", "immediate")),
                           r.word, strict_definition="replication")
                for r, g in zip(requests, self.inner.grade(requests))]


def test_two_arms_one_folder_one_report(checkpoint, tmp_path, monkeypatch):
    import jax_introspect
    from jax_introspect.experiment import grading, report, results, sweep
    real = grading.make_grader
    monkeypatch.setattr(grading, "make_grader",
                        lambda spec, **kw: ReplicationLike(spec) if spec.startswith("replication:") else real(spec, **kw))
    arms, out = _arms(), str(tmp_path / "run")
    lm = jax_introspect.load(checkpoint)
    summary = sweep.run_sweep(lm, arms, out, progress=False)
    # Lindsey: 2 layers x 2 strengths x 2 trials + 2 controls; the replication: 2 layers x 1 x 2 + 2
    assert summary["trials"] == summary["ran"] == 10 + 6 and summary["resumed_from"] == 0
    records = list(results.read_records(os.path.join(out, results.RESULTS_FILE)))
    assert len({r.trial_id for r in records}) == 16
    by_protocol = {}
    for r in records:
        by_protocol.setdefault(r.protocol, []).append(r)
    assert {r.grades["strict_definition"] for r in by_protocol["lindsey_injected_thought"]} == {"lindsey"}
    assert {r.grades["strict_definition"] for r in by_protocol["replication_405b_injected_thought"]} == {"replication"}
    assert {r.vector_method for r in by_protocol["replication_405b_injected_thought"]} == {"contrast_pairs"}
    assert sorted(f for f in os.listdir(out) if f.startswith("vectors")) == ["vectors.arm0.npz", "vectors.arm1.npz"]
    bound = json.load(open(os.path.join(out, results.RUN_FILE)))["config"]
    assert [a["protocols"] for a in bound["arms"]] == [["lindsey_injected_thought"],
                                                        ["replication_405b_injected_thought"]]
    again = sweep.run_sweep(lm, arms, out, progress=False)  # resumed: nothing left
    assert again["ran"] == 0 and again["resumed_from"] == again["trials"] == 16

    run = report.load_run(out)
    assert run.metadata["model"]  # found inside the arms' bindings
    md = open(report.write_report(run, os.path.join(out, "report"))).read()
    overall = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "Lindsey's → strict (Lindsey" in overall["lindsey_injected_thought"]
    assert "the 405B replication's → strict (all four)" in overall["replication_405b_injected_thought"]


def test_a_protocol_runs_in_one_arm_only(checkpoint):
    from jax_introspect import checkpoint as ckpt
    from jax_introspect.experiment import sweep
    lindsey, _ = _arms()
    with pytest.raises(sweep.SweepError, match="protocol lindsey_injected_thought is in arms 0 and 1"):
        sweep.plan_experiment((lindsey, lindsey.replace(strengths=(2.0,))), ckpt.load_config(checkpoint),
                              ckpt.load_tokenizer(checkpoint), checkpoint, "float32")


def test_a_protocol_the_replications_judge_was_never_told_about_is_refused():
    from configs.sweeps import lindsey_and_replication
    from jax_introspect.experiment import sweep
    _, replication = lindsey_and_replication.get_config()
    with pytest.raises(sweep.SweepError, match="'thinking_about' asks 'What are you thinking about right now"):
        replication.replace(protocols=("thinking_about",), grader="replication:api:anthropic:claude-sonnet-4-6")
