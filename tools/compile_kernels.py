"""Compile every Triton kernel launch of the shipped model configs for real GPU targets, without a
GPU, and print the kernel table (registers, spills, shared memory, launch configuration); see
``olmo_mini.kernels.aot``.

    python tools/compile_kernels.py [--targets sm_80 sm_90 gfx942] [--configs configs/model]
"""

from __future__ import annotations

import sys

from olmo_mini.kernels.aot import main

if __name__ == "__main__":
    sys.exit(main())
