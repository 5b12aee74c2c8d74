import pytest

from olmo_mini.data import DataConfig, padded_vocab_size


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "data.seq_len"),
        ({"source": "web"}, "data.source"),
        ({"global_batch_size": 10, "micro_batch_size": 4}, "data.global_batch_size"),
        ({"source": "shards"}, "data.shards"),
        ({"source": "files"}, "data.files"),
        ({"source": "hf_stream"}, "data.hf_path"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"num_workers": -1}, "data.num_workers"),
    ],
)
def test_validation_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_grad_accum_steps() -> None:
    config = DataConfig(global_batch_size=24, micro_batch_size=4)
    assert config.grad_accum_steps(1) == 6
    assert config.grad_accum_steps(3) == 2
    with pytest.raises(ValueError, match=r"micro_batch_size × world size \(4 × 4 = 16\)"):
        config.grad_accum_steps(4)


def test_padded_vocab_size() -> None:
    assert padded_vocab_size(4096) == 4096
    assert padded_vocab_size(4097) == 4224
    assert padded_vocab_size(100278) == 100352
