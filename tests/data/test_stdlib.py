"""The embedded default corpus: on every machine, nothing downloaded."""

import socket
import sysconfig
from pathlib import Path

import pytest

from olmo_mini.data import DataConfig, OLMoDataModule
from olmo_mini.data.corpus import stdlib_files


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuses every network connection; local IPC (Unix sockets: the tokenizer workers'
    forkserver) still works."""
    connect = socket.socket.connect

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    def local_only(sock: socket.socket, address: object) -> None:
        if sock.family != socket.AF_UNIX:
            refuse()
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_stdlib_files_are_sorted_and_exclude_site_packages() -> None:
    files = stdlib_files()
    assert list(files) == sorted(files) and len(files) > 500
    root = Path(sysconfig.get_paths()["stdlib"])
    assert not any("site-packages" in f.relative_to(root).parts for f in files)


def test_default_pipeline_offline_and_cached(tmp_path: Path, no_network: None) -> None:
    config = DataConfig(
        max_docs=40,
        vocab_size=400,
        seq_len=32,
        global_batch_size=4,
        micro_batch_size=2,
        val_fraction=0.2,
        cache_dir=str(tmp_path / "a"),
    )
    dm = OLMoDataModule(config, seed=0, rank=0, world_size=1)
    dm.prepare_data()
    dm.setup()
    assert dm.vocab_size == 400 and dm.tokenizer.id_to_token(dm.eos_id) == "<|endoftext|>"
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32) and int(batch["input_ids"].max()) < 400
    assert len(list(dm.val_dataloader())) > 0
    tokenizer = Path(dm.tokenizer_path)
    built = tokenizer.stat().st_mtime_ns
    again = OLMoDataModule(config, seed=0, rank=0, world_size=1)
    again.setup()
    assert again.fingerprint == dm.fingerprint and tokenizer.stat().st_mtime_ns == built
    elsewhere = DataConfig(**{**config.__dict__, "cache_dir": str(tmp_path / "b")})
    rebuilt = OLMoDataModule(elsewhere, seed=0, rank=0, world_size=1)
    rebuilt.setup()  # a fresh cache reproduces the same tokenizer and data
    assert rebuilt.fingerprint == dm.fingerprint
