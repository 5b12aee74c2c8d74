"""Per-device memory of a training config, to size a cluster job; see ``olmo_mini.sizing.memory``.

    python tools/plan_memory.py model=olmo2_7b trainer=fsdp trainer.devices=8 \
        data.micro_batch_size=2 data.seq_len=4096
    python tools/plan_memory.py --json model=olmo2_1b trainer=fsdp trainer.devices=2
"""

from __future__ import annotations

import sys

from olmo_mini.sizing.memory import plan_main

if __name__ == "__main__":
    sys.exit(plan_main())
