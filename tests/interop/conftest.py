"""Shared by the interop tests: two tiny trained runs (one process, FSDP over two) and a
transformers-made Olmo2 folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Olmo2Config as HFOlmo2Config
from transformers import Olmo2ForCausalLM, PreTrainedTokenizerFast

from olmo_mini.interop import run_tokenizer
from tests.training.helpers import CHECKPOINTS, check, compose_config, run_train

RUN = [
    "debug=smoke",
    *CHECKPOINTS,
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.accelerator=cpu",
    "stability.enabled=false",
]


@pytest.fixture(scope="session")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    check(run_train(run_dir, *RUN))
    return run_dir


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp")
    check(run_train(run_dir, *RUN, "trainer=fsdp", "trainer.devices=2"))
    return run_dir


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers-made Olmo2 (the debug=smoke shape, norms perturbed) with the runs' tokenizer."""
    folder = tmp_path_factory.mktemp("hf")
    hf_config = HFOlmo2Config(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(hf_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
    model.save_pretrained(folder)
    tokenizer, eos = run_tokenizer(compose_config("debug=smoke"))
    eos_token = tokenizer.id_to_token(eos)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token).save_pretrained(folder)
    return folder
