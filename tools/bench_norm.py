"""Benchmark the Triton norm kernels on a CUDA GPU; see ``olmo_mini.bench.norm``.

python tools/bench_norm.py --out-dir bench_out [--m 4096 16384] [--d 128 4096]
"""

import sys

from olmo_mini.bench.norm import main

if __name__ == "__main__":
    sys.exit(main())
