"""File integrity: one content digest for checkpoints and token shards, XXH3-128 (the ``xxhash``
package), and writes that leave a file either absent or complete.

It catches corruption (flipped, overwritten, zeroed bytes), not tampering, at several GB/s per
core, so verifying a checkpoint costs a fraction of loading it (docs/checkpoints.md has numbers);
SHA-256 ran at well under 1 GB/s on the same machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import xxhash

ALGORITHM = "xxh3_128"
_CHUNK = 1 << 24


def file_digest(f: BinaryIO) -> str:
    """The hex digest of what is left to read in the binary file ``f``."""
    digest = xxhash.xxh3_128()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that it is either absent or complete (manifests, records, results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
