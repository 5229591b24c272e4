"""`contentv-rlhf report`: one self-contained HTML page of a run (videos, pairs, curves, eval table)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Write a self-contained HTML report of a run: base vs tuned videos, pair examples, curves, eval table."
EXAMPLES = """\
  contentv-rlhf report --run quickstart-out                  # a pipeline run (run.json)
  contentv-rlhf report --run runs/dpo-r0 --out /tmp/dpo-r0.html --examples 3   # a training run
  contentv-rlhf report --run runs/eval-r0                    # an eval directory
  contentv-rlhf report --run runs/online                     # an online run (every round)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_dir", required=True, metavar="DIR",
                        help="Run directory: a quickstart/pipeline run (run.json), `train --output-dir`, "
                             "`eval --out` or `online --out`.")
    parser.add_argument("--out", metavar="FILE.html", default=None,
                        help="Where to write the page (default: DIR/report.html).")
    parser.add_argument("--examples", type=int, default=2, metavar="N",
                        help="Preference pairs shown at each end of the margin range (default: 2).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing report at the output path (never a file of another kind).")


def run(args: argparse.Namespace) -> int:
    from rlhf.errors import UserError
    from rlhf.outputs import REPORT, check_output, remove_stale_temporaries_of
    from rlhf.report import REPORT_FILE, write_report

    if args.examples < 0:
        raise UserError(f"--examples must be >= 0, got {args.examples}")
    # The page may lie inside the run it shows (the default does); recognising it as a report keeps it from
    # replacing any file of the run.
    out = check_output(args.out or Path(args.run_dir) / REPORT_FILE, field="--out", kind=REPORT, inputs={},
                       overwrite=args.overwrite)
    remove_stale_temporaries_of(out)  # what a killed report into the same file left
    path = write_report(args.run_dir, out, examples=args.examples)
    page = path.read_text(encoding="utf-8")
    videos, plots = page.count("<video "), page.count('<svg class="plot"')
    print(f"report written to {path} ({len(page) / 2**20:.1f} MiB, {videos} videos, {plots} plots)")
    return 0
