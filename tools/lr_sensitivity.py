"""LR sensitivity of each arm of a learning-rate sweep (Wortsman et al. 2023, §2.2).

    python tools/lr_sensitivity.py multirun/2025-01-01/12-00-00 --out study_out
    python tools/lr_sensitivity.py outputs/run_a outputs/run_b ... --out study_out

Runs are grouped into arms by their config differences other than optim.lr (e.g.
model.qk_norm x optim.z_loss). Writes final_loss_vs_lr.png, max_logit_by_layer.png and
lr_sensitivity.md into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from olmo_mini.analysis.runs import run_tool
from olmo_mini.analysis.sweep import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run dirs, wandb offline-run folders or sweep folders holding them",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    return run_tool(args.run_dirs, lambda runs: write_report(runs, args.out))


if __name__ == "__main__":
    sys.exit(main())
