import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest

from olmo_mini.data import DataConfig, OLMoDataModule, load_tokenizer, read_manifest, write_shards
from olmo_mini.data.corpus import file_documents, is_val
from olmo_mini.data.shards import ShardInstances, verify_shards
from olmo_mini.integrity import ALGORITHM, file_digest

from .conftest import make_docs, write_jsonl


def module(shards: str, tokenizer: str | None = None, **kwargs) -> OLMoDataModule:
    config = DataConfig(
        source="shards",
        shards=shards,
        tokenizer=tokenizer,
        seq_len=16,
        global_batch_size=4,
        micro_batch_size=2,
        **kwargs,
    )
    dm = OLMoDataModule(config, seed=0, rank=0, world_size=1)
    dm.setup()
    return dm


def test_round_trip_and_manifest(shard_dir: Path, corpus: Path, tokenizer_path: Path) -> None:
    manifest = read_manifest(str(shard_dir))
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 300
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) > 1  # rolled over
    tokenizer = load_tokenizer(tokenizer_path)
    docs = [t for _, t in file_documents([corpus])]
    train_docs = [d for d in docs if not is_val(d, 0.1)]
    assert manifest["num_docs"] == {"train": len(train_docs), "val": len(docs) - len(train_docs)}
    tokens = np.concatenate(
        [
            np.fromfile(shard_dir / s["file"], np.uint16)
            for s in manifest["shards"]
            if s["split"] == "train"
        ]
    )
    ends = np.flatnonzero(tokens == 0) + 1
    decoded = [tokenizer.decode(d.tolist()) for d in np.split(tokens, ends)[:-1]]
    assert decoded == train_docs
    first = manifest["shards"][0]
    doc_ends = np.load(shard_dir / first["docs"])
    assert doc_ends[-1] == first["num_tokens"] and len(doc_ends) == first["num_docs"]


def test_parallel_prepare_writes_identical_bytes(
    tmp_path: Path, corpus: Path, tokenizer_path: Path, shard_dir: Path, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="olmo_mini.data.shards"):
        manifest = write_shards(
            file_documents([corpus]),
            load_tokenizer(tokenizer_path),
            0,
            tmp_path,
            source=str(corpus),
            val_fraction=0.1,
            procs=2,
            shard_tokens=4000,
        )
    docs, tokens = manifest["num_docs"], manifest["num_tokens"]
    total = tokens["train"] + tokens["val"]
    assert docs["train"] + docs["val"] == len(list(file_documents([corpus])))
    assert caplog.messages[-1] == (  # the closing line says what the manifest records
        f"tokenized {len(list(file_documents([corpus]))):,} documents (train {docs['train']:,}, "
        f"val {docs['val']:,}), {total / 1e6:.2f}M tokens (train {tokens['train'] / 1e6:.2f}M, "
        f"val {tokens['val'] / 1e6:.2f}M): the manifest's counts"
    )
    for path in shard_dir.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_fsspec_url_reads_the_same_instances(shard_dir: Path) -> None:
    fs = fsspec.filesystem("memory")
    for path in shard_dir.iterdir():
        fs.pipe(f"/bucket/ds/{path.name}", path.read_bytes())
    local, remote = module(str(shard_dir)), module("memory://bucket/ds")
    assert local.fingerprint == remote.fingerprint
    ids = np.arange(local._train.num_instances)
    np.testing.assert_array_equal(local._train.read(ids), remote._train.read(ids))
    batch = next(iter(remote.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16)


def copy_of(shard_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shard_dir, tmp_path / "copy"))


def test_missing_paths_are_named(tmp_path: Path, tokenizer_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere/manifest.json"):
        module(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        OLMoDataModule(
            DataConfig(source="files", files=[str(tmp_path / "missing.jsonl")]),
            seed=0,
            rank=0,
            world_size=1,
        ).setup()
    with pytest.raises(FileNotFoundError, match="tokenizer not found: .*gone"):
        module(str(tmp_path), tokenizer=str(tmp_path / "gone"))


def test_empty_corpus_is_named(tmp_path: Path, tokenizer_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty corpus: .*empty.jsonl"):
        write_shards(
            file_documents([empty]),
            load_tokenizer(tokenizer_path),
            0,
            tmp_path / "o",
            source=str(empty),
            val_fraction=0.1,
            procs=1,
        )


def test_truncated_shard_is_named(shard_dir: Path, tmp_path: Path) -> None:
    copy = copy_of(shard_dir, tmp_path)
    shard = copy / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt shard .*train-00001.bin"):
        module(str(copy))


def test_corrupt_manifest_is_named(shard_dir: Path, tmp_path: Path) -> None:
    copy = copy_of(shard_dir, tmp_path)
    (copy / "manifest.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="corrupt shard manifest .*manifest.json"):
        module(str(copy))


def test_tokenizer_mismatch_is_named(shard_dir: Path, tmp_path: Path) -> None:
    from olmo_mini.data import train_bpe

    other = tmp_path / "other.json"
    train_bpe(make_docs(50, seed=9), vocab_size=290).save(str(other))
    with pytest.raises(ValueError, match="tokenizer mismatch: .*other.json.*manifest.json"):
        module(str(shard_dir), tokenizer=str(other))


def test_ids_beyond_vocab_are_named(shard_dir: Path, tmp_path: Path) -> None:
    copy = copy_of(shard_dir, tmp_path)
    shard = copy / "train-00000.bin"
    tokens = np.fromfile(shard, np.uint16)
    tokens[5] = 4000  # not a token of the 300-id tokenizer
    tokens.tofile(shard)
    # As a shard consistently written with a foreign tokenizer: its digest matches its bytes.
    manifest = json.loads((copy / "manifest.json").read_text())
    with open(shard, "rb") as f:
        manifest["shards"][0][ALGORITHM] = file_digest(f)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    dm = module(str(copy))
    with pytest.raises(ValueError, match="token id 4000 .*train-00000.bin"):
        dm._train.read(np.arange(dm._train.num_instances))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["max_token_id"] = 4000
    (copy / "manifest.json").write_text(json.dumps(manifest))
    dm = module(str(copy))
    dm.check_vocab(4096 + 128)  # fits the larger model vocab
    with pytest.raises(ValueError, match="train-00000.bin holds token id 4000"):
        dm.check_vocab(384)
    with pytest.raises(ValueError, match="tokenizer .*has 300 ids"):
        dm.check_vocab(256)


def test_local_files_source_is_cached(tmp_path: Path, tokenizer_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", make_docs(40, seed=5))
    config = DataConfig(
        source="files",
        files=[str(tmp_path / "*.jsonl")],
        seq_len=16,
        tokenizer=str(tokenizer_path),
        global_batch_size=4,
        micro_batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    first = OLMoDataModule(config, seed=0, rank=0, world_size=1)
    first.setup()
    entries = list((tmp_path / "cache" / "shards").iterdir())
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    second = OLMoDataModule(config, seed=0, rank=0, world_size=1)
    second.setup()
    assert second.fingerprint == first.fingerprint
    assert list((tmp_path / "cache" / "shards").iterdir()) == entries
    assert path.exists()


def test_instances_drop_each_shard_remainder(shard_dir: Path) -> None:
    manifest = read_manifest(str(shard_dir))
    train = ShardInstances.open(str(shard_dir), "train", 16, manifest)
    expected = sum(s["num_tokens"] // 17 for s in manifest["shards"] if s["split"] == "train")
    assert train.num_instances == expected


def test_overwritten_shard_fails_its_digest(shard_dir: Path, tmp_path: Path) -> None:
    """Same size, other bytes: the size check passes, the first read checks the digest."""
    copy = copy_of(shard_dir, tmp_path)
    shard = copy / "train-00001.bin"
    tokens = np.fromfile(shard, np.uint16)
    tokens[:8] = tokens[8:16]  # still valid ids
    tokens.tofile(shard)
    dm = module(str(copy))
    with pytest.raises(ValueError, match="corrupt shard .*train-00001.bin: its digest"):
        dm._train.read(np.arange(dm._train.num_instances))
    assert verify_shards(str(shard_dir)) == []
    assert [p.split(":")[0] for p in verify_shards(str(copy))] == [
        f"corrupt shard {copy}/train-00001.bin"
    ]
    tool = Path(__file__).resolve().parents[2] / "tools" / "prepare_data.py"
    done = subprocess.run(
        [sys.executable, str(tool), "--verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "error: corrupt shard" in done.stderr
