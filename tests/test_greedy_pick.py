"""Greedy picks (``runtime/greedy_pick.py``): the C++ kernel and the torch fallback give argmax's token,
ties to the lowest id, and -1 for every kind of non-finite row, at any vocabulary size (vector tails too)."""

from __future__ import annotations


import pytest
import torch

from sglite.runtime.kernels import library as native_kernels
from sglite.runtime.kernels.greedy_pick import greedy_pick


def rows_of_every_kind(vocab: int) -> torch.Tensor:
    torch.manual_seed(vocab)
    logits = torch.randn(9, vocab) * 4
    logits[1, [vocab // 3, vocab // 2, vocab - 1]] = 50.0  # a three-way tie for the maximum
    logits[2, vocab - 1] = 60.0  # the maximum in the last position (a vector tail for most sizes)
    logits[3, vocab // 2] = float("nan")
    logits[4, 0] = float("inf")
    logits[5] = float("-inf")
    logits[6, : vocab - 1] = float("-inf")  # one allowed token left, as under a constraint
    logits[7, vocab - 1] = float("nan")  # nan in the tail
    logits[8] = -3.0  # all equal: the first
    return logits


def expected(logits: torch.Tensor) -> list[int]:
    return [int(row.argmax()) if bool(torch.isfinite(row.max())) else -1 for row in logits]


kernel_builds = pytest.mark.skipif(
    not native_kernels.toolchain_found(), reason="no C++ compiler or ninja to build the kernel with"
)


@kernel_builds
@pytest.mark.parametrize("vocab", [1, 7, 16, 33, 1000, 49152])
def test_the_kernel_picks_argmaxs_token_or_minus_one(vocab):
    assert native_kernels.load()
    logits = rows_of_every_kind(vocab) if vocab > 1 else torch.tensor([[2.0], [float("nan")], [float("-inf")]])
    got = torch.ops.sglite.greedy_pick(logits)
    want = expected(logits)
    assert got.tolist() == want
    assert want.count(-1) >= 2  # the non-finite rows were really exercised


@pytest.mark.parametrize("vocab", [7, 1000])
def test_the_torch_fallback_keeps_the_same_contract(monkeypatch, vocab):
    monkeypatch.setattr(native_kernels, "_library", [])  # is_loaded() is False
    logits = rows_of_every_kind(vocab)
    assert greedy_pick(logits).tolist() == expected(logits)


@kernel_builds
def test_greedy_pick_goes_to_the_kernel_for_float32_cpu_logits(monkeypatch):
    assert native_kernels.load()
    calls = []
    real = torch.ops.sglite.greedy_pick

    class Counting:
        def __call__(self, logits):
            calls.append(logits.shape)
            return real(logits)

    monkeypatch.setattr(torch.ops.sglite, "greedy_pick", Counting())
    logits = rows_of_every_kind(100)
    assert greedy_pick(logits).tolist() == expected(logits) and calls == [(9, 100)]
    assert greedy_pick(logits.bfloat16()).tolist() == expected(logits.bfloat16().float()) and len(calls) == 1
