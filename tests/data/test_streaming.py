"""HF streaming: tokenized in workers, packed, exact resume mid-stream."""

from itertools import islice
from pathlib import Path

import pytest
import torch

from olmo_mini.data import DataConfig, OLMoDataModule

from .conftest import make_docs, write_jsonl

SEQ, GLOBAL, MICRO = 16, 6, 1


def module(
    files: list[str], tokenizer: Path, rank: int, world: int, workers: int, **kwargs
) -> OLMoDataModule:
    kwargs = {"val_fraction": 0.1, **kwargs}
    config = DataConfig(
        source="hf_stream",
        hf_path="json",
        hf_data_files=files,
        tokenizer=str(tokenizer),
        seq_len=SEQ,
        global_batch_size=GLOBAL,
        micro_batch_size=MICRO,
        num_workers=workers,
        val_batches=1,
        **kwargs,
    )
    dm = OLMoDataModule(config, seed=0, rank=rank, world_size=world)
    dm.setup()
    return dm


def rank_batches(dm: OLMoDataModule, count: int) -> list[torch.Tensor]:
    """The rank's first ``count`` micro-batches as windows of seq_len + 1 tokens."""
    return [
        torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1)
        for b in islice(dm.train_dataloader(), count)
    ]


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2)])
def test_resume_mid_stream_is_exact(
    corpus: Path, tokenizer_path: Path, world: int, workers: int
) -> None:
    accum = GLOBAL // (MICRO * world)
    consumed = 3  # with accum 3 and 2 workers the resumed loader starts on the other worker
    for rank in range(world):
        dm = module([str(corpus)], tokenizer_path, rank, world, workers)
        uninterrupted = rank_batches(dm, (consumed + 2) * accum)
        dm.consumed_global_batches = consumed
        state = dm.state_dict()
        resumed_dm = module([str(corpus)], tokenizer_path, rank, world, workers)
        resumed_dm.load_state_dict(state)
        resumed = rank_batches(resumed_dm, 2 * accum)
        for a, b in zip(resumed, uninterrupted[consumed * accum :], strict=True):
            assert torch.equal(a, b)


def test_stream_tokens_cover_the_documents(tmp_path: Path, tokenizer_path: Path) -> None:
    docs = make_docs(12, seed=4)
    path = write_jsonl(tmp_path / "few.jsonl", docs)
    dm = module([str(path)], tokenizer_path, 0, 1, 0, val_fraction=0.0, hf_val_split="train")
    batches = rank_batches(dm, 200)
    text = dm.tokenizer.decode(torch.cat(batches).flatten().tolist(), skip_special_tokens=False)
    # Packed in stream order, each document ending with EOS, wrapping into the next epoch.
    eos = "<|endoftext|>"
    assert text.startswith(eos.join(docs) + eos + docs[0][:40])
    val = [b["input_ids"] for b in dm.val_dataloader()]
    assert len(val) == GLOBAL // MICRO


def test_layout_is_part_of_the_fingerprint(corpus: Path, tokenizer_path: Path) -> None:
    state = module([str(corpus)], tokenizer_path, 0, 1, 0).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        module([str(corpus)], tokenizer_path, 0, 1, 2).load_state_dict(state)


def test_bad_stream_inputs_are_named(tmp_path: Path, tokenizer_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        module([str(tmp_path / "absent.jsonl")], tokenizer_path, 0, 1, 0)
    one = write_jsonl(tmp_path / "one.jsonl", ["only one"])
    with pytest.raises(KeyError, match="one.jsonl.* no field 'content'"):
        module([str(one)], tokenizer_path, 0, 1, 0, text_field="content")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty corpus: .*empty.jsonl"):
        module([str(empty)], tokenizer_path, 0, 1, 0)
