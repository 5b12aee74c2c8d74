"""Measured per-rank memory of building (and one step of) a config; see ``olmo_mini.bench.memory``.

    python tools/bench_memory.py --nproc 2 --stop-after init model=olmo2_1b trainer=fsdp
    python tools/bench_memory.py --nproc 2 --stop-after backward model=olmo2_1b trainer=fsdp \
        data.micro_batch_size=1 data.seq_len=64 trainer.precision=32-true

One JSON line per rank: rank, world_size, stage, param_bytes (the whole model), peak_bytes (peak
RSS on CPU, max_memory_allocated on GPU), and more.
"""

import sys

from olmo_mini.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
