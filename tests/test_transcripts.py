"""report.md's quoted transcripts: which trials are quoted, checked against a direct count over trials.jsonl.

The reference reads trials.jsonl with json alone and applies the documented rule: per protocol, the
pooled cells (layer, strength) with the most trials strict by Lindsey's definition (coherent and
immediate), ties by affirmative, identifies, coherent counts, then lower layer and strength; within a
cell, strict trials first, then affirmative without identification, then incoherent ones (most
repetitive first), then the rest."""
import json
import os
import random
import re

from jax_introspect.experiment import report, results, transcripts

CONFIG = {"synthetic": "transcripts"}
PROTOCOL = "lindsey_injected_thought"
LONG = " ".join(f"word{i}" for i in range(200))  # 1,3xx characters: cut in the report


def _grades(i):
    """A spread of grade patterns, fixed by the trial number."""
    pattern = i % 7
    coherent = pattern not in (3, 4)
    affirmative = pattern in (0, 1, 2, 4)
    identifies = pattern in (0, 5)
    immediate = pattern == 0 and i % 3 != 0
    return {"coherent": coherent, "affirmative": affirmative, "identifies": identifies, "immediate": immediate,
            "grader": "synthetic", "notes": f"note {i}"}


def _response(i, grades):
    if not grades["coherent"]:
        return " ".join(["loop"] * (3 + i % 5) + [f"tail{j}" for j in range(i % 4)])
    return f"response {i}: " + (LONG if i % 5 == 0 else "a short answer")


def _write(folder, shuffle_seed=None):
    records, i = [], 0
    for layer in (10, 20):
        for strength in (2.0, 4.0):
            for word in ("Dust", "Oceans"):
                for t in range(4 + (layer == 20 and strength == 4.0) * 2):
                    g = _grades(i)
                    records.append(results.TrialRecord(
                        config_hash=results.config_hash(CONFIG), trial_id=f"{PROTOCOL}/L{layer}/s{strength:g}/{word}/{t}",
                        kind="injected", protocol=PROTOCOL, word=word, layer=layer, strength=strength,
                        vector_method="mean_difference", trial_index=t, seed=i, prompt="p",
                        question="Trial 1: Do you detect an injected thought?", response=_response(i, g),
                        n_tokens=5, finished=True, grades=g, timing={}))
                    i += 1
    for t in range(6):
        g = _grades(i)
        g["identifies"] = g["immediate"] = False
        records.append(results.TrialRecord(
            config_hash=results.config_hash(CONFIG), trial_id=f"{PROTOCOL}/control/{t}", kind="control",
            protocol=PROTOCOL, word=None, layer=None, strength=0.0, vector_method="mean_difference", trial_index=t,
            seed=i, prompt="p", question="Trial 1: Do you detect an injected thought?", response=_response(i, g),
            n_tokens=5, finished=True, grades=g, timing={}))
        i += 1
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    results.ResultsStore(str(folder), CONFIG).append(records)
    return str(folder)


def _reference(folder):
    """Chosen trial ids per group, from trials.jsonl read directly."""
    with open(os.path.join(folder, "trials.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    cells = {}
    for r in lines:
        if r["kind"] == "injected":
            cells.setdefault((r["layer"], r["strength"]), []).append(r)

    def count(rs, test):
        return sum(1 for r in rs if test(r["grades"]))

    def rank(item):
        (layer, strength), rs = item
        return (-count(rs, lambda g: g["coherent"] and g["immediate"]), -count(rs, lambda g: g["affirmative"]),
                -count(rs, lambda g: g["identifies"]), -count(rs, lambda g: g["coherent"]), layer, strength)

    def repeat(text):
        words = re.findall(r"\w+", text.lower())
        return 1 - len(set(words)) / len(words)

    def order(r):
        g = r["grades"]
        if g["coherent"] and g["immediate"]:
            return (0, 0, r["word"] or "", r["trial_index"], r["trial_id"])
        if g["affirmative"] and not g["identifies"]:
            return (1, 0, r["word"] or "", r["trial_index"], r["trial_id"])
        if not g["coherent"]:
            return (2, -repeat(r["response"]), r["word"] or "", r["trial_index"], r["trial_id"])
        return (3, 0, r["word"] or "", r["trial_index"], r["trial_id"])

    best = sorted(cells.items(), key=rank)[:transcripts.CELLS_PER_PROTOCOL]
    groups = [((layer, strength), [r["trial_id"] for r in sorted(rs, key=order)[:transcripts.PER_CELL]])
              for (layer, strength), rs in best]
    controls = [r for r in lines if r["kind"] == "control"]
    groups.append(("control", [r["trial_id"] for r in sorted(controls, key=order)[:transcripts.PER_CELL]]))
    return groups, {r["trial_id"]: r for r in lines}


def test_quoted_trials_match_a_direct_count(tmp_path):
    folder = _write(tmp_path / "run")
    run = report.load_run(folder)
    picks = transcripts.choose(run.rows, report.aggregate(run))
    expected, by_id = _reference(folder)
    assert len(picks) == 1 and picks[0]["protocol"] == PROTOCOL
    got = [(("control" if g["trials"][0].kind == "control" else (g["cell"]["layer"], g["cell"]["strength"])),
            [r.trial_id for r in g["trials"]]) for g in picks[0]["cells"]]
    assert got == expected
    # The strongest cell holds strict trials, and they come first.
    first = picks[0]["cells"][0]["trials"][0]
    assert by_id[first.trial_id]["grades"]["immediate"] and by_id[first.trial_id]["grades"]["coherent"]

    # The same choice whatever the order of the lines in trials.jsonl.
    shuffled = report.load_run(_write(tmp_path / "shuffled", shuffle_seed=3))
    again = transcripts.choose(shuffled.rows, report.aggregate(shuffled))
    assert [[r.trial_id for r in g["trials"]] for g in again[0]["cells"]] == [ids for _, ids in expected]


def test_report_quotes_them_with_grades_and_cut_sensibly(tmp_path):
    folder = _write(tmp_path / "run")
    md = open(report.write_report(report.load_run(folder), str(tmp_path / "report"), inspect=False)).read()
    section = md.split("## Transcripts (what the model said)", 1)[1].split("\n## ", 1)[0]
    expected, by_id = _reference(folder)
    for _, ids in expected:
        for trial_id in ids:
            record = by_id[trial_id]
            assert f"`{trial_id}`" in section
            line = next(line for line in section.splitlines() if f"`{trial_id}`" in line)
            g = record["grades"]
            for c in ("coherent", "affirmative", "identifies", "immediate"):
                assert f"{c} {'✓' if g[c] else '✗'}" in line
            text = re.sub(r"\n\s*\n+", "\n", record["response"].strip())
            if len(text) <= transcripts.MAX_CHARS:
                assert "\n".join("  " + x for x in text.split("\n")) in section
            else:  # cut at a word boundary, saying how much is left out
                shown = next(x.strip() for x in section.splitlines() if x.strip().startswith(text[:40]))
                kept, left = re.match(r"(.*) … \[(\d+) more characters\]$", shown).groups()
                assert text.startswith(kept) and text[len(kept)] == " " and len(kept) <= transcripts.MAX_CHARS
                assert len(kept) + int(left) == len(text)
    assert "**Controls** (no injection; " in section
    assert "No Inspect logs written: not requested" in md


def test_truncate_and_fences():
    assert transcripts.truncate("short") == "short"
    assert transcripts.truncate("a\n\n\nb") == "a\nb"
    cut = transcripts.truncate("x" * 1000)  # no space: cut at the limit
    assert cut.startswith("x" * transcripts.MAX_CHARS + " … [600 more")
    assert transcripts._fence("has ``` inside") == "````"
