"""Validate the GPU paths (the ``gpu`` test tier, norm-kernel and training-step benchmarks) and
write ``gpu_check_out/gpu_check.md``; see ``olmo_mini.bench.gpu_check``.

    python tools/gpu_check.py [--out-dir gpu_check_out]
"""

from __future__ import annotations

import sys

from olmo_mini.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
