"""Throughput accounting: FLOPs per token, datasheet and measured peak FLOP/s, the default
precision. (``olmo_mini.training.run.peak_flops`` adds Lightning's table for other GPUs.)

FLOPs per token (forward + backward), as in PaLM's appendix B and nanoGPT:

    6 * N + 12 * n_layers * d_model * seq_len

``N`` counts every parameter except the token embedding (a lookup, not a matmul): the
non-embedding parameters plus the untied LM head, a matmul. The second term is QK^T and attention x V for forward and backward,
without discounting the causal mask. MFU = tokens/s x FLOPs per token / (peak x devices).
"""

from __future__ import annotations

import re
import time

import torch

from olmo_mini.model import OLMo2, OLMo2Config


def flops_per_token(config: OLMo2Config, seq_len: int) -> float:
    with torch.device("meta"):
        model = OLMo2(config)
    matmul_params = model.num_params(exclude_embeddings=True) + model.lm_head.weight.numel()
    return 6 * matmul_params + 12 * config.n_layers * config.d_model * seq_len


def default_precision(device_type: str) -> str:
    """bf16 autocast where the hardware has bf16 matmuls, fp32 elsewhere.

    Measured on a 2-core AVX512-BF16/AMX Xeon with olmo2_tiny (8 x 256 tokens, fwd + bwd + AdamW):
    32-true 0.35-0.42 s/step, bf16-mixed 0.21-0.23 s/step.
    """
    if device_type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    else:  # AVX512-BF16 or AMX: the CPU multiplies bf16 natively
        bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if bf16 else "32-true"


# Dense bf16 tensor-core peaks from NVIDIA's datasheets (no sparsity), FLOP/s, by name part;
# more specific names first. (Lightning's table lists the sparse figure for some of these.)
GPU_BF16_PEAK = {
    "H200": 989.5e12,
    "H100 SXM": 989.5e12,
    "H100 80GB HBM3": 989.5e12,  # how the SXM part names itself
    "H100 NVL": 835.5e12,
    "H100 PCIe": 756.5e12,
    "H100": 756.5e12,  # other H100 variants: the PCIe figure, the conservative one
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165.2e12,
}


def datasheet_bf16_peak(device_name: str) -> float | None:
    """The dense bf16 datasheet peak of a GPU named ``device_name``, if it is in the table."""
    for part, flops in GPU_BF16_PEAK.items():
        if re.search(rf"\b{re.escape(part)}\b", device_name):  # "L4" is not "L40"
            return flops
    return None


def measure_matmul_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """Best-of-``repeats`` rate of an ``n x n`` matmul on the CPU (about a tenth of a second
    in fp32 on 2 cores; the best because other processes only ever slow a run down)."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = a.t().contiguous()
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
