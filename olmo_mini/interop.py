"""After training: load any model source, export to / import from Hugging Face, evaluate.

A *source* is one of

- a training checkpoint, ``<run_dir>/checkpoints/step_<N>`` (one ``state.ckpt``, or the sharded
  DCP files of an FSDP run), or a run dir (its newest complete checkpoint). The architecture
  and data come from the run's config saved inside the checkpoint (``config.yaml``), the
  tokenizer from the run dir, checked against the hash in the checkpoint
  (:func:`checkpoint_tokenizer`). Sharded checkpoints are read without a process group.
- a Hugging Face Olmo2 folder (``config.json``, safetensors, tokenizer files).
- an olmo-mini weights folder written by :func:`import_hf` (``model.yaml``, ``model.safetensors``
  in olmo-mini parameter names, tokenizer files).

All three load into a plain fp32 ``OLMo2``; any of them can initialize a new run
(``model.init_from``, see :func:`load_init_weights`). None carries optimizer state into it.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import fsspec
import numpy as np
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders

from olmo_mini.config import ConfigError, TrainConfig, load_config
from olmo_mini.data import DataConfig, OLMoDataModule, eos_id, load_tokenizer, read_manifest
from olmo_mini.data.corpus import expand_files, file_documents
from olmo_mini.data.shards import encode_documents
from olmo_mini.data.tokenizer import tokenizer_hash
from olmo_mini.model import IGNORE_INDEX, OLMo2, OLMo2Config
from olmo_mini.model.generation import generate
from olmo_mini.model.hf import config_from_hf, from_hf_key, save_safetensors
from olmo_mini.model.shards import write_full_
from olmo_mini.training.checkpoint import COMPLETE, STATE_FILE, complete_checkpoints, saved_config
from olmo_mini.training.tokenizer_record import TOKENIZER_FILE

WEIGHTS_FILE = "model.safetensors"
MODEL_YAML = "model.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Fields that do not change what the weights compute: a run may differ from its init_from source.
_FREE_FIELDS = {"max_seq_len", "init_std", "norm_backend"}


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
        return "checkpoint", path
    if (path / STATE_FILE).exists() or (path / ".metadata").exists():
        raise ValueError(
            f"{path}: incomplete checkpoint, {path / COMPLETE} is missing (its save did not "
            "finish); use an earlier step_<N>"
        )
    if (path / "checkpoints").is_dir():
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise FileNotFoundError(f"{path / 'checkpoints'}: no complete step_<N> checkpoint")
        return "checkpoint", found[-1]
    if (path / "config.json").is_file():
        return "hf", path
    if (path / MODEL_YAML).is_file():
        return "weights", path
    raise ValueError(
        f"{path}: not a model source; expected a step_<N> checkpoint (with {COMPLETE}), a run dir "
        f"(with checkpoints/), a Hugging Face folder (config.json) or an olmo-mini weights folder "
        f"({MODEL_YAML})"
    )


def load_model(path: str | Path) -> OLMo2:
    """The fp32 CPU model of any source, without its tokenizer or data."""
    kind, where = locate(path)
    if kind == "checkpoint":
        return _checkpoint_model(where, run_config(where).model)
    if kind == "hf":
        return _hf_model(where)
    return _weights_model(where)


def load(path: str | Path) -> Loaded:
    """Model, tokenizer and EOS id of any source (and the run's config for checkpoints)."""
    kind, where = locate(path)
    if kind == "checkpoint":
        config = run_config(where)
        tokenizer, eos, folder = checkpoint_tokenizer(where, config)
        model = _checkpoint_model(where, config.model)
        return Loaded(model, tokenizer, eos, where, config, folder)
    model = _hf_model(where) if kind == "hf" else _weights_model(where)
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
    path, shards = OLMoDataModule(config.data, config.seed)._resolve_tokenizer_and_shards()
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
        return saved[OLMoDataModule.__qualname__]["fingerprint"]["tokenizer"]
    except (KeyError, TypeError):
        raise ValueError(
            f"{file}: no {OLMoDataModule.__qualname__}.fingerprint.tokenizer, so nothing says "
            "which tokenizer trained these weights"
        ) from None


def checkpoint_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's tensors (olmo-mini names) of a single-file or sharded DCP checkpoint."""
    prefix = "model."
    if (checkpoint / STATE_FILE).is_file():
        saved = torch.load(
            checkpoint / STATE_FILE, map_location="cpu", weights_only=True, mmap=True
        )
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
    except RuntimeError as e:
        raise ValueError(f"{where}: weights do not fit the architecture {arch}: {e}") from None
    model.rope.inv_freq = model.rope.frequencies()
    return model.eval()


def _checkpoint_model(checkpoint: Path, config: OLMo2Config) -> OLMo2:
    return _build(config, checkpoint_state(checkpoint), checkpoint)


def _hf_model(folder: Path) -> OLMo2:
    config_file = folder / "config.json"
    try:
        config_from_hf(json.loads(config_file.read_text()))
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"{config_file}: not a convertible Hugging Face Olmo2 model: {e}"
        ) from None
    return OLMo2.from_hf(folder).eval()


def _weights_model(folder: Path) -> OLMo2:
    from safetensors.torch import load_file

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (an olmo-mini weights folder holds it)")
    return _build(OLMo2Config.from_yaml(folder / MODEL_YAML), load_file(str(weights)), folder)


# ---------------------------------------------------------------- initializing a run


def load_init_weights(model: OLMo2, source: str) -> None:
    """Copy ``model.init_from``'s weights into a freshly built ``model``, one tensor at a time.

    Safetensors sources (a Hugging Face folder, an olmo-mini weights folder) are read lazily
    (``safe_open``): one whole tensor exists at a time and an FSDP2-sharded ``model`` keeps only
    its part on each rank (``model.shards.write_full_``), so no process ever holds the model.
    A sharded (DCP) checkpoint is read by DCP straight into the parameters, each rank reading
    only what overlaps its shards; one ``state.ckpt`` is memory-mapped. The architectures must
    agree except in fields that do not change what the weights compute (``max_seq_len``,
    ``init_std``, ``norm_backend``); else a ``ConfigError`` lists the differences.
    """
    try:
        kind, where = locate(source)
        source_config = _source_architecture(kind, where)
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


def _source_architecture(kind: str, where: Path) -> OLMo2Config:
    """The architecture of a located source, read without its weights."""
    if kind == "checkpoint":
        return run_config(where).model
    if kind == "hf":
        return config_from_hf(json.loads((where / "config.json").read_text()))
    return OLMo2Config.from_yaml(where / MODEL_YAML)


def _source_tensors(kind: str, where: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(olmo-mini name, whole tensor)`` pairs of a located source, one at a time."""
    if kind == "checkpoint":
        yield from checkpoint_state(where).items()
        return
    from safetensors import safe_open

    files = sorted(where.glob("*.safetensors")) if kind == "hf" else [where / WEIGHTS_FILE]
    if not files or not files[0].is_file():
        raise ValueError(f"{where} has no safetensors file")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            if kind == "hf" and key.endswith("rotary_emb.inv_freq"):
                continue  # old exports carry this buffer
            # Opened per tensor: the file is memory-mapped while open, and every page read
            # stays resident until it is closed, which would add up to the whole file.
            with safe_open(str(file), framework="pt") as f:
                tensor = f.get_tensor(key)
            yield (from_hf_key(key) if kind == "hf" else key), tensor


def model_overrides(config: OLMo2Config) -> list[str]:
    """``model.<field>=<value>`` command-line overrides describing ``config``'s architecture."""
    values = {f.name: getattr(config, f.name) for f in fields(OLMo2Config)}
    return [
        f"model.{k}={'null' if v is None else v}"
        for k, v in values.items()
        if k not in ("init_std", "norm_backend")
    ]


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
    """An HF Olmo2 folder → an olmo-mini weights folder for ``model.init_from``.

    ``model.yaml`` has the ``OLMo2Config`` fields (it also works as a ``configs/model/`` file),
    ``model.safetensors`` the fp32 weights in olmo-mini names; tokenizer files are copied so that
    ``data.tokenizer`` can point at the folder. Optimizer state does not exist in HF folders: a
    run initialized from this starts AdamW's moments at zero.
    """
    kind, where = locate(folder)
    if kind != "hf":
        raise ValueError(f"{where}: not a Hugging Face folder (no config.json)")
    model = _hf_model(where)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, out / WEIGHTS_FILE)
    (out / MODEL_YAML).write_text(OmegaConf.to_yaml(model.config.to_dict()))
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


# ---------------------------------------------------------------- evaluation

# Data settings evaluation may override: they cut the same held-out token stream differently.
# Every other data.* setting picks the corpus, its held-out split or the token ids.
_EVAL_FREE_DATA_FIELDS = (
    "seq_len",
    "global_batch_size",
    "micro_batch_size",
    "val_batches",
    "num_workers",
    "prepare_procs",
    "cache_dir",
)


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per predicted token, nats
    perplexity: float
    bits_per_byte: float  # total CE / (ln 2 × UTF-8 bytes of the predicted text)
    tokens: int
    bytes: int
    batches: int
    context: int = 0  # the most tokens one prediction conditions on
    split: str = ""  # "held-out" (the run's validation windows) or "all" (whole documents)
    documents: int | None = None  # documents evaluated whole; None for held-out windows
    text: str = ""  # what was evaluated, in words
    tokenizer_hash: str = ""


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for; special tokens (EOS) stand for none.

    Exact for byte-level BPE (each character of a vocabulary entry is one byte); for other
    tokenizers, the length of the token decoded on its own.
    """
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if token not in special:
            lengths[i] = len(token) if byte_level else len(tokenizer.decode([i]).encode())
    return lengths


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    return total_nats / (math.log(2) * n_bytes)


@torch.no_grad()
def evaluate_batches(
    model: OLMo2, batches: list[dict[str, torch.Tensor]], byte_lengths: np.ndarray, device: str
) -> EvalResult:
    """Loss, perplexity and bits per byte over ``batches``, in fp32 with the trainer's loss."""
    model = model.to(device).eval()
    lengths = torch.from_numpy(byte_lengths)
    total = 0.0
    tokens = n_bytes = 0
    for batch in batches:
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        count = int(mask.sum())
        ce = model(batch["input_ids"].to(device), labels=labels.to(device)).ce
        total += float(ce) * count
        tokens += count
        n_bytes += int(lengths[labels[mask]].sum())
    if tokens == 0:
        raise ValueError("nothing to evaluate: no token to predict")
    loss = total / tokens
    return EvalResult(
        loss, math.exp(loss), bits_per_byte(total, n_bytes), tokens, n_bytes, len(batches)
    )


def evaluate(loaded: Loaded, config: TrainConfig, device: str = "cpu") -> EvalResult:
    """Evaluate on the held-out batches the trainer validates on, for ``config``'s data.

    The trainer's ranks each take an equal number of whole micro-batches from the start of the
    held-out windows: with world size W those are the first ``n // W * W`` of the micro-batches
    one process would take, so the mean equals the logged ``val/loss`` (in a ``32-true`` run).
    """
    data = config.data
    datamodule = OLMoDataModule(data, config.seed, rank=0, world_size=1)
    datamodule.setup()
    found = tokenizer_hash(datamodule.tokenizer)
    if found != tokenizer_hash(loaded.tokenizer) or datamodule.eos_id != loaded.eos_id:
        raise ValueError(
            f"{datamodule.tokenizer_path}: tokenizer hash {found} with EOS id "
            f"{datamodule.eos_id}, but {loaded.path} was trained with hash "
            f"{tokenizer_hash(loaded.tokenizer)} and EOS id {loaded.eos_id}"
        )
    datamodule.check_vocab(loaded.model.config.vocab_size)
    batches = list(datamodule.val_dataloader())
    world = config.trainer.world_size
    batches = batches[: len(batches) // world * world]
    result = evaluate_batches(
        loaded.model, batches, token_byte_lengths(datamodule.tokenizer), device
    )
    windows = sum(len(b["input_ids"]) for b in batches)
    text = (
        f"{windows} held-out windows of {data.seq_len + 1} tokens "
        f"(data.val_fraction={data.val_fraction}) of {_corpus(data)}"
    )
    return replace(result, context=data.seq_len, split="held-out", text=text, tokenizer_hash=found)


def _corpus(data: DataConfig) -> str:
    if data.source == "stdlib":
        return "the Python standard library's sources"
    if data.source == "files":
        return f"data.files={list(data.files)}"
    if data.source == "shards":
        return f"data.shards={data.shards}"
    return f"data.hf_path={data.hf_path}"


def eval_config(loaded: Loaded, overrides: list[str]) -> TrainConfig:
    """The run's config with ``key=value`` overrides that keep its held-out text and token ids.

    Any other data override would evaluate other text, or other token ids than the weights
    learned (the default tokenizer is derived from data settings): an error naming the setting.
    The data is read with the tokenizer file the run recorded.
    """
    if loaded.config is None:
        raise ValueError(
            f"{loaded.path}: a model folder has no held-out split of its own; name the text to "
            "evaluate with --text FILE..."
        )
    merged = OmegaConf.merge(OmegaConf.structured(loaded.config), OmegaConf.from_dotlist(overrides))
    config = load_config(merged)
    for name in (f.name for f in fields(DataConfig)):
        ours, runs = getattr(config.data, name), getattr(loaded.config.data, name)
        if name not in _EVAL_FREE_DATA_FIELDS and ours != runs:
            raise ConfigError(
                f"data.{name}={ours!r}: the run has {runs!r}; evaluation keeps the run's "
                "tokenizer, token ids and held-out split (overridable: data."
                f"{', data.'.join(_EVAL_FREE_DATA_FIELDS)}); evaluate other text whole with "
                "--text FILE..."
            )
    if loaded.tokenizer_dir is not None:
        config.data.tokenizer = str(loaded.tokenizer_dir)
    return config


def rolling_windows(
    stream: np.ndarray, lengths: np.ndarray, context: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(input_ids, labels)`` scoring every document of ``stream`` in windows of ``context``.

    ``stream`` is EOS followed by ``encode_documents``' output (each document then EOS), whose
    ``lengths`` count that EOS. As lm-eval's ``loglikelihood_rolling``: a document's tokens are
    predicted after the EOS before it, in disjoint spans of ``context`` tokens, each with as much
    of the document before it as fits (so the last is not short of context); the EOS after a
    document is not predicted. Labels already predicted by an earlier window are ignored.
    """
    windows = []
    start = 1
    for length in lengths.tolist():
        end_of_doc = start + length - 1
        for first in range(start, end_of_doc, context):
            stop = min(first + context, end_of_doc)
            lo = max(start - 1, stop - 1 - context)
            labels = stream[lo + 1 : stop].astype(np.int64)
            labels[: first - lo - 1] = IGNORE_INDEX
            windows.append((stream[lo : stop - 1].astype(np.int64), labels))
        start += length
    return windows


def evaluate_text(
    loaded: Loaded,
    files: list[str],
    context: int | None = None,
    text_field: str = "text",
    device: str = "cpu",
    batch_size: int = 8,
) -> EvalResult:
    """Every document of ``files`` (a ``.txt`` file, a ``.jsonl`` line, a ``.parquet`` row), whole.

    Scored as :func:`rolling_windows` says, with ``context`` defaulting to the length the run
    trained at (a model folder: its ``max_seq_len``). The total loss is minus the sum of
    lm-eval's rolling loglikelihoods and ``bits_per_byte`` its ``bits_per_byte``.
    """
    if loaded.eos_id is None:
        raise ValueError(f"{loaded.path}: its tokenizer has no EOS token to start documents after")
    max_len = loaded.model.config.max_seq_len
    if context is None:
        context = loaded.config.data.seq_len if loaded.config is not None else max_len
    if not 1 <= context <= max_len:
        raise ValueError(
            f"--context {context}: must be between 1 and the model's max_seq_len ({max_len})"
        )
    paths = expand_files(files)
    documents = [text for _, text in file_documents(paths, text_field)]
    flat, lengths = encode_documents(loaded.tokenizer, documents, loaded.eos_id)
    stream = np.concatenate([[loaded.eos_id], flat])
    windows = rolling_windows(stream, lengths, context)
    batches = [
        _padded(windows[i : i + batch_size], loaded.eos_id)
        for i in range(0, len(windows), batch_size)
    ]
    result = evaluate_batches(loaded.model, batches, token_byte_lengths(loaded.tokenizer), device)
    return replace(
        result,
        context=context,
        split="all",
        documents=len(documents),
        text=f"every document of {', '.join(map(str, paths))}",
        tokenizer_hash=tokenizer_hash(loaded.tokenizer),
    )


def _padded(windows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch, right-padded: a causal model's earlier positions never see the padding."""
    width = max(len(ids) for ids, _ in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, targets) in enumerate(windows):
        input_ids[row, : len(ids)] = torch.from_numpy(ids)
        labels[row, : len(targets)] = torch.from_numpy(targets)
    return {"input_ids": input_ids, "labels": labels}
