"""One run per run dir: an owner record, a lock against a second live job, the refusal to
start a new run over another run's checkpoints, and the names of what a run dir holds.

``<run_dir>/run.json`` names the run that owns the dir (a random id, when and where it started);
checkpoints carry that id in their marker, so resuming and pruning only ever touch this run's.
``<run_dir>/run.lock`` holds the live job's host, pid and SLURM job id; a second launch stops
before it writes anything, unless the holder is gone (a dead pid on this host, or the same SLURM
job requeued), whose lock it takes over. Only global rank zero claims; the other ranks read the id.
Nothing here imports torch or Lightning: train.py's Hydra callback runs it before the config is
validated, and a bad launch must fail in about a second. So the checkpoint format's names live
here too: the trainer writes them (``training.checkpoint``), the tools read them (``interop``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from olmo_mini.config import ConfigError
from olmo_mini.integrity import ALGORITHM, file_digest, write_text_atomic

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
TOKENIZER_FILE = "tokenizer.json"  # the run's tokenizer (olmo_mini.training.tokenizer_record)
# One JSON line per resume: from which checkpoint, and the settings it changed (training.checkpoint).
HISTORY_FILE = "history.jsonl"
STEP_DIR = re.compile(r"step_(\d+)")
# In a step_<N> checkpoint: the marker of a finished save (its files' digests, step, run id),
# the single-process state file (FSDP runs write DCP shards and meta.pt instead) and the config.
COMPLETE = "COMPLETE"
STATE_FILE = "state.ckpt"
CONFIG_FILE = "config.yaml"
# Lightning saves the DataModule's state_dict under its class's __qualname__.
DATA_STATE_KEY = "OLMoDataModule"


def is_rank_zero() -> bool:
    """Rank zero of a launched job (torchrun, SLURM, Lightning's own launcher) or a plain run."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def step_dirs(directory: Path) -> list[Path]:
    """Every ``step_<N>`` directory, complete or not, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def read_marker(checkpoint: Path) -> dict[str, Any]:
    """The ``COMPLETE`` marker's fields; a missing or unreadable one raises ``ValueError``."""
    try:
        marker = json.loads((checkpoint / COMPLETE).read_text())
    except FileNotFoundError:
        raise ValueError(f"no {COMPLETE} marker (its save did not finish)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {COMPLETE} marker: {e}") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise ValueError(
            f"its {COMPLETE} marker lists no file digests (written before olmo-mini "
            "verified checkpoints, or damaged)"
        )
    return marker


def complete_checkpoints(directory: Path, run_id: str | None = None) -> list[Path]:
    """``step_<N>`` directories with a ``COMPLETE`` marker (of run ``run_id`` if given), oldest
    first. Markers are not verified here: see ``verify``."""
    return [p for p in step_dirs(directory) if (p / COMPLETE).is_file() and belongs(p, run_id)]


def verify(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be trusted, or None when every file its marker lists
    (``config.yaml`` among them) has the size and digest recorded there. The trainer's resume
    and every tool that reads a checkpoint (``olmo_mini.interop``) call this."""
    try:
        marker = read_marker(checkpoint)
    except ValueError as e:
        return str(e)
    for rel, expected in marker["files"].items():
        path = checkpoint / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{rel} is missing"
        if size != expected["size"]:
            return f"{rel} has {size} bytes, its marker says {expected['size']}"
        with open(path, "rb") as f:
            digest = file_digest(f)
        if digest != expected.get(ALGORITHM):
            return f"{rel} does not match its digest in {COMPLETE} (corrupted)"
    return None


def newest_verified(
    directory: Path, run_id: str | None = None
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest ``step_<N>`` under ``directory`` of run ``run_id`` (any run's for None) that
    verifies, None if none does; and each newer one that did not, with why."""
    skipped = []
    for path in reversed([p for p in step_dirs(directory) if belongs(p, run_id)]):
        reason = verify(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def list_skipped(skipped: list[tuple[Path, str]]) -> str:
    """``step_4: why; step_2: why`` for ``newest_verified``'s skipped checkpoints."""
    return "; ".join(f"{path.name}: {reason}" for path, reason in skipped)


def belongs(path: Path, run_id: str | None) -> bool:
    """Whether a ``step_<N>`` dir is run ``run_id``'s (any run's for None): its marker's run id,
    or (no readable marker: an unfinished or damaged save) yes, so that resuming names what is
    wrong with it rather than ignoring it."""
    try:
        return run_id is None or read_marker(path).get("run_id") == run_id
    except ValueError:
        return True


def saved_config(checkpoint: Path) -> Any:
    """The resolved run config saved inside ``checkpoint`` (an OmegaConf node)."""
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint}: no {CONFIG_FILE} (saved before checkpoints carried their run's config)"
        )
    return OmegaConf.load(path)


def claim(run_dir: Path, resume: str | None, overwrite: bool, cpu_threads: int) -> str | None:
    """Take ``run_dir`` for this launch and return the run id (None on other ranks before rank
    zero wrote one); a launch that may not use the dir raises ``ConfigError``, having written
    nothing there. A new run records the CPU threads per process it trains with."""
    run_dir = Path(run_dir).resolve()
    if not is_rank_zero():
        return read_run_id(run_dir)
    check(run_dir, resume, overwrite)
    if continues(run_dir, resume):
        run_id = read_run_id(run_dir) or _adopt(run_dir, cpu_threads)
        if run_id is not None:
            return run_id
    elif step_dirs(run_dir / "checkpoints"):  # check() let it through: overwrite=true
        log.warning("checkpoint.overwrite=true: deleting %s", run_dir / "checkpoints")
        shutil.rmtree(run_dir / "checkpoints")
    return _record(run_dir, uuid.uuid4().hex[:12], cpu_threads)


def _record(run_dir: Path, run_id: str, cpu_threads: int) -> str:
    """Write ``run.json`` naming ``run_id`` as the run that owns ``run_dir``; return the id."""
    record = {
        "run_id": run_id,
        "started": datetime.now(timezone.utc).isoformat(),
        **_holder(),
        "cpu_threads": cpu_threads,  # per process: a resume trains with the same count
    }
    write_text_atomic(run_dir / RUN_FILE, json.dumps(record, indent=1))
    return run_id


def _adopt(run_dir: Path, cpu_threads: int) -> str | None:
    """The run id of a run dir whose ``run.json`` is gone, from its checkpoints' markers, written
    back to ``run.json`` (None: no checkpoints). Checkpoints whose owner this cannot establish
    (markers naming several runs, or none) are never resumed over: ``ConfigError``."""
    checkpoints = step_dirs(run_dir / "checkpoints")
    if not checkpoints:
        return None
    owners = {p.name: _owner(p) for p in checkpoints}
    if len(set(owners.values())) != 1 or None in owners.values():
        named = ", ".join(
            f"{name}: {owner or 'no readable marker'}" for name, owner in owners.items()
        )
        raise ConfigError(
            f"hydra.run.dir={run_dir} has no {RUN_FILE}, and its checkpoints do not all name one "
            f"run ({named}); move the ones that are not this run's out of {run_dir / 'checkpoints'}, "
            "or start this run in another hydra.run.dir"
        )
    run_id = next(iter(owners.values()))
    log.warning(
        "%s is missing: continuing run %s, which every checkpoint's marker names",
        run_dir / RUN_FILE,
        run_id,
    )
    return _record(run_dir, run_id, cpu_threads)


def _owner(path: Path) -> str | None:
    """The run id in a ``step_<N>`` dir's marker; None when it has no readable one."""
    try:
        return read_marker(path).get("run_id")
    except ValueError:
        return None


def check(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Lock ``run_dir`` and refuse (``ConfigError``) a fresh launch over another run's
    checkpoints; writes nothing but the lock."""
    lock(run_dir)
    existing = step_dirs(run_dir / "checkpoints")
    if existing and not overwrite and not continues(run_dir, resume):
        names = ", ".join(p.name for p in existing[-3:])
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds another run's checkpoints ({names}); continue that run "
            "with resume=auto, or start this one in another hydra.run.dir "
            "(checkpoint.overwrite=true deletes them)"
        )


def continues(run_dir: Path, resume: str | None) -> bool:
    """Whether a launch with this ``resume`` continues the run that owns ``run_dir``."""
    if resume == "auto":
        return True
    if resume is None:
        return False
    return Path(resume).resolve().is_relative_to(Path(run_dir).resolve() / "checkpoints")


def read_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text())["run_id"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{Path(run_dir) / RUN_FILE}: unreadable run record ({e})") from None


def trained_threads(run_dir: Path) -> int | None:
    """The CPU threads per process that ``run.json`` says the run in ``run_dir`` trained with
    (None: no record, or one written before runs recorded it)."""
    try:
        threads = json.loads((Path(run_dir) / RUN_FILE).read_text()).get("cpu_threads")
    except (OSError, ValueError, AttributeError):
        return None  # resuming reports an unreadable record
    return threads if isinstance(threads, int) and threads > 0 else None


def lock(run_dir: Path) -> None:
    """Hold ``<run_dir>/run.lock`` until this process exits; a live holder, or a lock that cannot
    be written or read (a full or read-only disk), raises ``ConfigError``."""
    path = Path(run_dir) / LOCK_FILE
    try:
        holder = try_lock(path)
    except OSError as e:
        raise ConfigError(
            f"hydra.run.dir={run_dir}: cannot take {LOCK_FILE}: {e.strerror or e}"
        ) from None
    if holder is not None:
        raise ConfigError(
            f"hydra.run.dir={run_dir} is in use by another job ({_describe(holder)}, see {path}); "
            "use another hydra.run.dir, or delete the lock if that job is gone"
        )
    atexit.register(release, Path(run_dir))


def try_lock(path: Path) -> dict | None:
    """Create the lock file ``path`` for this process: None once held (also when this process
    held it already), else the live holder's record. A stale lock is taken over.

    The holder's record is written to a temp file first and hard-linked to ``path`` (which,
    like ``O_EXCL``, fails if ``path`` exists): the lock file is never empty, so a launch that
    fails while writing it (a full disk) leaves no lock behind, only its temp file's removal.
    An empty or unreadable lock (left by an olmo-mini that wrote it in place) counts as stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _holder()
    temp = path.with_name(f".{path.name}.{me['pid']}.tmp")
    try:
        temp.write_text(json.dumps(me))
        for attempt in range(2):
            try:
                os.link(temp, path)
            except FileExistsError:
                holder = _read_lock(path)
                if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return None
                if attempt == 0 and _stale(holder):
                    log.warning("taking over the stale lock %s (%s)", path, holder or "empty")
                    path.unlink(missing_ok=True)
                    continue
                return holder or {}
            return None
        raise AssertionError("unreachable: the second attempt returns")
    finally:
        temp.unlink(missing_ok=True)


def release(run_dir: Path) -> None:
    """Remove the run dir's lock if this process holds it."""
    unlock(Path(run_dir) / LOCK_FILE)


def unlock(path: Path) -> None:
    """Remove the lock file ``path`` if this process holds it."""
    try:
        holder = _read_lock(path)
    except OSError:  # not one this process could have written
        return
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        # Counts requeues: a lock of an earlier run of the same job is stale; one of the same
        # run (another srun step of this allocation) is not.
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
    }


def _read_lock(path: Path) -> dict | None:
    """The lock's holder record; None when there is no lock, ``{}`` when it is empty or damaged
    (an unreadable one raises ``OSError``)."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict | None) -> bool:
    """A holder known to be gone: a dead pid on this host, an earlier run of this SLURM job
    (before a requeue), or none recorded (an empty or damaged lock: never one a live launch
    holds, as ``try_lock`` links a complete file into place)."""
    if not holder:
        return True
    me = _holder()
    if me["slurm_job_id"] is not None and holder.get("slurm_job_id") == me["slurm_job_id"]:
        if holder.get("slurm_restart_count") != me["slurm_restart_count"]:
            return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}"


def resume_command(run_dir: Path) -> str:
    """This launch's command line, set to continue the run in ``run_dir``."""
    kept = [a for a in sys.argv[1:] if not a.startswith(("resume=", "hydra.run.dir="))]
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "train.py"
    run_dir_override = f"hydra.run.dir={hydra_value(str(run_dir))}"
    return shlex.join(["python", script, *kept, "resume=auto", run_dir_override])


def hydra_value(value: str) -> str:
    """``value`` written so that Hydra's override grammar reads it back as this string: as is
    where it parses to itself, else single-quoted (commas, ``=``, quotes, brackets, non-ASCII
    letters, edge spaces), with Hydra's escapes: backslashes doubled before a quote or the end,
    ``\\'`` for a quote, ``\\${`` so that OmegaConf does not interpolate."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if "${" not in value:
        try:
            if OverridesParser.create().parse_override(f"key={value}").value() == value:
                return value
        except HydraException:  # not a plain value
            pass
    escaped = re.sub(r"(\\*)('|$)", lambda m: 2 * m.group(1) + ("\\'" if m.group(2) else ""), value)
    return "'" + escaped.replace("${", "\\${") + "'"


class ClaimBeforeHydraWrites(Callback):
    """Hydra callback: lock and check the run dir before Hydra writes ``.hydra/config.yaml`` into
    it, so a launch that may not use the dir (another run's checkpoints, a live job) changes
    nothing there. A single run only; each job of a sweep is checked in ``train``, which also
    records the run (``run.json``) once the config has been validated."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        run_dir = Path(config.hydra.run.dir).resolve()
        if not is_rank_zero():
            return
        try:
            check(run_dir, config.get("resume"), bool(config.checkpoint.get("overwrite", False)))
        except ConfigError as e:
            sys.exit(f"error: {e}")
