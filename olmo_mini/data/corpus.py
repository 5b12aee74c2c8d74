"""Document sources: the embedded stdlib corpus and local text/jsonl/parquet files.

A document is one string. Sources yield ``(split_key, text)`` pairs; the split key decides
train vs validation by hash, so the split is deterministic and independent of file order.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def is_val(key: str, val_fraction: float) -> bool:
    """Deterministic held-out membership: the key's hash, read as a fraction, is below the cut."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


@functools.lru_cache(maxsize=8)
def stdlib_files(max_docs: int | None = None) -> tuple[Path, ...]:
    """Every ``.py`` under the stdlib in sorted order, site-packages excluded (nothing installed).

    Cached per process: the installation does not change under a running job."""
    excluded = {"site-packages", "dist-packages"}
    files = sorted(
        p
        for p in STDLIB.rglob("*.py")
        if p.is_file() and not excluded & set(p.relative_to(STDLIB).parts)
    )
    if not files:
        raise FileNotFoundError(f"empty corpus: no .py files under the stdlib at {STDLIB}")
    return tuple(files[:max_docs])


def stdlib_documents(max_docs: int | None = None) -> Iterator[tuple[str, str]]:
    """Stdlib sources keyed by their path relative to the stdlib (the issue's path-hash split)."""
    for path in stdlib_files(max_docs):
        yield path.relative_to(STDLIB).as_posix(), path.read_bytes().decode("utf-8", "replace")


@functools.lru_cache(maxsize=8)
def stdlib_hash(max_docs: int | None = None) -> str:
    """Content hash of the stdlib corpus, so caches follow the Python installation."""
    h = hashlib.sha256()
    for path in stdlib_files(max_docs):
        h.update(path.relative_to(STDLIB).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def expand_files(patterns: list[str]) -> list[Path]:
    """Expand globs; a pattern matching nothing, or an unsupported suffix, is an error naming it."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        for match in matches:
            path = Path(match)
            if path.suffix not in TEXT_SUFFIXES:
                raise ValueError(f"unsupported data file {path}: expected one of {TEXT_SUFFIXES}")
            paths.append(path)
    return paths


def file_documents(
    paths: list[Path], text_field: str = "text", max_docs: int | None = None
) -> Iterator[tuple[str, str]]:
    """Documents of local files, keyed by their text: a ``.txt`` file is one document, a
    ``.jsonl`` line or ``.parquet`` row is one document (its ``text_field``)."""
    texts = (text for path in paths for text in _read_file(path, text_field))
    for text in itertools.islice(texts, max_docs):
        yield text, text


def files_hash(paths: list[Path], text_field: str, max_docs: int | None) -> str:
    """Content hash of local files, the key of their cached shards."""
    h = hashlib.sha256(json.dumps([text_field, max_docs]).encode())
    for path in paths:
        h.update(str(path.resolve()).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise KeyError(
                        f"{path}:{lineno}: expected an object with a string field {text_field!r}"
                    )
                yield row[text_field]
    else:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise KeyError(
                f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names})"
            )
        for batch in table.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise ValueError(f"{path}: a {text_field!r} value is not a string: {text!r}")
                yield text
