"""Triton RMSNorm kernels against the fp32 torch reference, on CPU through TRITON_INTERPRET=1.

Accuracy rule (flash-attn): ``|kernel - ref_fp32| <= 2 * |torch_same_dtype - ref_fp32| + atol``,
for outputs and every gradient. Every Triton test also checks the launch counter, so a
silent fallback to torch fails. Row counts stay small: the interpreter runs programs in Python.
"""

from __future__ import annotations

import pytest
import torch

from olmo_mini import kernels
from olmo_mini.kernels import add_rms_norm, qk_rms_norm, rms_norm
from olmo_mini.kernels.reference import add_rms_norm_torch, qk_rms_norm_torch, rms_norm_torch

pytestmark = pytest.mark.skipif(kernels.triton_norm is None, reason="triton is not installed")

EPS = 1e-6
ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@pytest.fixture
def launches():
    """The kernel launch counter, emptied for this test."""
    counter = kernels.triton_norm.LAUNCHES
    counter.clear()
    return counter


def assert_within(name: str, got: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, atol: float):
    """The flash-attn rule: at most twice torch's own error in the same dtype, plus atol."""
    assert got.shape == ref.shape and got.dtype == same.dtype, name
    err = (got.double() - ref.double()).abs()
    bound = 2 * (same.double() - ref.double()).abs() + atol
    excess = (err - bound).max().item()
    assert excess <= 0, f"{name}: error exceeds the bound by {excess:.3g} (max err {err.max():.3g})"


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Detached copies that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run(fn, inputs: list[torch.Tensor | None], grads: list[torch.Tensor]):
    """Outputs of ``fn(*inputs)`` and the gradients of every tensor input for upstream ``grads``."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads, strict=True)])
    return list(outs), [t.grad for t in inputs if t is not None]


def compare(
    triton_fn,
    torch_fn,
    inputs: list[torch.Tensor | None],
    dtype: torch.dtype,
    device: str = "cpu",
    name: str = "",
) -> None:
    """Triton and torch in ``dtype`` against torch in fp32 on the same values: outputs, grads.

    Activations are rounded to ``dtype`` first and the fp32 reference gets them upcast (as in
    flash-attn's tests), so only the computation differs; weights (1-D) stay fp32 as in the model.
    """
    low = [None if t is None else (t if t.dim() == 1 else t.to(dtype)).to(device) for t in inputs]
    ref = [None if t is None else t.float() for t in low]
    outs = torch_fn(*low)
    torch.manual_seed(1)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn(o.shape, device=device).to(dtype) for o in outs]

    got_out, got_grad = run(triton_fn, leaves(*low), grads)
    same_out, same_grad = run(torch_fn, leaves(*low), grads)
    ref_out, ref_grad = run(torch_fn, leaves(*ref), grads)
    for kind, got, same, want in (
        ("output", got_out, same_out, ref_out),
        ("grad", got_grad, same_grad, ref_grad),
    ):
        for i, (g, s, r) in enumerate(zip(got, same, want, strict=True)):
            assert_within(f"{name}{kind} {i}", g, s, r, ATOL[dtype])


def activation(layout: str, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A test activation with rows of ``d`` in the given memory layout."""
    if layout == "2d":
        x = scaled_rows(7, d)
    elif layout == "3d":
        x = scaled_rows(2, 3, d)
    elif layout == "transposed":  # rows permuted in memory: a view, no copy needed
        x = scaled_rows(3, 2, d).transpose(0, 1)
    elif layout == "strided":  # every other column: needs a copy to unit column stride
        x = scaled_rows(2, 3, 2 * d)[..., ::2]
    else:
        raise ValueError(layout)
    return x.to(dtype)


def scaled_rows(*shape: int) -> torch.Tensor:
    """Gaussian rows with RMS between 0.2 and 5, so rstd differs from 1 and between rows."""
    return torch.randn(shape) * (0.2 + 4.8 * torch.rand(*shape[:-1], 1))


def norm_weight(d: int) -> torch.Tensor:
    """Trained-looking norm weight: near one, not all equal."""
    return 1 + 0.3 * torch.randn(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [96, 1000, 4096])
@pytest.mark.parametrize("layout", ["2d", "3d", "transposed", "strided"])
def test_rms_norm(layout: str, d: int, dtype: torch.dtype, launches) -> None:
    torch.manual_seed(0)
    x, w = activation(layout, d), norm_weight(d)
    compare(
        lambda x, w: rms_norm(x, w, EPS, backend="triton"),
        lambda x, w: rms_norm_torch(x, w, EPS),
        [x, w],
        dtype,
    )
    assert launches == {"rms_norm_fwd": 1, "rms_norm_bwd": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [96, 1000, 4096])
def test_add_rms_norm(d: int, dtype: torch.dtype, launches) -> None:
    torch.manual_seed(0)
    residual, x, w = torch.randn(2, 3, d), activation("3d", d), norm_weight(d)
    compare(
        lambda r, x, w: add_rms_norm(r, x, w, EPS, backend="triton"),
        lambda r, x, w: add_rms_norm_torch(r, x, w, EPS),
        [residual, x, w],
        dtype,
    )
    assert launches == {"rms_norm_fwd": 1, "rms_norm_bwd": 1}


def test_add_rms_norm_mixed_layouts_and_dtypes(launches) -> None:
    """fp32 residual stream, bf16 sublayer output in a transposed layout: fp32 out, as torch."""
    torch.manual_seed(0)
    residual = torch.randn(2, 3, 200, requires_grad=True)
    x = torch.randn(3, 2, 200).transpose(0, 1).to(torch.bfloat16).requires_grad_()
    w = norm_weight(200).requires_grad_()
    out = add_rms_norm(residual, x, w, EPS, backend="triton")
    ref = add_rms_norm_torch(residual, x, w, EPS)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (residual, x, w), dout)
    want = torch.autograd.grad(ref, (residual, x, w), dout)
    assert [g.dtype for g in got] == [torch.float32, torch.bfloat16, torch.float32]
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2)
    assert launches == {"rms_norm_fwd": 1, "rms_norm_bwd": 1}


def test_rms_norm_without_weight(launches) -> None:
    torch.manual_seed(0)
    compare(
        lambda x: rms_norm(x, None, EPS, backend="triton"),
        lambda x: rms_norm_torch(x, None, EPS),
        [activation("3d", 1000)],
        torch.float32,
    )
    assert launches == {"rms_norm_fwd": 1, "rms_norm_bwd": 1}


def test_output_keeps_input_layout(launches) -> None:
    """A transposed ``[B, H, T, D]`` view is normalized in place of memory order, no copy."""
    x = torch.randn(2, 5, 4, 16).transpose(1, 2)
    y = rms_norm(x, torch.ones(16), EPS, backend="triton")
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, rms_norm_torch(x, torch.ones(16), EPS))


def qk_inputs(layout: str, d: int) -> list[torch.Tensor]:
    """q, k (GQA: 4 query heads, 2 kv heads) as the model makes them, and their weights."""
    b, t, h, hkv = 2, 20, 4, 2
    q, k = scaled_rows(b, t, h * d), scaled_rows(b, t, hkv * d)
    if layout == "full":
        return [q, k, norm_weight(h * d), norm_weight(hkv * d)]
    q = q.view(b, t, h, d).transpose(1, 2)
    k = k.view(b, t, hkv, d).transpose(1, 2)
    return [q, k, norm_weight(d), norm_weight(d)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("layout", "d"), [("full", 24), ("head", 16), ("head", 96)])
def test_qk_rms_norm(layout: str, d: int, dtype: torch.dtype, launches) -> None:
    """One launch forward and one backward for q and k together, both model layouts."""
    torch.manual_seed(0)
    compare(
        lambda q, k, wq, wk: qk_rms_norm(q, k, wq, wk, EPS, backend="triton"),
        lambda q, k, wq, wk: qk_rms_norm_torch(q, k, wq, wk, EPS),
        qk_inputs(layout, d),
        dtype,
    )
    assert launches == {"qk_rms_norm_fwd": 1, "qk_rms_norm_bwd": 1}


def test_qk_rms_norm_without_weights(launches) -> None:
    torch.manual_seed(0)
    q, k, _, _ = qk_inputs("head", 16)
    compare(
        lambda q, k: qk_rms_norm(q, k, None, None, EPS, backend="triton"),
        lambda q, k: qk_rms_norm_torch(q, k, None, None, EPS),
        [q, k],
        torch.float32,
    )
    assert launches == {"qk_rms_norm_fwd": 1, "qk_rms_norm_bwd": 1}


def test_backward_is_deterministic(launches) -> None:
    """dW comes from per-program partials summed in a fixed order: bitwise repeatable."""
    torch.manual_seed(0)
    x, w = torch.randn(13, 1000), norm_weight(1000).requires_grad_()
    dy = torch.randn(13, 1000)
    grads = [torch.autograd.grad(rms_norm(x, w, EPS, backend="triton"), w, dy)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_empty_input(launches) -> None:
    x = torch.randn(0, 3, 64, requires_grad=True)
    w = torch.ones(64, requires_grad=True)
    y = rms_norm(x, w, EPS, backend="triton")
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(w.grad, torch.zeros(64))


def test_auto_and_torch_backends_do_not_launch(launches) -> None:
    """On CPU tensors "auto" means torch; "torch" always does."""
    x, w = torch.randn(4, 32), torch.ones(32)
    for backend in ("auto", "torch"):
        torch.testing.assert_close(rms_norm(x, w, EPS, backend), rms_norm_torch(x, w, EPS))
        add_rms_norm(x, x, w, EPS, backend)
        qk_rms_norm(x, x, w, w, EPS, backend)
    assert not launches


def test_backend_errors(monkeypatch) -> None:
    x, w = torch.randn(4, 32), torch.ones(32)
    with pytest.raises(ValueError, match="norm backend must be one of"):
        rms_norm(x, w, EPS, backend="cuda")
    monkeypatch.setattr(kernels.triton_norm, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm(x, w, EPS, backend="triton")
    monkeypatch.setattr(kernels, "triton_norm", None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        rms_norm(x, w, EPS, backend="triton")
    torch.testing.assert_close(rms_norm(x, w, EPS, "auto"), rms_norm_torch(x, w, EPS))


def test_torch_compile_fullgraph(launches) -> None:
    """The Triton path traces into one graph (custom ops with fake impls) and still launches."""
    torch.manual_seed(0)
    residual, x = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    q, k, wq, wk = qk_inputs("head", 16)
    w = norm_weight(64)

    def step(residual, x, w, q, k, wq, wk):
        h = add_rms_norm(residual, x, w, EPS, backend="triton")
        qn, kn = qk_rms_norm(q, k, wq, wk, EPS, backend="triton")
        return (rms_norm(h, w, EPS, backend="triton") ** 3).sum() + (qn**3).sum() + (kn**3).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    inputs = leaves(residual, x, w, q, k, wq, wk)
    compiled(*inputs).backward()
    assert launches["rms_norm_fwd"] == 2 and launches["qk_rms_norm_bwd"] == 1
    eager_inputs = leaves(residual, x, w, q, k, wq, wk)
    step(*eager_inputs).backward()
    for a, b in zip(inputs, eager_inputs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
