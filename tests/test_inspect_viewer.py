"""The report folder's Inspect viewer, opened from disk (file://, no server, no network) in headless
Chromium: the rendered DOM lists both runs (ours and the 405B replication's), and inside each the run's
samples with their ids, responses and score columns. Needs Debian's `chromium` (launch/setup_env.sh
installs it when apt-get is at hand)."""
import pytest

from jax_introspect.experiment import inspect_log, report
from launch import inspect_browser
from tests.test_report import JUDGED_405B
from tests.test_transcripts import _write


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    if inspect_browser.chromium_binary() is None:
        pytest.fail("no chromium on PATH: apt-get install -y chromium (launch/setup_env.sh does it)")
    root = tmp_path_factory.mktemp("viewer")
    ours = report.load_run(_write(root / "ours"))
    theirs = report.load_run(JUDGED_405B)
    out = root / "report"
    report.write_report(ours, str(out), compare=theirs, inspect=True)
    return out / inspect_log.VIEWER_DIR, ours, theirs


def _check(result):
    assert not result["missing"], (f"the viewer lacks {result['missing']}; it shows:\n{result['text'][-3000:]}\n"
                                   f"console: {result['console'][-10:]}\nerrors: {result['errors'][-10:]}")


def test_bundle_opens_from_disk_and_shows_samples_and_scores(viewer, tmp_path):
    bundle, ours, theirs = viewer
    # The list of logs: both runs with their models.
    _check(inspect_browser.render(str(bundle), expect=[ours.name, theirs.name, "jax_introspect/", "replication_405b/"],
                                  timeout=120))
    # Into each run: its samples (ids and responses, as many as the list renders) and a column per score.
    for run, shot in ((ours, tmp_path / "ours.png"), (theirs, None)):
        result = inspect_browser.render(str(bundle), click_text=run.name, screenshot=shot and str(shot), timeout=120,
                                        expect=[f"{len(run.rows)} Samples", "COHERENT", "AFFIRMATIVE", "IDENTIFIES",
                                                "STRICT_INTROSPECTION"])
        _check(result)
        shown = [r for r in run.rows if f"\n{r.trial_id}\n" in f"\n{result['text']}\n"]
        assert len(shown) >= 5, result["text"][-3000:]
        for r in shown:  # each listed sample with its own response (the viewer shortens long ones)
            assert " ".join(r.response.split())[:40] in " ".join(result["text"].split()), r.trial_id
    shot = tmp_path / "ours.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
