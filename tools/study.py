"""Run a stability study plan (studies/<plan>.yaml), resumably, and render its report.

    python tools/study.py --plan A --out /path/to/study-runs/A --report docs/stability-study/A

Every run of the plan trains in this process, one after another, in <out>/<run id>; runs whose
result.json exists are skipped, so the same command continues an interrupted study. Every
run's config is composed before the first trains: a misspelled override stops the study at once.
Then <report> gets summary.csv (one row per run), <plan>.md and the figures. --render-only
redraws the report from the completed runs without training. --workers N trains in N processes
sharing <out> (each run is claimed with a lock, so each trains once), each with cores/N threads
unless --threads says otherwise; --no-report trains only (a cluster array task: render
afterwards with --render-only). --wandb logs every run it trains to wandb
(<plan>/<arm>/lr<LR>/s<seed>, grouped by the plan) and then the report as the plan's summary run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from olmo_mini.analysis.runs import check_output_folder
from olmo_mini.analysis.study import (
    StudyError,
    completed_rows,
    load_plan,
    pooled_std,
    read_rows,
    render,
    run_plan,
)
from olmo_mini.analysis.study_wandb import log_summary, run_labels
from olmo_mini.startup import quiet_third_party


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="a name in studies/ or a .yaml path")
    parser.add_argument("--out", type=Path, required=True, help="folder of the plan's run dirs")
    parser.add_argument("--report", type=Path, help="report folder (default: <out>/report)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads per run (1 wastes least CPU on a busy machine)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="train in N local processes sharing --out (threads: cores/N each)",
    )
    parser.add_argument("--render-only", action="store_true", help="report completed runs only")
    parser.add_argument("--no-report", action="store_true", help="train only; no report")
    parser.add_argument(
        "--seed-spread",
        type=Path,
        metavar="CSV",
        help="a seeds plan's summary.csv: add each arm's sensitivity std under that noise",
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="log the runs trained now and the report's tables and figures to wandb",
    )
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logging.getLogger("olmo_mini").addHandler(handler)
    logging.getLogger("olmo_mini").setLevel(logging.INFO)
    quiet_third_party()  # as train.py: no GPU/TPU, litlogger or AMP lines per run
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 1
    try:
        check_output_folder(args.out)
        if args.report is not None:
            check_output_folder(args.report, "--report")
        plan = load_plan(args.plan)
        if args.render_only:
            rows, ran = completed_rows(plan, args.out), 0
        elif args.workers > 1:
            before = len(completed_rows(plan, args.out))
            threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
            failed = run_workers(args.plan, args.out, args.workers, threads, args.wandb)
            if failed:
                raise StudyError(f"worker(s) {', '.join(map(str, failed))} failed (output above)")
            rows = completed_rows(plan, args.out)
            ran = len(rows) - before
        else:
            if args.threads is not None:
                import torch

                torch.set_num_threads(args.threads)
            rows, ran = run_plan(plan, args.out, run_labels(plan) if args.wandb else None)
        if args.no_report:
            print(f"plan {plan.name}: {ran} runs trained by this process")
            return 0
        sigma = None
        if args.seed_spread is not None:
            sigma = pooled_std(read_rows(args.seed_spread))
            if not math.isfinite(sigma):
                raise StudyError(f"{args.seed_spread}: no grid point was run with several seeds")
        written = render(plan, rows, args.report or args.out / "report", args.out, sigma)
        if args.wandb:
            summary = log_summary(plan, rows, written, args.out)
            written += [summary] if summary is not None else []
    except ValueError as err:  # a StudyError, or a --out that is a file
        print(f"error: {err}", file=sys.stderr)
        return 1
    workers = f" by {args.workers} workers" if args.workers > 1 and not args.render_only else ""
    print(
        f"plan {plan.name}: {len(rows)} of {len(plan.runs())} runs complete, "
        f"{ran} trained now{workers}"
    )
    print("\n".join(str(p) for p in written))
    return 0


def run_workers(plan: str, out: Path, workers: int, threads: int, wandb: bool) -> list[int]:
    """Train ``plan`` in ``workers`` processes of this tool (``--no-report``) sharing ``out``;
    their output is relayed line by line behind ``w<k>``. Returns the numbers of those that
    failed."""
    command = [sys.executable, __file__, "--plan", str(plan), "--out", str(out)]
    command += ["--threads", str(threads), "--no-report", *(["--wandb"] if wandb else [])]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(workers)
    ]
    relays = [
        threading.Thread(target=_relay, args=(proc.stdout, f"w{k} "))
        for k, proc in enumerate(procs, start=1)
    ]
    for relay in relays:
        relay.start()
    for relay in relays:
        relay.join()
    return [k for k, proc in enumerate(procs, start=1) if proc.wait() != 0]


def _relay(stream: IO[str], prefix: str) -> None:
    for line in stream:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
