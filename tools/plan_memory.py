"""Per-device memory of a training config, to size a cluster job: the analytic plan
(``olmo_mini.sizing.memory``) and, with ``--trace``, one training step traced at the config's
world size on one CPU process (``olmo_mini.bench.trace``).

    python tools/plan_memory.py model=olmo2_7b trainer=fsdp trainer.devices=8 \
        data.micro_batch_size=2 data.seq_len=4096
    python tools/plan_memory.py --json model=olmo2_1b trainer=fsdp trainer.devices=2
    python tools/plan_memory.py --trace model=olmo2_1b trainer=fsdp trainer.devices=8 \
        data.micro_batch_size=4 data.seq_len=4096 data.global_batch_size=1024
    python tools/plan_memory.py --shipped    # docs/scaling.md's traced-vs-planned table
"""

from __future__ import annotations

import sys

from olmo_mini.bench.trace import main

if __name__ == "__main__":
    sys.exit(main())
