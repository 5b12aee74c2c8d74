"""lm-evaluation-harness's ``hf`` model on an exported run gives olmo-mini's own loglikelihoods.

The two tasks under ``lm_eval_tasks/`` are the ones docs/interop.md runs: a multiple-choice task
(loglikelihood of each choice after a context) and a rolling-loglikelihood task over whole
documents (perplexity, bits per byte), both reading local files.
"""

from __future__ import annotations

import json

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

from olmo_mini.evaluation import evaluate_batches, evaluate_text, token_byte_lengths
from olmo_mini.interop import export_hf, load
from olmo_mini.model import IGNORE_INDEX
from tests.training.helpers import REPO

TASKS = REPO / "tests" / "interop" / "lm_eval_tasks"


def _loglikelihood(loaded, context: str, continuation: str) -> float:
    """log p(continuation | context) scored by evaluate.py's code, with lm-eval's token split:
    the continuation's ids are those that encoding context + continuation adds to the context's."""
    whole = loaded.tokenizer.encode(context + continuation).ids
    n_context = len(loaded.tokenizer.encode(context).ids)
    labels = [IGNORE_INDEX] * (n_context - 1) + whole[n_context:]
    batch = {"input_ids": torch.tensor([whole[:-1]]), "labels": torch.tensor([labels])}
    result = evaluate_batches(loaded.model, [batch], token_byte_lengths(loaded.tokenizer), "cpu")
    return -result.loss * result.tokens


@pytest.mark.slow
def test_lm_eval_hf_model_gives_our_loglikelihoods(single_run, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    ours = load(single_run)
    context = ours.config.data.seq_len  # the trained context, not max_position_embeddings
    folder = export_hf(single_run, tmp_path / "hf")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32,max_length={context}",
        tasks=["olmo_mini_mc", "olmo_mini_rolling"],
        task_manager=TaskManager(include_path=str(TASKS)),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )

    requests = [
        (args, response[0])
        for sample in out["samples"]["olmo_mini_mc"]
        for args, response in zip(sample["arguments"], sample["resps"], strict=True)
    ]
    assert len(requests) == 18
    for (question, choice), (theirs, _) in requests:
        assert _loglikelihood(ours, question, choice) == pytest.approx(theirs, abs=1e-5)

    documents = out["samples"]["olmo_mini_rolling"]
    assert len(documents) == 5
    for sample in documents:  # documents of one to several windows of `context` tokens
        file = tmp_path / "doc.jsonl"
        file.write_text(json.dumps({"text": sample["target"]}) + "\n")
        result = evaluate_text(ours, [str(file)])
        assert -sample["resps"][0][0] / result.tokens == pytest.approx(result.loss, abs=1e-5)
    whole = evaluate_text(ours, [str(TASKS / "documents.jsonl")])
    assert whole.context == context and whole.tokens > 4 * context
    theirs = out["results"]["olmo_mini_rolling"]["bits_per_byte,none"]
    assert theirs == pytest.approx(whole.bits_per_byte, abs=1e-5)
