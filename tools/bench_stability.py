"""Throughput of training with and without the stability monitor; see ``olmo_mini.bench.stability``.

python tools/bench_stability.py                      # olmo2_tiny, default batch, 40 steps
python tools/bench_stability.py model=olmo2_small trainer.accelerator=gpu --steps 60
"""

import sys

from olmo_mini.bench.stability import main

if __name__ == "__main__":
    sys.exit(main())
