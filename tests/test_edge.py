"""The edge search (experiment/edge.py) against a known coherence-vs-strength curve.

A fake grader makes trial i of a cell at strength s coherent iff its stratum ((5 i) mod 8 + 0.5) / 8
is below f(s) = 1 / (1 + exp(K (s - s0))): the first 8m trials of any cell hold exactly m per
stratum, so the measured coherent rate is #{j in 0..7: (j + 0.5) / 8 < f(s)} / 8, monotone in s,
and it stays above 0.5 exactly while f(s) > 4.5 / 8: the measured rate falls to 0.5 at
s0 + ln(3.5 / 4.5) / K (a closed form, independent of the search). The search must bracket it within the tolerance."""
import json
import math
import os

import pytest

from tests import hf_reference as ref

K = 4.0
S0 = {0: 5.3, 1: 11.7}  # the curve's 50% point per layer
STRATA = 8


def coherent(layer: int, strength: float, index: int) -> bool:
    f = 1.0 / (1.0 + math.exp(K * (strength - S0[layer])))
    return ((5 * index) % STRATA + 0.5) / STRATA < f


def measured_crossing(layer: int) -> float:
    """Where the measured rate (probes of a multiple of 8 trials) falls to 0.5: f(s) = 4.5 / 8."""
    return S0[layer] + math.log((1 - 4.5 / STRATA) / (4.5 / STRATA)) / K


def _config(**changes):
    from jax_introspect.experiment.sweep_config import SweepConfig
    base = dict(words=("Dust", "Snow"), baseline_words=("Desks", "Sand"), layers=(0, 1), strengths=(1.0, 17.0),
                edge_search=True, edge_tolerance=1.0, edge_probe_trials=8, edge_budget=72, edge_dense_strengths=3,
                control_trials=2, max_new_tokens=3, batch_size=8, batches_per_call=2, trials_per_cell=8)
    base.update(changes)
    return SweepConfig(**base)


def _fake_measure(log):
    def measure(asks):
        log.append(asks)
        return {(layer, s): (sum(coherent(layer, s, i) for i in range(n)), n) for layer, s, n in asks}
    return measure


def test_bisection_brackets_the_known_crossing_within_the_tolerance():
    from jax_introspect.experiment import edge
    config = _config()
    log = []
    edges = edge.search(config, [0, 1], _fake_measure(log))
    for e in edges:
        truth = measured_crossing(e.layer)
        assert e.status == "done"
        assert e.high - e.low <= config.edge_tolerance
        assert e.low <= truth <= e.high, (e.layer, e.low, e.high, truth)
        assert abs(e.estimate(config.edge_target) - S0[e.layer]) <= config.edge_tolerance
        assert e.used <= config.edge_budget
    # endpoints, then 4 halvings of a 16-wide bracket to 1, then the dense phase: 6 calls
    assert len(log) == 1 + 4 + 1


def test_out_of_range_layers_are_reported_not_searched():
    from jax_introspect.experiment import edge
    log = []
    edges = edge.search(_config(strengths=(6.0, 9.0)), [0, 1], _fake_measure(log))  # layer 0 falls at 5.3, 1 at 11.7
    assert [e.status for e in edges] == ["below_range", "above_range"]
    assert len(log) == 1


def test_edge_config_is_checked():
    from jax_introspect.experiment.sweep_config import SweepError
    with pytest.raises(SweepError, match="further apart than edge_tolerance"):
        _config(strengths=(4.0,))
    with pytest.raises(SweepError, match="cell_per_word"):
        _config(cell_per_word=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ref.build_llama3_checkpoint(tmp_path_factory.mktemp("edge"))


@pytest.fixture
def fake_grader(monkeypatch):
    from jax_introspect.experiment import grading

    class KnownCurve(grading.Grader):
        name = "known-curve"

        def grade(self, requests, progress=False):
            out = []
            for r in requests:
                parts = r.trial_id.split("/")
                ok = True if r.word is None else coherent(int(parts[1][1:]), r.strength, int(parts[-1]))
                out.append(grading.make_grade(self.name, ok, False, False, False, r.word))
            return out
    monkeypatch.setattr(grading, "make_grader", lambda spec, **kw: KnownCurve())


class Stop(Exception):
    pass


def _injected_per_layer(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    counts = {}
    for r in rows:
        if r["kind"] == "injected":
            counts[r["layer"]] = counts.get(r["layer"], 0) + 1
    return rows, counts


def test_edge_sweep_on_a_tiny_model_finds_the_crossing_resumes_and_saves_trials(checkpoint, tmp_path, fake_grader):
    """Through run_sweep (generation, readout, grading, the results file): the brackets hold the
    known crossings; a run stopped after its third generation call and run again ends with the same
    records and edge.json as an uninterrupted run; it ran fewer trials than the dense grid."""
    import jax_introspect
    from jax_introspect.experiment import sweep
    lm = jax_introspect.load(checkpoint)
    config = _config()
    whole = str(tmp_path / "whole")
    summary = sweep.run_sweep(lm, config, whole, progress=False)
    with open(os.path.join(whole, "edge.json")) as f:
        found = json.load(f)
    assert summary["edge"] == [found]
    rows, per_layer = _injected_per_layer(os.path.join(whole, "trials.jsonl"))
    for layer in found["layers"]:
        low, high = layer["bracket"]
        assert high - low <= config.edge_tolerance and low <= measured_crossing(layer["layer"]) <= high
        # trial counts, from the results file itself, against the grid it replaces (17 strengths)
        assert layer["trials_used"] == per_layer[layer["layer"]] <= config.edge_budget
        assert layer["dense_grid_trials"] == 17 * layer["dense_grid_per_strength"] > per_layer[layer["layer"]]
    assert len(rows) == summary["trials"] == sum(per_layer.values()) + 2

    calls = []

    def stop_at_third(number):
        calls.append(number)
        if len(calls) == 3:
            raise Stop()
    part = str(tmp_path / "resumed")
    with pytest.raises(Stop):
        sweep.run_sweep(lm, config, part, progress=False, on_batch=stop_at_third)
    first, _ = _injected_per_layer(os.path.join(part, "trials.jsonl"))
    assert 0 < len(first) < len(rows) and not os.path.exists(os.path.join(part, "edge.json"))
    again = sweep.run_sweep(lm, config, part, progress=False)
    assert again["ran"] == len(rows) - len(first)
    resumed, _ = _injected_per_layer(os.path.join(part, "trials.jsonl"))
    def key(r):
        return r["trial_id"], r["response"], r["grades"]["coherent"]
    assert sorted(map(key, resumed)) == sorted(map(key, rows))
    with open(os.path.join(part, "edge.json")) as f:
        assert json.load(f) == found
    assert sweep.run_sweep(lm, config, part, progress=False)["ran"] == 0  # done: a re-run runs nothing
