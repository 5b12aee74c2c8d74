"""Read training runs into one shape, wherever they were logged, so they can be compared.

A run comes from an offline wandb folder (its ``.wandb`` record log, parsed here with
wandb's protobuf classes because wandb 0.31 ships no Python reader and ``wandb.Api()``
needs a server), from a Hydra run dir (its wandb folders, else its CSVLogger files, so
``logger=none`` runs compare too) or from ``entity/project/run_id`` through the public API.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# The step a row belongs to, most specific first: Lightning's WandbLogger adds
# ``trainer/global_step``; the module logs ``step``; ``_step`` is wandb's own counter, which is
# the optimizer step only when the caller passed ``wandb.log(..., step=...)``.
_STEP_KEYS = ("trainer/global_step", "step", "_step")
# Config keys that say where or how a run was logged, not what was trained.
_BOOKKEEPING_PREFIXES = ("_wandb", "logger.", "checkpoint.", "resume", "hydra.")

_HEADER_MAGIC = b":W&B" + struct.pack("<H", 0xBEE1)
_HEADER_SIZE = 7
_BLOCK_SIZE = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")  # CRC32 of type byte + payload, payload length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class RunReadError(ValueError):
    """A run could not be read; the message names the file or run."""


@dataclass
class Run:
    """A run's flattened config (dotted keys) and its logged rows, each with an int ``step``."""

    name: str  # the name the run was given ("" when none was)
    config: dict[str, Any]
    history: list[dict[str, float]]
    source: str
    notes: list[str] = field(default_factory=list)  # e.g. an incomplete tail that was skipped

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row if k != "step"}

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of one metric, in logged order (rows without it are skipped)."""
        rows = [(row["step"], row[key]) for row in self.history if key in row]
        steps = np.array([s for s, _ in rows], dtype=np.int64)
        return steps, np.array([v for _, v in rows], dtype=np.float64)

    def layer_series(self, group: str, name: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``{layer: series}`` for the metrics ``{group}/layer{i}/{name}``, by layer index."""
        pattern = re.compile(rf"{re.escape(group)}/layer(\d+)/{re.escape(name)}")
        layers = {int(m.group(1)): key for key in self.keys() if (m := pattern.fullmatch(key))}
        return {i: self.series(layers[i]) for i in sorted(layers)}

    def last(self, key: str) -> float:
        """The last logged value of ``key`` (NaN when it was never logged)."""
        _, values = self.series(key)
        return float(values[-1]) if values.size else math.nan

    @property
    def final_step(self) -> int:
        return max((row["step"] for row in self.history), default=0)


def load_run(spec: str | Path) -> Run:
    """A run from an offline wandb folder, a Hydra run dir, or ``entity/project/run_id``."""
    path = Path(spec)
    if path.exists():
        if path.is_file() and path.suffix == ".wandb":
            return load_wandb_offline(path.parent)
        if _wandb_file(path) is not None:
            return load_wandb_offline(path)
        return load_run_dir(path)
    if re.fullmatch(r"[^/\s]+/[^/\s]+/[^/\s]+", str(spec)):
        return load_wandb_api(str(spec))
    raise RunReadError(f"{spec}: no such run folder, and not an entity/project/run_id path")


def find_runs(spec: str | Path) -> list[str]:
    """``spec`` itself when it is a run, else the run dirs below it (e.g. a Hydra multirun sweep)."""
    path = Path(spec)
    if not path.is_dir() or _is_run(path):
        return [str(spec)]
    found = sorted(
        (str(p) for p in path.rglob("*") if p.is_dir() and _is_run(p) and "wandb" not in p.parts),
        key=_natural_key,
    )
    if not found:
        raise RunReadError(f"{spec}: neither a run nor a folder holding runs")
    # A sweep's run dirs hold their own runs (wandb/, csv/); keep the outermost.
    return [p for p in found if not any(p.startswith(q + os.sep) for q in found if q != p)]


def _is_run(path: Path) -> bool:
    return (
        _wandb_file(path) is not None
        or (path / ".hydra" / "config.yaml").is_file()
        or (path / "wandb").is_dir()
        or (path / "csv").is_dir()
    )


# --- offline wandb ----------------------------------------------------------------------------


def read_wandb_records(path: str | Path) -> tuple[list[Any], str | None]:
    """All complete records of a ``.wandb`` file, and a note when its tail was incomplete.

    A run still being written can end inside a record (wandb writes whole 32 KiB blocks):
    that tail is skipped and reported. Anything wrong before the tail (a CRC mismatch, a
    chunk out of sequence, an undecodable record) raises, naming the file and offset.
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    data = path.read_bytes()
    if data[: len(_HEADER_MAGIC)] != _HEADER_MAGIC or len(data) < _HEADER_SIZE:
        raise RunReadError(f"{path}: not a wandb run file (bad header {data[:7]!r})")
    records: list[Any] = []
    pending: bytearray | None = None  # a record split across blocks, waiting for its last chunk
    pending_at = 0
    pos = _HEADER_SIZE
    while pos < len(data):
        room = _BLOCK_SIZE - pos % _BLOCK_SIZE
        if room < _CHUNK_HEADER.size:  # block trailer: padding
            pos += room
            continue
        if pos + _CHUNK_HEADER.size > len(data):
            return records, _tail_note(path, pos, len(data))
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += room
            continue
        start, end = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if end - pos > room:  # a chunk never crosses a block boundary
            raise RunReadError(f"{path}: corrupt chunk header at byte {pos} (length {length})")
        if end > len(data):
            return records, _tail_note(path, pos, len(data))
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise RunReadError(f"{path}: corrupt chunk at byte {pos} (CRC mismatch)")
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
            raise RunReadError(f"{path}: unknown chunk type {kind} at byte {pos}")
        if (kind in (_FULL, _FIRST)) == (pending is not None):
            raise RunReadError(f"{path}: chunk of type {kind} out of sequence at byte {pos}")
        if kind in (_FULL, _FIRST):
            pending, pending_at = bytearray(), pos
        pending += payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(bytes(pending))
            except Exception as err:  # protobuf's DecodeError
                raise RunReadError(
                    f"{path}: undecodable record at byte {pending_at}: {err}"
                ) from err
            records.append(record)
            pending = None
        pos = end
    if pending is not None:
        return records, _tail_note(path, pending_at, len(data))
    return records, None


def _tail_note(path: Path, pos: int, size: int) -> str:
    return (
        f"{path}: the last record (from byte {pos} of {size}) is incomplete, as in a run still "
        "being written; read everything before it"
    )


def load_wandb_offline(folder: str | Path) -> Run:
    """A run from an ``offline-run-*`` folder, or from the folder holding its ``.wandb`` file."""
    folder = Path(folder)
    wandb_file = _wandb_file(folder)
    if wandb_file is None:
        raise RunReadError(f"{folder}: no run-*.wandb file")
    records, note = read_wandb_records(wandb_file)
    name, config, rows = "", {}, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
            _apply_config(config, record.run.config)
        elif kind == "config":
            _apply_config(config, record.config)
        elif kind == "history":
            row = _history_row(
                {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            )
            if row is not None:
                rows.append(row)
    return Run(name, _flatten(config), rows, str(folder), [note] if note else [])


def _wandb_file(folder: Path) -> Path | None:
    files = sorted(folder.glob("run-*.wandb")) if folder.is_dir() else []
    if len(files) > 1:
        raise RunReadError(f"{folder}: several .wandb files ({', '.join(f.name for f in files)})")
    return files[0] if files else None


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _apply_config(config: dict[str, Any], record: Any) -> None:
    for item in record.update:
        config[_item_key(item)] = json.loads(item.value_json)
    for item in record.remove:
        config.pop(_item_key(item), None)


def _history_row(values: Mapping[str, Any]) -> dict[str, float] | None:
    """A logged row as ``{"step": int, metric: float}``: numeric values only, wandb's own dropped."""
    step = next((values[k] for k in _STEP_KEYS if _is_number(values.get(k))), None)
    if step is None:
        return None
    row: dict[str, float] = {"step": int(step)}
    for key, value in values.items():
        if key not in _STEP_KEYS and not key.startswith("_") and _is_number(value):
            row[key] = float(value)
    return row


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- Hydra run dirs ---------------------------------------------------------------------------


def load_run_dir(run_dir: str | Path) -> Run:
    """A Hydra run dir: its wandb runs when it has them, else its CSVLogger files.

    A resumed run has one wandb run (or CSV version) per launch; they are joined in launch
    order, each later launch replacing the rows from its first step on.
    """
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        config = _flatten(yaml.safe_load(hydra_config.read_text()) or {})
    launches = sorted(
        (p for p in (run_dir / "wandb").glob("offline-run-*") if p.is_dir()), key=lambda p: p.name
    )
    if launches:
        parts = [load_wandb_offline(p) for p in launches]
        name = next((p.name for p in reversed(parts) if p.name), "")
        for part in parts:  # what was logged at training time completes the Hydra file
            config = {**config, **part.config}
        notes = [n for p in parts for n in p.notes]
        return Run(name, config, _join_launches([p.history for p in parts]), str(run_dir), notes)
    csv_files = sorted(run_dir.glob("csv/**/metrics.csv"), key=_natural_key)
    if not csv_files:
        raise RunReadError(f"{run_dir}: no wandb/offline-run-* folder and no csv/**/metrics.csv")
    histories = [list(_read_csv(f)) for f in csv_files]
    name = str(config.get("logger.name") or "")
    return Run(name, config, _join_launches(histories), str(run_dir))


def _read_csv(path: Path) -> Iterator[dict[str, float]]:
    try:
        with path.open(newline="") as f:
            for line, values in enumerate(csv.DictReader(f), start=2):
                try:
                    parsed = {k: float(v) for k, v in values.items() if k and v not in ("", None)}
                except ValueError as err:
                    raise RunReadError(f"{path}:{line}: {err}") from err
                row = _history_row(parsed)
                if row is not None:
                    yield row
    except (UnicodeDecodeError, csv.Error) as err:  # binary junk, a NUL byte
        raise RunReadError(f"{path}: not a readable metrics CSV file ({err})") from None


def _join_launches(histories: Iterable[list[dict[str, float]]]) -> list[dict[str, float]]:
    """One history from a run's launches: each launch replaces the earlier ones' rows from its
    first step on. Rows come back in step order; within a launch they need not be logged in
    it (a measuring step's row can precede the flush that logs the steps before it)."""
    joined: list[dict[str, float]] = []
    for history in histories:
        if history:
            first = min(row["step"] for row in history)
            joined = [row for row in joined if row["step"] < first]
        joined.extend(history)
    return sorted(joined, key=lambda row: row["step"])


def _natural_key(path: str | Path) -> list[Any]:
    """``version_10`` after ``version_2``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


# --- wandb's public API (needs a server) ------------------------------------------------------


def load_wandb_api(path: str) -> Run:
    """``entity/project/run_id`` through ``wandb.Api()``; raises a clear error when offline."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        raise RunReadError(
            f"{path}: reading a run from the wandb server needs network access, but "
            f"WANDB_MODE={mode}; pass an offline run folder (wandb/offline-run-*) instead"
        )
    import wandb

    try:
        remote = wandb.Api(timeout=30).run(path)
        rows = [row for row in map(_history_row, remote.scan_history()) if row is not None]
    except Exception as err:  # wandb raises its own CommError / UsageError / requests errors
        raise RunReadError(f"{path}: could not read the run from the wandb server: {err}") from err
    return Run(remote.name or "", _flatten(dict(remote.config)), rows, path)


def experiment_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without its bookkeeping keys (logger, checkpointing, resume)."""
    return {k: v for k, v in config.items() if not k.startswith(_BOOKKEEPING_PREFIXES)}


def check_output_folder(path: Path, option: str = "--out") -> None:
    """A ``ValueError`` naming ``option`` when ``path`` cannot become a folder (it, or a folder
    above it, is a file), before anything is read or written."""
    for where in (path, *path.parents):
        if where.exists():
            if not where.is_dir():
                raise ValueError(f"{option} {path}: {where} is a file, not a folder")
            return


def run_tool(specs: list[str], write: Callable[[list[Run]], list[Path]]) -> int:
    """The shared body of the run-reading tools: load every run under ``specs``, write, report.

    Read errors print one line and return 1; notes (e.g. a file still being written) go to stderr.
    """
    try:
        runs = [load_run(spec) for given in specs for spec in find_runs(given)]
        written = write(runs)
    except (RunReadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for run in runs:
        for note in run.notes:
            print(f"note: {note}", file=sys.stderr)
    print("\n".join(str(p) for p in written))
    return 0
