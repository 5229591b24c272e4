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


def run(args: argparse.Namespace) -> int:
    from rlhf.errors import UserError
    from rlhf.io import output_path_problem
    from rlhf.report import write_report

    if args.examples < 0:
        raise UserError(f"--examples must be >= 0, got {args.examples}")
    out = args.out or Path(args.run_dir) / "report.html"  # write_report's default
    if problem := output_path_problem(out, "file"):
        raise UserError(f"--out {problem}")
    path = write_report(args.run_dir, args.out, examples=args.examples)
    page = path.read_text(encoding="utf-8")
    videos, plots = page.count("<video "), page.count('<svg class="plot"')
    print(f"report written to {path} ({len(page) / 2**20:.1f} MiB, {videos} videos, {plots} plots)")
    return 0
