r"""Write a report (report.md, summary.json, heatmap PNGs) over graded trials, e.g.

    python -m launch.report --results=runs/sweep1
    python -m launch.report --results=runs/sweep1 \
        --compare=../shared/data/replication_405b_layer84_canonical.judged.json

--results / --compare accept a results folder (holding trials.jsonl), a trials .jsonl file, or the judged
.json of the 405B replication. Default --out: <results folder>/report, or <stem>_report beside a .json.
"""
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("results", None, "Results folder, trials .jsonl, or judged 405B replication .json.")
    flags.DEFINE_string("compare", None, "Optional second run (same accepted formats) shown side by side.")
    flags.DEFINE_string("out", None, "Output folder (default: <results folder>/report, or <stem>_report "
                        "beside a .json file). Replaced only if empty or an earlier report.")
    flags.mark_flag_as_required("results")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    from jax_introspect.experiment import report
    try:
        run = report.load_run(FLAGS.results)
        other = report.load_run(FLAGS.compare) if FLAGS.compare else None
        out = FLAGS.out or report.default_out_dir(FLAGS.results)
        path = report.write_report(run, out, compare=other)
    except (report.ReportError, OSError) as e:
        sys.exit(f"error: {e}")
    for warning in report.read_warnings(path):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report written: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
