"""The on-disk cache for the default tokenizer and pre-tokenized corpora: content-keyed, atomic."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def cache_root(configured: str | None) -> Path:
    """``data.cache_dir``, else ``$OLMO_MINI_CACHE``, else ``~/.cache/olmo_mini``."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("OLMO_MINI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "olmo_mini"


def content_key(payload: dict) -> str:
    """A short stable hash of a JSON-able description of what an entry was built from."""
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first if absent.

    ``build`` fills a private temporary folder that is then renamed into place, so a reader never
    sees a half-written entry and concurrent builders (several ranks) cannot corrupt each other:
    the first rename wins and later builders discard their copy.
    """
    if target.is_dir():
        return target
    log.info(f"building {target.name} under {target.parent} (once; later runs reuse it)")
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
        log.info(f"built {target.name} in {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
