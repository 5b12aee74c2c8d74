"""Compare training runs: loss curves, per-layer q/k RMS and attention logits, final loss vs LR
and a Markdown summary table.

    python tools/compare_runs.py outputs/2025-01-01/12-00-00 outputs/... --out compare_out
    python tools/compare_runs.py multirun/2025-01-01/12-00-00 --out compare_out   # a whole sweep

A RUN is a Hydra run dir (its wandb/offline-run-* folders, else its csv/ metrics), a
wandb/offline-run-* folder, a folder of run dirs, or entity/project/run_id (needs network).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from olmo_mini.analysis.compare import compare_runs
from olmo_mini.analysis.runs import check_output_folder, run_tool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the PNGs and summary.md"
    )
    parser.add_argument(
        "--names",
        nargs="+",
        help="one label per run (default: the run's name, else its config differences)",
    )
    args = parser.parse_args(argv)
    try:
        check_output_folder(args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return run_tool(args.runs, lambda runs: compare_runs(runs, args.out, args.names))


if __name__ == "__main__":
    sys.exit(main())
