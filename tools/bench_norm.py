"""Benchmark the Triton norm kernels on a CUDA GPU; see ``olmo_mini.kernels.bench``.

    python tools/bench_norm.py --out-dir bench_out [--m 4096 16384] [--d 128 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from olmo_mini.kernels import bench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("bench_norm_out"))
    parser.add_argument("--m", type=int, nargs="+", default=list(bench.M_VALUES), help="rows")
    parser.add_argument("--d", type=int, nargs="+", default=list(bench.D_VALUES), help="columns")
    parser.add_argument("--ops", nargs="+", choices=bench.OPS, default=list(bench.OPS))
    parser.add_argument("--providers", nargs="+", choices=bench.PROVIDERS,
                        default=list(bench.PROVIDERS))
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    sys.exit(bench.main(args.out_dir, args.m, args.d, args.ops, args.providers))
