"""The GPU paths: compiled Triton norm kernels, custom-op registration, the Triton model, bf16 HF
parity, FlexAttention soft-capping, FSDP2 with bf16 mixed precision and found_inf under NCCL,
whole-model compile, a training step that never waits for the GPU. Skipped without CUDA; ``tools/gpu_check.py`` runs them and summarizes.

Tolerances follow flash-attn's rule where a low-precision result is checked:
``|result - fp32 reference| <= 2 * |torch in the same dtype - fp32 reference| + atol``.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olmo_mini.kernels import add_rms_norm, qk_rms_norm, rms_norm, triton_norm
from olmo_mini.kernels.reference import add_rms_norm_torch, qk_rms_norm_torch, rms_norm_torch
from olmo_mini.model import OLMo2, OLMo2Config
from olmo_mini.model.model import softcapped_attention
from tests.kernels.test_norm_kernels import (
    assert_within,
    compare,
    norm_weight,
    qk_inputs,
    scaled_rows,
)
from tests.training.helpers import check, host_syncs, run_train, series

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]

EPS = 1e-6
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _tiny(**overrides: object) -> OLMo2Config:
    fields = dict(
        vocab_size=1000,
        d_model=96,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_size=200,
        max_seq_len=128,
    )
    return OLMo2Config(**{**fields, **overrides})


def _norm_case(op: str, d: int) -> tuple[list[torch.Tensor], object, object]:
    """CPU inputs (odd row counts) and the Triton and torch functions of ``op``."""
    if op == "rms_norm":
        return (
            [scaled_rows(3, 37, d), norm_weight(d)],
            lambda x, w: rms_norm(x, w, EPS, backend="triton"),
            lambda x, w: rms_norm_torch(x, w, EPS),
        )
    if op == "add_rms_norm":
        return (
            [torch.randn(3, 37, d), scaled_rows(3, 37, d), norm_weight(d)],
            lambda r, x, w: add_rms_norm(r, x, w, EPS, backend="triton"),
            lambda r, x, w: add_rms_norm_torch(r, x, w, EPS),
        )
    return (
        qk_inputs("head", d),
        lambda q, k, wq, wk: qk_rms_norm(q, k, wq, wk, EPS, backend="triton"),
        lambda q, k, wq, wk: qk_rms_norm_torch(q, k, wq, wk, EPS),
    )


@DTYPES
@pytest.mark.parametrize("d", [96, 1001, 4096])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "qk_rms_norm"])
def test_compiled_triton_norms_match_the_fp32_reference(op: str, d: int, dtype) -> None:
    """Forward and every gradient, on the GPU, against torch in fp32 on the same values."""
    torch.manual_seed(0)
    inputs, triton_fn, torch_fn = _norm_case(op, d)
    compare(triton_fn, torch_fn, inputs, dtype, device="cuda", name=f"{op} ")


def test_custom_ops_pass_opcheck() -> None:
    """Schemas, fake (meta) implementations and dispatch of every olmo_mini:: op."""
    torch.manual_seed(0)
    x, residual = torch.randn(5, 300, device="cuda"), torch.randn(5, 300, device="cuda")
    w = torch.randn(300, device="cuda")
    out, rstd = triton_norm.rms_norm_fwd(x, w, residual, EPS)
    torch.library.opcheck(triton_norm.rms_norm_fwd, (x, w, residual, EPS))
    torch.library.opcheck(triton_norm.rms_norm_fwd, (x, None, None, EPS))
    torch.library.opcheck(triton_norm.rms_norm_bwd, (torch.randn_like(out), x, w, rstd))
    q, k, wq, wk = (t.cuda() for t in qk_inputs("head", 32))
    q_out, k_out, rstd_q, rstd_k = triton_norm.qk_rms_norm_fwd(q, k, wq, wk, EPS)
    torch.library.opcheck(triton_norm.qk_rms_norm_fwd, (q, k, wq, wk, EPS))
    torch.library.opcheck(
        triton_norm.qk_rms_norm_bwd,
        (torch.randn_like(q_out), torch.randn_like(k_out), q, k, wq, wk, rstd_q, rstd_k),
    )


def _loss_and_grads(model: OLMo2, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(ids[:, :-1], labels=ids[:, 1:], z_loss=1e-4).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def _pair(config: OLMo2Config, other: dict) -> tuple[OLMo2, OLMo2]:
    """Two models with the same weights, the second with ``other`` config fields."""
    torch.manual_seed(0)
    first = OLMo2(config).cuda()
    second = OLMo2(OLMo2Config(**{**config.to_dict(), **other})).cuda()
    second.load_state_dict(first.state_dict())
    return first, second


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_triton_model_equals_torch_model(compiled: bool) -> None:
    """norm_backend=triton against torch: loss and every gradient; compiled: the whole model
    (with its loss) as the trainer compiles it on one device, Triton ops inside the graph."""
    reference, model = _pair(_tiny(norm_backend="torch"), {"norm_backend": "triton"})
    if compiled:
        model.compile()
    ids = torch.randint(
        1000, (2, 65), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)
    )
    triton_norm.LAUNCHES.clear()
    loss, grads = _loss_and_grads(model, ids)
    assert triton_norm.LAUNCHES, "the Triton kernels did not run"
    want_loss, want_grads = _loss_and_grads(reference, ids)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_logits_match_transformers(tmp_path) -> None:
    """bf16 on the GPU, both against transformers in fp32: olmo-mini's error is at most twice
    transformers' own bf16 error plus 0.05 (logits of order 1)."""
    from transformers import Olmo2ForCausalLM

    torch.manual_seed(0)
    OLMo2(_tiny(n_kv_heads=4)).save_hf(tmp_path)
    ids = torch.randint(1000, (2, 50), device="cuda")
    with torch.no_grad():
        ref = Olmo2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda()(ids).logits
        theirs = Olmo2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda()(ids).logits
        ours = OLMo2.from_hf(tmp_path, dtype=torch.bfloat16).cuda()(ids)
    assert_within("logits", ours.float(), theirs.float(), ref, 0.05)


@DTYPES
def test_flex_attention_softcap_equals_the_math_path(dtype) -> None:
    """FlexAttention (no mask: the CUDA training path) against the math path (explicit mask)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=dtype) for _ in range(3))
    mask = torch.ones(256, 256, dtype=torch.bool, device="cuda").tril()
    flex = softcapped_attention(q, k, v, cap=5.0, scale=64**-0.5)
    math = softcapped_attention(q, k, v, cap=5.0, scale=64**-0.5, mask=mask)
    ref = softcapped_attention(q.float(), k.float(), v.float(), cap=5.0, scale=64**-0.5, mask=mask)
    assert_within("attention", flex, math, ref, 2e-3 if dtype == torch.float32 else 2e-2)


def test_a_training_step_never_waits_for_the_gpu(tmp_path, monkeypatch) -> None:
    """``tests/training/test_train.py``'s no-host-sync check on a GPU, in bf16: CUDA's own
    check (``torch.cuda.set_sync_debug_mode("error")``) raises inside every step, and the
    detector sees the real host/device boundary; each flush copies to the host once."""
    syncs = host_syncs(
        tmp_path,
        monkeypatch,
        "trainer.accelerator=gpu",
        "trainer.precision=bf16-mixed",
        device="cuda",
    )
    assert {label: ops for label, ops in syncs.items() if isinstance(label, int)} == {}
    flushes = {("flush", 3), ("flush", 6), ("flush", "validation")}
    assert {label: ops for label, ops in syncs.items() if label in flushes} == dict.fromkeys(
        flushes, ["aten._to_copy.default in recorder.py:flush"]
    )  # tolist's device-to-host copy


def _gpus() -> int:
    return min(2, torch.cuda.device_count()) if CUDA else 0


def test_fsdp_bf16_mixed_matches_one_gpu(tmp_path) -> None:
    """FSDP2 over the available GPUs (1 or 2) with bf16 params and fp32 reduce: the loss curve of
    one GPU within bf16 noise."""
    common = [
        "debug=smoke",
        "trainer.accelerator=gpu",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
    ]
    check(run_train(tmp_path / "one", *common))
    check(run_train(tmp_path / "fsdp", *common, "trainer=fsdp", f"trainer.devices={_gpus()}"))
    one, fsdp = series(tmp_path / "one", "train/loss"), series(tmp_path / "fsdp", "train/loss")
    assert sorted(fsdp) == [1, 2, 3, 4]
    for step in fsdp:
        assert fsdp[step] == pytest.approx(one[step], rel=2e-2), step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _found_inf_worker(rank: int, world: int, port: int, results: dict) -> None:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from olmo_mini.config import OptimConfig
    from olmo_mini.training.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).cuda()
        fully_shard(model, mesh=init_device_mesh("cuda", (world,)))
        optimizer = build_optimizer(model, OptimConfig(lr=0.1))

        def step(skip: bool) -> list[torch.Tensor]:
            model(torch.randn(3, 8, device="cuda")).sum().backward()
            optimizer.found_inf = torch.tensor(float(skip), device="cuda")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return [p.full_tensor().clone() for p in model.parameters()]

        before = [p.full_tensor().clone() for p in model.parameters()]
        after_skip, after_step = step(skip=True), step(skip=False)
        results[rank] = (
            all(torch.equal(a, b) for a, b in zip(before, after_skip, strict=True)),
            not any(torch.equal(a, b) for a, b in zip(before, after_step, strict=True)),
        )
    finally:
        dist.destroy_process_group()


def test_found_inf_skips_a_sharded_step_under_nccl() -> None:
    world = _gpus()
    results = mp.Manager().dict()
    mp.spawn(_found_inf_worker, args=(world, _free_port(), results), nprocs=world, join=True)
    assert dict(results) == {rank: (True, True) for rank in range(world)}
