"""Writing whole-tensor values into parameters that may be FSDP2 shards (DTensors).

Every rank computes (or reads) the same whole tensor and keeps only its own part, sliced
locally by the parameter's placements: no communication, and the values equal those of the
unsharded model for any world size. One whole tensor exists at a time, so the peak memory of an
initialization or a load is the rank's shards plus the largest parameter (and, for an init,
the scratch its init function needs: up to four more copies for torch's ``trunc_normal_``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def write_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Set ``target`` to ``full`` (same shape); a DTensor ``target`` takes only its local part."""
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(
            f"shape {tuple(full.shape)} does not fit the model's {tuple(target.shape)}"
        )
    with torch.no_grad():
        if isinstance(target, DTensor):
            # src_data_rank=None: every rank holds ``full`` already; slice, do not scatter.
            part = distribute_tensor(
                full, target.device_mesh, target.placements, src_data_rank=None
            )
            target.to_local().copy_(part.to_local())
        else:
            target.copy_(full)


def init_(target: torch.Tensor, init: Callable[[torch.Tensor], object]) -> None:
    """Run the in-place ``init`` on ``target`` as if it were whole.

    A DTensor gets its part of a whole CPU tensor that ``init`` filled: a seeded CPU generator
    then advances exactly as in the unsharded init, so both give the same bits.
    """
    if isinstance(target, DTensor):
        full = torch.empty(target.shape, dtype=target.dtype)
        init(full)
        write_full_(target, full)
        del full
        release_freed_memory()
    else:
        init(target)


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``).

    After a large tensor is freed glibc raises its mmap threshold, so the next whole tensors come
    from the heap, where the long-lived shards between them keep the freed pages resident: without
    this the RSS of a sharded init grows by a good part of the model. A no-op off glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)
