"""fedsynsam.optim.Adam equals torch.optim.Adam (single-tensor, the CPU path) to the bit."""

from __future__ import annotations

import pytest
import torch

from fedsynsam.optim import Adam


def _run(make_opt, steps: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=gen).requires_grad_(True)
    b = torch.randn(4, generator=gen).requires_grad_(True)
    c = torch.tensor(0.3, requires_grad=True)
    target = torch.randn(5, 3, generator=gen)
    opt = make_opt(a, b, c)
    for i in range(steps):
        loss = (a - target).pow(2).sum() * c.exp() + (b.sin() * (i + 1)).sum()
        if i == 3:  # b gets no gradient at one step: its moments must not advance
            loss = (a - target).pow(2).sum() * c.exp()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [a.detach(), b.detach(), c.detach()]


def test_adam_equals_torch_adam_bit_for_bit():
    ours = _run(lambda a, b, c: Adam([([a, b], 0.05), ([c], 0.01)]))
    theirs = _run(
        lambda a, b, c: torch.optim.Adam([{"params": [a, b], "lr": 0.05}, {"params": [c], "lr": 0.01}], foreach=False)
    )
    for x, y in zip(ours, theirs):
        assert torch.equal(x, y), (x, y)


@pytest.mark.parametrize("lr", [0, -1.0, float("nan"), "0.1"])
def test_adam_rejects_bad_lr(lr):
    with pytest.raises(ValueError, match="lr must be"):
        Adam([([torch.zeros(2, requires_grad=True)], lr)])


def test_adam_rejects_non_leaf_or_frozen_tensors():
    with pytest.raises(ValueError, match="leaf tensors"):
        Adam([([torch.zeros(2)], 0.1)])
    with pytest.raises(ValueError, match="leaf tensors"):
        Adam([([torch.zeros(2, requires_grad=True) * 2], 0.1)])
