"""``HostSyncDetector``'s rules, op by op: the CPU proxy on real tensors, the CUDA boundary on
fake CUDA tensors (``FakeTensorMode`` on this CPU build runs creation and copies, not much
more: indexing a fake CUDA tensor fails with "not linked with support for cuda devices")."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from olmo_mini.stability.metrics import device_scalar
from olmo_mini.training.syncs import HostSyncDetector

X = torch.tensor([1.0, -2.0, 3.0])
REPEATS = torch.tensor([1, 2, 1])

SYNCS = {
    "item": (lambda: X[0].item(), "aten._local_scalar_dense.default"),
    "float": (lambda: float(X[0]), "aten._local_scalar_dense.default"),
    "if": (lambda: bool(X[0] > 0), "aten._local_scalar_dense.default"),
    "equal": (lambda: torch.equal(X, X), "aten.equal.default"),
    "nonzero": (lambda: X.nonzero(), "aten.nonzero.default"),
    "masked_select": (lambda: X.masked_select(X > 0), "aten.masked_select.default"),
    "unique": (lambda: X.unique(), "aten._unique2.default"),
    "mask": (lambda: X[X > 0], "aten.index.Tensor"),
    "repeat_interleave": (lambda: X.repeat_interleave(REPEATS), "aten.repeat_interleave.Tensor"),
    "tensor": (lambda: torch.tensor(2.0, device=X.device), "aten.lift_fresh.default"),
    "as_tensor": (lambda: torch.as_tensor([1.0, 2.0]), "aten.lift_fresh.default"),
    "tolist": (lambda: X.tolist(), "Tensor.tolist"),
    "numpy": (lambda: X.numpy(), "Tensor.numpy"),
}

NO_SYNCS = {
    "full": lambda: torch.full((), 2.0),
    "new_full": lambda: X.new_full((), float("-inf")),
    "python scalar operand": lambda: X * 2.0 + 1,
    "where with a scalar": lambda: torch.where(X > 0, X, 0.0),
    "repeat_interleave with output_size": lambda: X.repeat_interleave(REPEATS, output_size=4),
    "repeat_interleave by an int": lambda: X.repeat_interleave(2),
    "integer indexing": lambda: X[torch.arange(2)],
    "device_scalar": lambda: device_scalar(7, X.device),
}


@pytest.mark.parametrize("name", SYNCS)
def test_the_proxy_records_each_kind_of_sync(name):
    run, op = SYNCS[name]
    with HostSyncDetector("cpu") as detector:
        detector.label = "here"
        run()
    assert [(s.op, s.label, s.caller.name) for s in detector.records] == [(op, "here", "<lambda>")]


@pytest.mark.parametrize("name", NO_SYNCS)
def test_the_proxy_passes_ops_that_keep_the_host_free(name):
    with HostSyncDetector("cpu") as detector:
        NO_SYNCS[name]()
    assert detector.records == []


def test_on_cuda_copies_across_the_boundary_are_syncs():
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(3, device="cuda")
        with HostSyncDetector("cuda") as detector:
            torch.tensor(2.0, device="cuda")  # made on the host, then copied
            x.cpu()
            torch.full((), 2.0, device="cuda")
            device_scalar(2.0, x.device)
            torch.where(x > 0, x, 0.0) * 2.0
    assert [(s.op, s.reason) for s in detector.records] == [
        ("aten._to_copy.default", "host-to-device copy (blocking or from pageable memory)"),
        ("aten._to_copy.default", "device-to-host copy"),
    ]


def test_device_scalar_is_torch_tensor_of_the_float_bit_for_bit():
    for value in (0, 7, 3 * 2**24 + 1, 1e-30, float("-inf")):
        expected = torch.tensor(float(value))
        assert torch.equal(device_scalar(value, torch.device("cpu")), expected)
        assert device_scalar(value, torch.device("cpu")).dtype == expected.dtype
