"""Find the edge automatically: per layer, the injection strength at which coherence falls to a target.

Lindsey's best results sit where the strength is high enough to notice but low enough to stay
coherent; the 405B replication hand-tuned a dense grid around that edge. With
`SweepConfig.edge_search`, a sweep instead, for every layer at once (lockstep, so each step is
one generation call over all layers):

1. probes the ends of the bracket [min(strengths), max(strengths)] with `edge_probe_trials`
   injected trials each, graded: a layer whose low end is already at or below the target (or whose
   high end is still above it) is reported as such and searched no further;
2. bisects: probes the bracket's midpoint, keeps the half where the coherent rate falls to the
   target (rate > target: the crossing is above; rate <= target: it is at or below), until the
   bracket is at most `edge_tolerance` wide;
3. spends the rest of the layer's `edge_budget` injected trials evenly over `edge_dense_strengths`
   strengths spread over [low - tolerance, high + tolerance] around the final bracket (trials
   already run at one of them count).

The crossing is the final bracket (the bisection's guarantee, for a monotone curve measured
exactly) and a point estimate from every measured strength of the layer: the linear interpolation
between the adjacent strengths whose pooled coherent rates straddle the target, closest to the
bracket. Coherent = the grader's `coherent` criterion, pooled over the sweep's protocols; each probe
is `plan_trials`' cell at that layer and strength (trial ids PROTOCOL/L<layer>/s<strength>/<word>/<i>
as a grid sweep's; more trials at a strength extend its cell), so the steps
are run by the sweep's own machinery (`sweep._run`: generate, readout, grade, append) and a re-run
replays the search from the results file: trials on disk are not run again, the decisions are the
same, and it continues where it stopped. `edge.json` in the results folder holds the outcome.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional

from jax_introspect.experiment.sweep_config import SweepConfig

EDGE_FILE = "edge.json"
ROUND = 4  # strengths are rounded to this many decimals (trial ids print them with %g)


@dataclasses.dataclass
class LayerEdge:
    layer: int
    low: float
    high: float
    status: str = "bisecting"  # bisecting | dense | done | below_range | above_range
    counts: dict = dataclasses.field(default_factory=dict)  # strength -> [coherent, graded]
    trials: dict = dataclasses.field(default_factory=dict)  # strength -> trials run there (indices 0..n-1)
    bisection_steps: int = 0

    def rate(self, strength: float) -> Optional[float]:
        k, n = self.counts.get(strength, (0, 0))
        return k / n if n else None

    @property
    def used(self) -> int:
        return sum(self.trials.values())

    def estimate(self, target: float) -> Optional[float]:
        """The strength where the pooled coherent rate falls to `target`, linearly interpolated between the
        adjacent measured strengths whose rates straddle it (above, then at or below), the pair closest
        to the bracket's middle."""
        points = sorted((s, self.rate(s)) for s in self.counts if self.rate(s) is not None)
        middle = (self.low + self.high) / 2
        found = []
        for (s0, r0), (s1, r1) in zip(points, points[1:]):
            if r0 > target >= r1:
                found.append(s0 + (s1 - s0) * (r0 - target) / (r0 - r1))
        return min(found, key=lambda s: abs(s - middle)) if found else None


def _mid(low: float, high: float) -> float:
    return round((low + high) / 2, ROUND)


def dense_strengths(low: float, high: float, tolerance: float, count: int) -> list:
    """`count` strengths evenly over [low - tolerance, high + tolerance] (>= 0), rounded."""
    start, stop = max(0.0, low - tolerance), high + tolerance
    if count == 1:
        return [_mid(low, high)]
    return sorted({round(start + (stop - start) * i / (count - 1), ROUND) for i in range(count)})


def grid_trials(config: SweepConfig, per_strength: int) -> int:
    """Injected trials per layer of the dense grid the search replaces: every strength from the
    bracket's low end to its high end at a step of the tolerance, `per_strength` trials each."""
    low, high = min(config.strengths), max(config.strengths)
    return (int(math.floor((high - low) / config.edge_tolerance + 1e-9)) + 1) * per_strength


Measure = Callable[[list], dict]  # [(layer, strength, n_trials)] -> {(layer, strength): (coherent, graded)}


def search(config: SweepConfig, layers: list, measure: Measure) -> list:
    """Run the search over `layers`; `measure` runs (or reads back) the first n trials of each asked
    (layer, strength) cell and returns their coherent and graded counts. Returns the LayerEdges."""
    low, high = float(min(config.strengths)), float(max(config.strengths))
    edges = [LayerEdge(layer, low, high) for layer in layers]
    n = config.edge_probe_trials

    def ask(wants: list) -> None:  # [(edge, strength, trials there in total)]
        counts = measure([(e.layer, s, total) for e, s, total in wants])
        for e, s, total in wants:
            e.counts[s] = list(counts[(e.layer, s)])
            e.trials[s] = max(e.trials.get(s, 0), total)

    ask([(e, s, n) for e in edges for s in (low, high)])
    for e in edges:
        if e.rate(low) is None or e.rate(high) is None:
            e.status = "ungraded"
        elif e.rate(low) <= config.edge_target:
            e.status = "below_range"
        elif e.rate(high) > config.edge_target:
            e.status = "above_range"
        elif e.high - e.low <= config.edge_tolerance:
            e.status = "dense"
    while any(e.status == "bisecting" for e in edges):
        active = [e for e in edges if e.status == "bisecting"]
        ask([(e, _mid(e.low, e.high), max(n, e.trials.get(_mid(e.low, e.high), 0))) for e in active])
        for e in active:
            mid = _mid(e.low, e.high)
            e.bisection_steps += 1
            rate = e.rate(mid)
            if rate is None:
                e.status = "ungraded"
                continue
            if rate > config.edge_target:
                e.low = mid
            else:
                e.high = mid
            if e.high - e.low <= config.edge_tolerance:
                e.status = "dense"
    dense = [e for e in edges if e.status == "dense"]
    wants = []
    for e in dense:
        strengths = dense_strengths(e.low, e.high, config.edge_tolerance, config.edge_dense_strengths)
        outside = sum(t for s, t in e.trials.items() if s not in strengths)
        per_strength = max(0, config.edge_budget - outside) // len(strengths)
        wants += [(e, s, max(per_strength, e.trials.get(s, 0))) for s in strengths]
    if wants:
        ask(wants)
    for e in dense:
        e.status = "done"
    return edges


def summary(config: SweepConfig, edges: list) -> dict:
    """edge.json's content: per layer the bracket, the estimate, the probes, trials used vs the grid."""
    layers = []
    for e in edges:
        per_strength = max(e.trials.values()) if e.trials else config.edge_probe_trials
        layers.append({
            "layer": e.layer, "status": e.status, "bracket": [e.low, e.high], "bracket_width": round(e.high - e.low, 6),
            "estimate": e.estimate(config.edge_target), "bisection_steps": e.bisection_steps,
            "points": [{"strength": s, "coherent": e.counts[s][0], "graded": e.counts[s][1], "trials": e.trials[s]}
                       for s in sorted(e.counts)],
            "trials_used": e.used, "dense_grid_per_strength": per_strength,
            "dense_grid_trials": grid_trials(config, per_strength)})
    return {"target": config.edge_target, "tolerance": config.edge_tolerance,
            "range": [min(config.strengths), max(config.strengths)], "probe_trials": config.edge_probe_trials,
            "budget_per_layer": config.edge_budget, "dense_strengths": config.edge_dense_strengths,
            "criterion": "coherent", "layers": layers,
            "trials_used": sum(l["trials_used"] for l in layers),
            "dense_grid_trials": sum(l["dense_grid_trials"] for l in layers),
            "dense_grid": "every strength of the range at a step of the tolerance, with as many trials as the "
                          "search ran at its most-sampled strength"}


def format_lines(edge: dict) -> list:
    out = [f"edge search: coherence {edge['target']:g} crossing, tolerance {edge['tolerance']:g} (strength), "
           f"range {edge['range']}"]
    for l in edge["layers"]:
        est = "—" if l["estimate"] is None else f"{l['estimate']:.3f}"
        out.append(f"  layer {l['layer']}: {l['status']}, bracket [{l['bracket'][0]:g}, {l['bracket'][1]:g}], "
                   f"estimate {est}; {l['trials_used']} trials vs {l['dense_grid_trials']} for the dense grid")
    out.append(f"  all layers: {edge['trials_used']} injected trials vs {edge['dense_grid_trials']} for the dense grid")
    return out


def run_edge(lm, plan, out: str, store, progress: bool, on_batch, vectors_path: str, config_hash: str) -> dict:
    """The search on a sweep plan (`sweep._run` runs each step's trials); returns `_run`'s summary
    with "edge" (also written to edge.json by the writer)."""
    from jax_introspect import distributed
    from jax_introspect.experiment import files, sweep
    config = plan.config
    totals = {"resumed_from": 0, "ran": 0, "ungraded": 0}
    asked = set()
    graders = sweep.make_graders(config, writer=store is not None)
    calls = [0]

    def run_trials(trials: list) -> None:
        asked.update(t.trial_id for t in trials)
        step = dataclasses.replace(plan, trials=trials)
        result = sweep._run(lm, step, out, store, False, on_batch and (lambda i: on_batch(calls[0] + i)),
                            vectors_path, config_hash, graders=graders)
        calls[0] += -(-result["ran"] // sweep.call_size(config)) if result["ran"] else 0
        for k in totals:
            totals[k] += result[k]

    def cell_trials(layer: int, strength: float, n: int) -> list:
        cell = config.replace(layers=(layer,), strengths=(strength,), trials_per_cell=n, control_trials=0,
                              edge_search=False)
        return sweep.plan_trials(cell, plan.words, [layer])

    def measure(asks: list) -> dict:
        wanted = {(layer, s): cell_trials(layer, s, n) for layer, s, n in asks}
        run_trials([t for trials in wanted.values() for t in trials])
        grades = {}
        if store is not None:
            grades = {r.trial_id: bool(r.grades.get("coherent")) for r in store.records()}
        counts = {f"{layer}/{s!r}": [sum(grades[t.trial_id] for t in trials if t.trial_id in grades),
                                     sum(t.trial_id in grades for t in trials)]
                  for (layer, s), trials in wanted.items()}
        counts = distributed.broadcast_from_primary(counts)  # process 0's store decides for all
        return {(layer, s): counts[f"{layer}/{s!r}"] for layer, s in wanted}

    run_trials([t for t in plan.trials if t.kind == "control"])  # the controls, once, as a sweep runs them
    edges = search(config, plan.layers, measure)
    edge = summary(config, edges)
    if store is not None:
        files.atomic_write_json(os.path.join(out, EDGE_FILE), edge, indent=1, sort_keys=True)
    return dict(totals, trials=len(asked), results=os.path.join(out, "trials.jsonl"), layers=plan.layers, edge=edge)
