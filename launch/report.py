r"""Write a report (report.md, summary.json, heatmap PNGs) over graded trials, e.g.

    python -m launch.report --results=runs/sweep1
    python -m launch.report --results=runs/sweep1 \
        --compare=../shared/data/replication_405b_layer84_canonical.judged.json
    python -m launch.report --results=../shared/data/replication_405b_layer84_canonical.judged.json \
        --inspect --out=/tmp/405b_report

--results / --compare accept a results folder (holding trials.jsonl), a trials .jsonl file, or the judged
.json of the 405B replication. Default --out: <results folder>/report, or <stem>_report beside a .json.
The report folder also holds each run as an Inspect log (inspect_logs/*.eval) and a static viewer of
them (inspect_viewer/index.html) when inspect_ai is installed; --inspect requires them (an error naming
`pip install 'jax_introspect[inspect]'` without it), --noinspect leaves them out.
"""
import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("results", None, "Results folder, trials .jsonl, or judged 405B replication .json.")
    flags.DEFINE_string("compare", None, "Optional second run (same accepted formats) shown side by side.")
    flags.DEFINE_string("out", None, "Output folder (default: <results folder>/report, or <stem>_report "
                        "beside a .json file). Replaced only if empty or an earlier report.")
    flags.DEFINE_bool("inspect", None, "Write the runs as Inspect logs (inspect_logs/*.eval) and a static viewer "
                      "(inspect_viewer/) into the report folder: --inspect requires inspect_ai, --noinspect skips "
                      "them; unset: written when inspect_ai is importable.")
    flags.mark_flag_as_required("results")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    from jax_introspect.experiment import report
    try:
        run = report.load_run(FLAGS.results)
        other = report.load_run(FLAGS.compare) if FLAGS.compare else None
        out = FLAGS.out or report.default_out_dir(FLAGS.results)
        path = report.write_report(run, out, compare=other, inspect=FLAGS.inspect)
    except (report.ReportError, OSError) as e:
        sys.exit(f"error: {e}")
    for warning in report.read_warnings(path):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report written: {path}")
    with open(os.path.join(os.path.dirname(path), report.SUMMARY_FILE)) as f:
        inspect = json.load(f).get("inspect", {})
    if inspect.get("viewer"):
        print(f"inspect logs: {', '.join(inspect['logs'])}; viewer: {inspect['viewer']} (in {os.path.dirname(path)})")
    else:
        print(f"inspect logs: none ({inspect.get('reason')})")


if __name__ == "__main__":
    define_flags()
    app.run(main)
