"""After training: load any model source, export to / import from Hugging Face, sample.

A *source* is one of

- a training checkpoint, ``<run_dir>/checkpoints/step_<N>`` (one ``state.ckpt``, or the sharded
  DCP files of an FSDP run), or a run dir (its newest checkpoint that verifies). Every
  checkpoint is verified against its digests first, as ``resume=auto`` does. The architecture
  and data come from the run's config saved inside the checkpoint (``config.yaml``), the
  tokenizer from the run dir, checked against the hash in the checkpoint
  (:func:`checkpoint_tokenizer`). Sharded checkpoints are read without a process group.
- a Hugging Face Olmo2 folder (``config.json``, safetensors, tokenizer files), read and written
  by ``olmo_mini.model.hf``.

Both load into a plain fp32 ``OLMo2``; either can initialize a new run (``model.init_from``, see
:func:`load_init_weights`). Neither carries optimizer state into it. Weights folders that older
versions wrote (``model.yaml``, ``model.safetensors`` in olmo-mini names) still load, with a
deprecation warning.
Nothing here imports Lightning: the trainer (``training.parallel``) and the tools read it alike.
Evaluation is ``olmo_mini.evaluation``.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import fsspec
import torch
from tokenizers import Tokenizer

from olmo_mini.config import ConfigError, TrainConfig, load_config
from olmo_mini.data import eos_id, load_tokenizer, read_manifest, resolve_tokenizer_and_shards
from olmo_mini.data.tokenizer import tokenizer_hash
from olmo_mini.model import OLMo2, OLMo2Config, hf
from olmo_mini.model.generation import generate
from olmo_mini.model.shards import write_full_
from olmo_mini.run_dir import (
    COMPLETE,
    DATA_STATE_KEY,
    STATE_FILE,
    TOKENIZER_FILE,
    list_skipped,
    newest_verified,
    read_run_id,
    saved_config,
    verify,
)

# The weights folders older versions' import_hf wrote: read still, no longer written.
WEIGHTS_FILE = "model.safetensors"
MODEL_YAML = "model.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Fields that do not change what the weights compute: a run may differ from its init_from source.
_FREE_FIELDS = {"max_seq_len", "init_std", "norm_backend"}
log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A model with what using it needs; ``config`` is the run's for training checkpoints.

    ``tokenizer_dir`` is the folder holding the tokenizer file the weights were trained with (a
    run dir that recorded it, or the model folder); None for runs from before runs recorded it.
    """

    model: OLMo2
    tokenizer: Tokenizer
    eos_id: int | None
    path: Path
    config: TrainConfig | None = None
    tokenizer_dir: Path | None = None


# ---------------------------------------------------------------- finding and loading sources


def locate(path: str | Path) -> tuple[str, Path]:
    """``(kind, directory)`` with kind ``checkpoint``, ``hf`` or ``weights``; else an error naming
    what is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint, run dir or model folder")
    if not path.is_dir():
        raise ValueError(f"{path}: expected a directory (a step_<N> checkpoint, run dir or folder)")
    if (path / COMPLETE).is_file():
        reason = verify(path)
        if reason is not None:
            raise ValueError(f"{path}: not a usable checkpoint: {reason}")
        return "checkpoint", path
    if (path / STATE_FILE).exists() or (path / ".metadata").exists():
        raise ValueError(
            f"{path}: incomplete checkpoint, {path / COMPLETE} is missing (its save did not "
            "finish); use an earlier step_<N>"
        )
    if (path / "checkpoints").is_dir():
        return "checkpoint", _newest_checkpoint(path)
    if (path / "config.json").is_file():
        return "hf", path
    if (path / MODEL_YAML).is_file():
        log.warning(
            "%s: olmo-mini weights folders are deprecated; convert it once with "
            "tools/convert_hf.py to-hf %s <hf folder>",
            path,
            path,
        )
        return "weights", path
    raise ValueError(
        f"{path}: not a model source; expected a step_<N> checkpoint (with {COMPLETE}), a run dir "
        f"(with checkpoints/) or a Hugging Face folder (config.json)"
    )


def _newest_checkpoint(run_dir: Path) -> Path:
    """The run's newest checkpoint that verifies, as ``resume=auto`` picks it; each newer one
    that does not is logged with why."""
    directory = run_dir / "checkpoints"
    found, skipped = newest_verified(directory, read_run_id(run_dir))
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    if found is None and not skipped:
        raise FileNotFoundError(f"{directory}: no complete step_<N> checkpoint")
    if found is None:
        raise ValueError(f"{directory}: no checkpoint verifies ({list_skipped(skipped)})")
    return found


def load_model(path: str | Path) -> OLMo2:
    """The fp32 CPU model of any source, without its tokenizer or data."""
    return _model(*locate(path))


def load(path: str | Path) -> Loaded:
    """Model, tokenizer and EOS id of any source (and the run's config for checkpoints)."""
    kind, where = locate(path)
    if kind == "checkpoint":
        config = run_config(where)
        tokenizer, eos, folder = checkpoint_tokenizer(where, config)
        return Loaded(_model(kind, where), tokenizer, eos, where, config, folder)
    model = _model(kind, where)
    tokenizer = load_tokenizer(where)
    try:
        eos: int | None = eos_id(tokenizer, path=where)
    except ValueError:  # a tokenizer without an end-of-text token: generation runs to the end
        eos = None
    return Loaded(model, tokenizer, eos, where, tokenizer_dir=where)


def run_config(checkpoint: Path) -> TrainConfig:
    """The config of the run that wrote ``checkpoint``: the one saved inside it (``config.yaml``,
    covered by its digests), not a file of the run dir that a later launch could replace."""
    try:
        raw = saved_config(checkpoint)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; re-save it with this version of olmo-mini") from None
    # Where the run's weights came from is history now: the checkpoint holds them.
    raw.resume = None
    raw.model.init_from = None
    return load_config(raw)


def run_tokenizer(config: TrainConfig) -> tuple[Tokenizer, int]:
    """The run's tokenizer and EOS id, found exactly as its DataModule found them."""
    # The DataModule's own lookup (cached after training), so export cannot pick another file.
    path, shards = resolve_tokenizer_and_shards(config.data)
    with fsspec.open(path, "rt") as f:
        tokenizer = Tokenizer.from_str(f.read())
    if shards is not None:
        return tokenizer, read_manifest(shards)["eos_id"]
    return tokenizer, eos_id(tokenizer, config.data.eos_token, path)


def checkpoint_tokenizer(
    checkpoint: Path, config: TrainConfig
) -> tuple[Tokenizer, int, Path | None]:
    """The tokenizer ``checkpoint`` was trained with, its EOS id and the folder holding it.

    That is the file the run recorded in its run dir (``olmo_mini.training.tokenizer_record``);
    runs from before that get their DataModule's lookup. Either way its hash must equal the one
    in the checkpoint's data-loader fingerprint, else it is an error naming both.
    """
    run_dir = checkpoint.parent.parent
    if (run_dir / TOKENIZER_FILE).is_file():
        where, folder = run_dir / TOKENIZER_FILE, run_dir
        tokenizer = load_tokenizer(where)
        eos = eos_id(tokenizer, config.data.eos_token, run_dir)
    else:
        where, folder = "the tokenizer its config derives (the run recorded none)", None
        tokenizer, eos = run_tokenizer(config)
    expected, found = trained_tokenizer_hash(checkpoint), tokenizer_hash(tokenizer)
    if found != expected:
        raise ValueError(
            f"{where}: tokenizer hash {found}, but {checkpoint} was trained with tokenizer hash "
            f"{expected}; its token ids would not be the ones the weights learned"
        )
    return tokenizer, eos, folder


def trained_tokenizer_hash(checkpoint: Path) -> str:
    """The tokenizer hash in the checkpoint's data-loader fingerprint (the DataModule's state)."""
    # Lightning keeps non-tensor state in state.ckpt, or beside sharded (DCP) files in meta.pt.
    file = checkpoint / STATE_FILE
    if not file.is_file():
        file = checkpoint / "meta.pt"
    saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    try:
        return saved[DATA_STATE_KEY]["fingerprint"]["tokenizer"]
    except (KeyError, TypeError):
        raise ValueError(
            f"{file}: no {DATA_STATE_KEY}.fingerprint.tokenizer, so nothing says "
            "which tokenizer trained these weights"
        ) from None


def checkpoint_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's tensors (olmo-mini names) of a single-file or sharded DCP checkpoint."""
    prefix, file = "model.", checkpoint / STATE_FILE
    if file.is_file():
        saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return {k.removeprefix(prefix): v for k, v in saved["state_dict"].items()}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # Lightning saves {"state_dict": {"model.<name>": ...}, "optimizer_0": ...}; DCP flattens it.
    saved_prefix = f"state_dict.{prefix}"
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(saved_prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(
            f"{checkpoint}: no model tensors ({saved_prefix}*) in {checkpoint / '.metadata'}"
        )
    with warnings.catch_warnings():  # "assuming ... a single process": which is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return {k.removeprefix(saved_prefix): v for k, v in state.items()}


def _build(config: OLMo2Config, state: dict[str, torch.Tensor], where: Path) -> OLMo2:
    """An fp32 model holding ``state``, built without a throwaway random init."""
    arch = OLMo2Config.from_dict({f.name: getattr(config, f.name) for f in fields(OLMo2Config)})
    with torch.device("meta"):
        model = OLMo2(arch)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:  # one line per mismatch after a heading: the first, and a count
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(
            f"{where}: weights do not fit the architecture its config gives: "
            f"{problems[0] if problems else e}{more}"
        ) from None
    model.rope.inv_freq = model.rope.frequencies()
    return model.eval()


def _model(kind: str, where: Path) -> OLMo2:
    """The fp32 CPU model of a located source."""
    architecture = _architecture(kind, where)
    weights = where / WEIGHTS_FILE
    if kind == "weights" and not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (an olmo-mini weights folder holds it)")
    return _build(architecture, dict(_source_tensors(kind, where)), where)


def _architecture(kind: str, where: Path) -> OLMo2Config:
    """The architecture of a located source, read without its weights."""
    if kind == "checkpoint":
        return run_config(where).model
    if kind == "weights":
        return OLMo2Config.from_yaml(where / MODEL_YAML)
    return hf.read_config(where)


# ---------------------------------------------------------------- initializing a run


def load_init_weights(model: OLMo2, source: str) -> None:
    """Copy ``model.init_from``'s weights into a freshly built ``model``, one tensor at a time.

    Safetensors sources (a Hugging Face folder, an old olmo-mini weights folder) are read lazily
    (``safe_open``): one whole tensor exists at a time and an FSDP2-sharded ``model`` keeps only
    its part on each rank (``model.shards.write_full_``), so no process ever holds the model.
    A sharded (DCP) checkpoint is read by DCP straight into the parameters, each rank reading
    only what overlaps its shards; one ``state.ckpt`` is memory-mapped. The architectures must
    agree except in fields that do not change what the weights compute (``max_seq_len``,
    ``init_std``, ``norm_backend``); else a ``ConfigError`` lists the differences.
    """
    try:
        kind, where = locate(source)
        source_config = _architecture(kind, where)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.init_from: {e}") from None
    differences = [
        f"model.{f.name}={getattr(model.config, f.name)!r} but the source has "
        f"{getattr(source_config, f.name)!r}"
        for f in fields(OLMo2Config)
        if f.name not in _FREE_FIELDS
        and getattr(model.config, f.name) != getattr(source_config, f.name)
    ]
    if differences:
        raise ConfigError(
            f"model.init_from: {source} has another architecture than this run: "
            f"{'; '.join(differences)}. Set these model.* overrides to the source's values "
            "(tools/convert_hf.py from-hf prints them)"
        )
    if kind == "checkpoint" and (where / ".metadata").is_file():
        _load_sharded_checkpoint(model, where)
        return
    params = dict(model.named_parameters())
    missing = set(params)
    try:
        for name, tensor in _source_tensors(kind, where):
            if name not in params:
                raise KeyError(f"{where} has a tensor {name!r} that this model lacks")
            write_full_(params[name], tensor.to(params[name].dtype))
            missing.discard(name)
    except (KeyError, ValueError) as e:  # an unknown name; a shape that does not fit
        raise ConfigError(f"model.init_from: {e.args[0]}") from None
    if missing:
        raise ConfigError(f"model.init_from: {where} lacks {', '.join(sorted(missing))}")


def _load_sharded_checkpoint(model: OLMo2, checkpoint: Path) -> None:
    """DCP reads the saved model tensors into ``model``'s parameters (their local shards, under
    FSDP2), resharding from the saving run's world size to this one's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    # Lightning's DCP layout, as checkpoint_state reads it: {"state_dict": {"model.<name>": ...}}.
    state = {f"state_dict.model.{name}": p.detach() for name, p in model.named_parameters()}
    try:
        with warnings.catch_warnings():  # one process, no group: "assuming ... a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(checkpoint))
    except (CheckpointException, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.init_from: {checkpoint}: {first}") from None


def _source_tensors(kind: str, where: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(olmo-mini name, whole tensor)`` pairs of a located source, one at a time."""
    if kind == "checkpoint":
        yield from checkpoint_state(where).items()
    elif kind == "hf":
        yield from hf.tensors(where)
    else:
        yield from hf.stream_safetensors([where / WEIGHTS_FILE])


def model_overrides(config: OLMo2Config) -> list[str]:
    """``model.<field>=<value>`` command-line overrides describing ``config``'s architecture."""
    values = {f.name: getattr(config, f.name) for f in fields(OLMo2Config)}
    kept = {k: v for k, v in values.items() if k not in ("init_std", "norm_backend")}
    return [f"model.{k}={'null' if v is None else v}" for k, v in kept.items()]


# ---------------------------------------------------------------- Hugging Face export / import


def export_hf(source: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write an HF Olmo2 folder: config.json, safetensors, tokenizer files, generation_config.json.

    The tokenizer is the run's ``tokenizer.json`` as a ``PreTrainedTokenizerFast`` with EOS (also
    the pad token: the model has no other) so that ``AutoTokenizer`` loads it as trained.
    """
    from transformers import PreTrainedTokenizerFast

    loaded = load(source)
    out = Path(out)
    ids = {"eos_token_id": loaded.eos_id, "pad_token_id": loaded.eos_id}
    loaded.model.save_hf(out, dtype, special_tokens=ids)
    eos = None if loaded.eos_id is None else loaded.tokenizer.id_to_token(loaded.eos_id)
    PreTrainedTokenizerFast(
        tokenizer_object=loaded.tokenizer,
        eos_token=eos,
        pad_token=eos,
        model_max_length=loaded.model.config.max_seq_len,
    ).save_pretrained(out)
    # transformers 5 records its own class name; the 4.x name loads in both (lm-eval often pins 4.x).
    tokenizer_config = out / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(settings, indent=2))
    # The run's tokenizer as it is (transformers 5 adds a post-processor that changes no id):
    # the folder's tokenizer hash is the checkpoint's.
    loaded.tokenizer.save(str(out / "tokenizer.json"))
    return out


def import_hf(folder: str | Path, out: str | Path) -> OLMo2Config:
    """Check that an HF folder (from transformers, OLMo-core, ...) converts and write it again as
    olmo-mini writes HF folders: fp32 weights, a complete ``config.json`` (OLMo 2's context where
    the source gave none), ``generation_config.json``, the tokenizer files copied, so that
    ``model.init_from`` and ``data.tokenizer`` can point at ``out``. Optimizer state does not
    exist in HF folders: a run initialized from this starts AdamW's moments at zero.
    """
    kind, where = locate(folder)
    if kind != "hf":
        raise ValueError(f"{where}: not a Hugging Face folder (no config.json)")
    source = json.loads((where / "config.json").read_text())
    ids = {key: source.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = _model(kind, where)
    out = Path(out)
    model.save_hf(out, torch.float32, special_tokens=ids)
    for name in TOKENIZER_FILES:
        if (where / name).is_file():
            shutil.copy2(where / name, out / name)
    return model.config


# ---------------------------------------------------------------- generation


def generate_text(
    loaded: Loaded,
    prompt: str,
    max_new_tokens: int,
    device: str = "cpu",
    **sampling: float | int | bool | None,
) -> str:
    """Prompt plus continuation as text; ``sampling`` goes to ``generation.generate``."""
    ids = loaded.tokenizer.encode(prompt).ids
    if not ids:  # an empty prompt: continue from a document boundary
        if loaded.eos_id is None:
            raise ValueError("an empty prompt needs an EOS token to start from; give --prompt")
        ids = [loaded.eos_id]
    model = loaded.model.to(device)
    out = generate(
        model, torch.tensor([ids], device=device), max_new_tokens, eos_id=loaded.eos_id, **sampling
    )
    return loaded.tokenizer.decode(out[0].tolist())
