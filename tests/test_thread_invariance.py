"""The same numbers at any thread count (README, "The same image every time"): the
conditioning net at inference (its convolutions without oneDNN) and the small matrix products
of a verify step (Intel MKL in strict reproducibility mode, ``MKL_CBWR`` set by the package)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import bpd_sr  # noqa: F401  (sets MKL_CBWR before the first matrix product)
from bpd_sr.model.conditioning import ConditioningNet


def _at(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return fn()
    finally:
        torch.set_num_threads(before)


def test_the_package_asks_mkl_for_reproducible_sums():
    assert os.environ.get("MKL_CBWR")


@pytest.mark.parametrize("threads", [2, 3])
def test_the_conditioning_net_gives_the_same_output_at_any_thread_count(threads):
    torch.manual_seed(0)
    net = ConditioningNet(96, 6, head="gaussian", flip_average=True).eval()  # the shipped shape
    with torch.no_grad():
        net.out.weight.normal_(0, 0.05)
    lr = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    assert torch.equal(_at(1, lambda: net.gaussian_parameters(lr)[0]),
                       _at(threads, lambda: net.gaussian_parameters(lr)[0]))
    assert torch.equal(_at(1, lambda: net.departure(lr)), _at(threads, lambda: net.departure(lr)))


@pytest.mark.parametrize("rows", [1, 10, 11])
def test_a_verify_steps_matrix_products_are_the_same_at_any_thread_count(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 192, generator=g), torch.randn(768, 192, generator=g)
    assert torch.equal(_at(1, lambda: F.linear(x, w)), _at(2, lambda: F.linear(x, w)))
