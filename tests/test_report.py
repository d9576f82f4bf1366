"""Report: loading both formats, per-cell counts and Wilson intervals, markdown/JSON/PNG outputs, the CLI.

References are independent of the code under test: the 405B replication file's own `aggregates`
(computed by its authors), Wilson intervals from the textbook formula and published values, and
synthetic trials whose counts are fixed by construction."""
import json
import math
import os
import subprocess
import sys

import pytest

from jax_introspect.experiment import render, report, results, stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
JUDGED_405B = os.path.join(SHARED_DATA, "replication_405b_layer84_canonical.judged.json")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MEASURES = ("coherent", "affirmative", "identifies", "immediate", "strict_introspection", "strict_lindsey")

# Synthetic run. Injected cells: (protocol, layer, strength, word) -> trials and counts of
# (coherent, affirmative, identifies, immediate). Trial t satisfies a criterion iff t < its count, so
# strict introspection (all four) holds for exactly min(counts) trials.
SPEC = {
    ("lindsey_injected_thought", 10, 2.0, "Dust"): (5, (5, 0, 0, 0)),
    ("lindsey_injected_thought", 10, 2.0, "Oceans"): (5, (5, 1, 1, 1)),
    ("lindsey_injected_thought", 10, 4.0, "Dust"): (5, (4, 2, 3, 2)),
    ("lindsey_injected_thought", 10, 4.0, "Oceans"): (5, (3, 3, 2, 1)),
    ("lindsey_injected_thought", 20, 2.0, "Dust"): (5, (5, 1, 0, 1)),
    ("lindsey_injected_thought", 20, 2.0, "Oceans"): (5, (4, 2, 2, 2)),
    ("lindsey_injected_thought", 20, 4.0, "Dust"): (5, (2, 4, 5, 3)),
    ("lindsey_injected_thought", 20, 4.0, "Oceans"): (5, (1, 5, 5, 5)),
    ("replication_405b_thinking_about", 84, 10.0, "love"): (4, (3, 1, 2, 1)),  # shares a cell with the 405B file
}
# Controls: protocol -> (n, affirmative count); all coherent, none identify/immediate.
CONTROLS = {"lindsey_injected_thought": (10, 2), "replication_405b_thinking_about": (4, 0)}
CRITERIA = ("coherent", "affirmative", "identifies", "immediate")
CONFIG = {"synthetic": True, "model": "tiny-llama"}


def _expected_counts(n, counts):
    out = dict(zip(CRITERIA, counts))
    out["strict_introspection"] = min(counts)
    out["strict_lindsey"] = min(out["coherent"], out["immediate"])  # Lindsey's: coherent and immediate
    return n, out


def _record(i, kind, protocol, word, layer, strength, grades):
    return results.TrialRecord(
        config_hash=results.config_hash(CONFIG), trial_id=f"t{i}", kind=kind, protocol=protocol,
        word=word, layer=layer, strength=strength, vector_method="contrast", trial_index=i, seed=i,
        prompt="p", question="q", response="r", n_tokens=3, finished=True, grades=grades,
        timing={"batch_seconds": 0.1, "batch_size": 1, "unix_time": 0})


def _write_synthetic(folder, with_ungraded=True):
    store = results.ResultsStore(str(folder), CONFIG)
    recs, i = [], 0
    for (protocol, layer, strength, word), (n, counts) in SPEC.items():
        for t in range(n):
            grades = {c: t < k for c, k in zip(CRITERIA, counts)}
            grades.update(grader="synthetic_grader", notes="")
            recs.append(_record(i, "injected", protocol, word, layer, strength, grades))
            i += 1
    for protocol, (n, aff) in CONTROLS.items():
        for t in range(n):
            grades = {"coherent": True, "affirmative": t < aff, "identifies": False, "immediate": False,
                      "grader": "synthetic_grader", "notes": ""}
            recs.append(_record(i, "control", protocol, None, None, 0.0, grades))
            i += 1
    if with_ungraded:
        recs.append(_record(i, "injected", "lindsey_injected_thought", "Dust", 10, 2.0, {}))
    store.append(recs)
    return str(folder)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.report", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _md_table(md, heading):
    """Rows (dicts keyed by header) of the first table after the line starting with `heading`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif table:
            break
    header, rows = table[0], table[2:]
    return [dict(zip(header, row)) for row in rows]


def _check_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 100 and image.shape[2] in (3, 4)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return _write_synthetic(tmp_path_factory.mktemp("run") / "sweep")


# ------------------------------------------------------------------------------------------------
# Wilson intervals


@pytest.mark.parametrize("k,n,low,high", [
    (0, 20, 0.0, 0.1611), (5, 20, 0.1119, 0.4687),    # published / textbook values
    (20, 20, 0.8389, 1.0), (0, 400, 0.0, 0.0095), (0, 80, 0.0, 0.0458),
])
def test_wilson_known_values(k, n, low, high):
    got = stats.wilson(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def _textbook_wilson(k, n, z=1.959963984540054):
    """Wilson (1927): centre (p + z^2/2n) / (1 + z^2/n), half-width z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)."""
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return centre - half, centre + half


def test_wilson_against_the_formula():
    import scipy.special
    assert stats.Z95 == scipy.special.ndtri(0.975)  # the z summary.json records is the one scipy uses
    for k, n in [(0, 1), (1, 1), (0, 20), (5, 20), (7, 40), (13, 400), (34, 400), (99, 100), (1, 3)]:
        assert stats.wilson(k, n) == pytest.approx(_textbook_wilson(k, n), abs=1e-9), (k, n)
    assert stats.wilson(0, 7)[0] == 0.0 and stats.wilson(7, 7)[1] == 1.0  # exact ends
    assert stats.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson(3, 2)


# ------------------------------------------------------------------------------------------------
# The 405B replication file


def test_405b_file_reproduces_its_own_aggregates(tmp_path):
    assert os.path.isfile(JUDGED_405B), f"shared data missing: {JUDGED_405B}"
    out = tmp_path / "rep"
    proc = _cli(f"--results={JUDGED_405B}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert str(out / "report.md") in proc.stdout
    with open(JUDGED_405B) as f:
        source = json.load(f)
    with open(out / "summary.json") as f:
        summary = json.load(f)

    protocol = {"lindsey": "replication_405b_injected_thought", "alt": "replication_405b_thinking_about"}
    ours = {(c["protocol"], c["word"], c["strength"]): c for c in summary["cells"]}
    ours.update({(c["protocol"], None, 0.0): c for c in summary["controls"]})
    assert len(source["aggregates"]) == 22
    assert len(summary["cells"]) + len(summary["controls"]) == 22
    for agg in source["aggregates"]:
        prompt, _, rest = agg["label"].partition("_")
        key = (protocol[prompt], None if rest == "control" else rest, float(agg["magnitude"]))
        cell = ours[key]
        assert cell["n"] == agg["n"], agg["label"]
        # the file counts the replication's measures (strict = all four); ours adds Lindsey's strict
        assert {m: cell["counts"][m] for m in agg["counts"]} == agg["counts"], (agg["label"], agg["magnitude"])
        for m in agg["counts"]:
            assert cell["rates"][m] == pytest.approx(agg["rates"][m]), (agg["label"], m)
            assert cell["wilson"][m] == pytest.approx(list(stats.wilson(agg["counts"][m], agg["n"])))
        assert cell["strict_definitions"] == ["replication"]
        if rest != "control":
            assert cell["layer"] == source["layer"] == 84
    assert summary["source_aggregates_check"]["match"] is True

    overall = summary["overall"]["all"]
    assert (overall["injected"]["counts"]["strict_introspection"], overall["injected"]["n"]) == (0, 400)
    assert (overall["false_positive"]["k"], overall["false_positive"]["n"]) == (0, 80)
    assert overall["control"]["counts"]["affirmative"] == 0
    md = (out / "report.md").read_text()
    assert "claude-sonnet-4-6" in md and "Llama-3.1-405B-Instruct-FP8-dynamic" in md
    row = next(r for r in _md_table(md, "## Overall") if r["protocol"] == "**all protocols**")
    assert row["strict (all four)"].startswith("0/400 (")
    assert row["grader's strict"] == "the 405B replication's → strict (all four)"
    assert row["false positives (affirmative on controls)"].startswith("0/80 (")
    for name in ("heatmap_replication_405b_injected_thought.png", "heatmap_replication_405b_thinking_about.png"):
        _check_png(out / name)


# ------------------------------------------------------------------------------------------------
# Our own results


def test_synthetic_run_counts_tables_and_pngs(synthetic, tmp_path):
    out = tmp_path / "rep"
    proc = _cli(f"--results={synthetic}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    with open(out / "summary.json") as f:
        summary = json.load(f)
    md = (out / "report.md").read_text()

    meta = summary["run"]
    assert meta["model"] == "tiny-llama" and meta["grader"] == "synthetic_grader"
    assert meta["config_hash"] == results.config_hash(CONFIG)
    n_inj = sum(n for n, _ in SPEC.values())
    n_ctl = sum(n for n, _ in CONTROLS.values())
    assert (meta["n_records"], meta["n_ungraded"], meta["n_injected"], meta["n_control"]) == (
        n_inj + n_ctl + 1, 1, n_inj, n_ctl)

    # per-word cells
    cells = {(c["protocol"], c["layer"], c["strength"], c["word"]): c for c in summary["cells"]}
    assert set(cells) == set(SPEC)
    for key, (n, counts) in SPEC.items():
        n, expected = _expected_counts(n, counts)
        assert cells[key]["n"] == n and cells[key]["counts"] == expected, key
        for m in MEASURES:
            assert cells[key]["wilson"][m] == pytest.approx(list(stats.wilson(expected[m], n)))

    # pooled over words, by hand from SPEC
    pooled_expected = {}
    for (protocol, layer, strength, _), (n, counts) in SPEC.items():
        n, exp = _expected_counts(n, counts)
        tot = pooled_expected.setdefault((protocol, layer, strength), {"n": 0, **{m: 0 for m in MEASURES}})
        tot["n"] += n
        for m in MEASURES:
            tot[m] += exp[m]
    pooled = {(c["protocol"], c["layer"], c["strength"]): c for c in summary["pooled"]}
    assert set(pooled) == set(pooled_expected)
    assert all(c["word"] == "all" for c in summary["pooled"])
    for key, tot in pooled_expected.items():
        assert pooled[key]["n"] == tot["n"]
        assert pooled[key]["counts"] == {m: tot[m] for m in MEASURES}, key
    assert pooled[("lindsey_injected_thought", 20, 4.0)]["counts"] == {
        "coherent": 3, "affirmative": 9, "identifies": 10, "immediate": 8, "strict_introspection": 3,
        "strict_lindsey": 3}

    # markdown tables say the same
    md_pooled = _md_table(md, "## Injected trials, pooled over words")
    assert len(md_pooled) == len(pooled_expected)
    for row in md_pooled:
        tot = pooled_expected[(row["protocol"], int(row["layer"]), float(row["strength"]))]
        assert int(row["n"]) == tot["n"]
        assert row["strict (all four)"].startswith(f"{tot['strict_introspection']}/{tot['n']} (")
        assert row["coherent"].startswith(f"{tot['coherent']}/{tot['n']} (")
    md_words = _md_table(md, "## Injected trials per word")
    assert len(md_words) == len(SPEC)
    row = next(r for r in md_words if (r["layer"], r["strength"], r["word"]) == ("10", "4", "Dust"))
    assert row["identifies"] == "3/5 (60.0% [23.1, 88.2])"
    assert row["strict (all four)"].startswith("2/5 (40.0% [")

    # controls and false positives
    controls = {c["protocol"]: c for c in summary["controls"]}
    assert set(controls) == set(CONTROLS)
    for protocol, (n, aff) in CONTROLS.items():
        fp = controls[protocol]["false_positive"]
        assert (fp["k"], fp["n"]) == (aff, n)
        assert (fp["low"], fp["high"]) == pytest.approx(stats.wilson(aff, n))
    md_ctl = {r["protocol"]: r for r in _md_table(md, "## Controls")}
    assert md_ctl["lindsey_injected_thought"]["false positives (affirmative)"].startswith("2/10 (20.0% [")

    overall = summary["overall"]["all"]
    assert overall["injected"]["n"] == n_inj
    assert overall["injected"]["counts"]["strict_introspection"] == sum(min(c) for _, c in SPEC.values())
    assert (overall["false_positive"]["k"], overall["false_positive"]["n"]) == (2, n_ctl)

    for name in ("heatmap_lindsey_injected_thought.png", "heatmap_replication_405b_thinking_about.png"):
        assert name in md and name in summary["files"]
        _check_png(out / name)


def test_default_out_dir_and_jsonl_path(synthetic):
    jsonl = os.path.join(synthetic, results.RESULTS_FILE)
    run = report.load_run(jsonl)
    assert run.metadata["model"] == "tiny-llama"  # run.json beside the .jsonl is read
    assert report.default_out_dir(synthetic) == os.path.join(synthetic, "report")
    assert report.default_out_dir(jsonl) == os.path.join(synthetic, "report")
    assert report.default_out_dir("/x/y.judged.json") == "/x/y.judged_report"
    proc = _cli(f"--results={synthetic}")
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(os.path.join(synthetic, "report", "report.md"))
    proc = _cli(f"--results={synthetic}")  # an earlier report is replaced
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(synthetic)) == sorted(["report", results.RESULTS_FILE, results.RUN_FILE])


# ------------------------------------------------------------------------------------------------
# Comparison


def test_compare_synthetic_with_405b(synthetic, tmp_path):
    out = tmp_path / "cmp"
    proc = _cli(f"--results={synthetic}", f"--compare={JUDGED_405B}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert "## Run A: `sweep`" in md and "## Run B: `replication_405b_layer84_canonical.judged`" in md
    side = {r["measure"]: r for r in _md_table(md, "### Overall rates, side by side")}
    n_inj = sum(n for n, _ in SPEC.values())
    assert side["strict (all four) (injected)"]["A"].startswith(
        f"{sum(min(c) for _, c in SPEC.values())}/{n_inj} (")
    assert side["strict (all four) (injected)"]["B"].startswith("0/400 (")
    assert side["false positives (affirmative on controls)"]["B"].startswith("0/80 (")
    assert side["coherent (injected)"]["B"].startswith("137/400 (")

    shared = _md_table(md, "### Shared cells")
    keys = {(r["protocol"], r["layer"], r["strength"], r["word"]) for r in shared}
    assert keys == {("replication_405b_thinking_about", "84", "10", "all (1 / 2 words)"),
                    ("replication_405b_thinking_about", "84", "10", "love")}
    love = next(r for r in shared if r["word"] == "love")
    # ours: 4 trials (3, 1, 2, 1); 405B alt_love at 10: n 20, identifies 6, coherent 9
    assert love["n (A / B)"] == "4 / 20"
    assert love["identifies: A vs B"].startswith("2/4 (") and " vs 6/20 (" in love["identifies: A vs B"]
    assert love["coherent: A vs B"].startswith("3/4 (") and " vs 9/20 (" in love["coherent: A vs B"]
    assert len(summary["compare"]["shared_cells"]) == 2
    assert {p["a"]["protocol"] for p in summary["compare"]["shared_controls"]} == {"replication_405b_thinking_about"}
    assert summary["compare"]["run"]["overall"]["all"]["injected"]["n"] == 400
    for name in summary["files"]:
        if name.endswith(".png"):
            _check_png(out / name)
    assert "compare_heatmap_replication_405b_injected_thought.png" in summary["files"]


def test_each_protocol_keeps_its_graders_strict_definition(tmp_path):
    """Lindsey's strict (coherent and immediate) beside the replication's (all four), and each
    protocol's own named; cells of two protocols never meet, whatever their layer and strength."""
    store = results.ResultsStore(str(tmp_path / "run"), CONFIG)
    recs = []
    for i, (a, b, c, d) in enumerate([(1, 0, 0, 1), (1, 1, 1, 1), (1, 0, 1, 0), (0, 1, 1, 1)]):
        base = {"coherent": bool(a), "affirmative": bool(b), "identifies": bool(c), "immediate": bool(d), "notes": ""}
        recs.append(_record(i, "injected", "lindsey_injected_thought", "love", 84, 10.0,
                            dict(base, grader="heuristic-v2", strict_definition="lindsey")))
        recs.append(_record(10 + i, "injected", "replication_405b_injected_thought", "love", 84, 10.0,
                            dict(base, grader="replication:llm:judge", strict_definition="replication")))
    store.append(recs)
    summary = report.aggregate(report.load_run(str(tmp_path / "run")))
    by_protocol = {c["protocol"]: c for c in summary["cells"]}
    lindsey, replication = by_protocol["lindsey_injected_thought"], by_protocol["replication_405b_injected_thought"]
    # the same four grades: coherent and immediate hold in 2, all four in 1
    for cell in (lindsey, replication):
        assert (cell["counts"]["strict_lindsey"], cell["counts"]["strict_introspection"]) == (2, 1)
    assert lindsey["strict_definitions"] == ["lindsey"] and replication["strict_definitions"] == ["replication"]
    # against the 405B file, only the replication protocol's cell has a partner (layer 84, strength 10, love)
    other = report.aggregate(report.load_run(JUDGED_405B))
    pairs = report.aggregation.shared_cells(summary, other)
    assert {x["protocol"] for x, _ in pairs} == {"replication_405b_injected_thought"}


def test_compare_without_shared_cells_shows_both(synthetic, tmp_path):
    ours = report.load_run(synthetic)
    ours.rows = [r for r in ours.rows if r.protocol == "lindsey_injected_thought"]
    path = report.write_report(report.load_run(JUDGED_405B), str(tmp_path / "cmp"), compare=ours)
    md = open(path).read()
    assert "No injected cells in common" in md
    assert "## Run A: `replication_405b_layer84_canonical.judged`" in md and "## Run B: `sweep`" in md
    assert md.count("Injected trials, pooled over words") == 2


# ------------------------------------------------------------------------------------------------
# Bad input


def _assert_fails(args, out, *fragments):
    proc = _cli(*args, f"--out={out}")
    assert proc.returncode != 0
    assert "error:" in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    assert not os.path.exists(os.path.join(out, "report.md"))
    return proc


def test_bad_inputs(tmp_path):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope.json")
    _assert_fails([f"--results={missing}"], out, missing, "no such file")

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": []}))
    _assert_fails([f"--results={other}"], out, str(other), "another shape", "accepted formats")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    _assert_fails([f"--results={listed}"], out, str(listed), "accepted formats")

    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / results.RESULTS_FILE).write_text("")
    _assert_fails([f"--results={empty}"], out, "empty results")
    _assert_fails([f"--results={empty / results.RESULTS_FILE}"], out, "empty results")

    no_trials = tmp_path / "no_trials"
    no_trials.mkdir()
    _assert_fails([f"--results={no_trials}"], out, "holds no trials.jsonl")
    text = tmp_path / "x.csv"
    text.write_text("a,b\n")
    _assert_fails([f"--results={text}"], out, "unknown format")
    # a good run with a bad --compare writes nothing either
    _assert_fails([f"--results={JUDGED_405B}", f"--compare={missing}"], out, missing)
    assert not os.path.exists(out)


def test_refuses_foreign_out_dir_and_leaves_nothing_on_failure(synthetic, tmp_path, monkeypatch):
    run = report.load_run(synthetic)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(report.ReportError, match="not a report folder"):
        report.write_report(run, str(foreign))
    assert os.listdir(foreign) == ["keep.txt"]

    def boom(*args, **kwargs):
        raise RuntimeError("plotting failed")
    monkeypatch.setattr(render, "heatmaps", boom)
    with pytest.raises(RuntimeError):
        report.write_report(run, str(tmp_path / "partial"))
    assert sorted(os.listdir(tmp_path)) == ["foreign"]  # no out dir, no temp dir left
