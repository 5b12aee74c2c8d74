"""Training-step throughput of olmo-mini vs transformers' Olmo2; see ``olmo_mini.bench.train``.

python tools/bench_train.py                      # issue 8's target size, default modes
python tools/bench_train.py --toy --repeats 2    # seconds
python tools/bench_train.py --olmo-modes fp32+eager bf16+eager+full-ce --hf-modes fp32+eager
"""

import sys

from olmo_mini.bench.train import main

if __name__ == "__main__":
    sys.exit(main())
