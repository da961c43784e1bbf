"""Widening a Neuroverse3D (vicl_fast.models.neuroverse3d.widen): the wide model computes exactly what
the narrow one did, every old weight is kept, and the new weights can learn."""

from __future__ import annotations

import pytest
import torch

from vicl_fast.models.neuroverse3d.model import Neuroverse3D
from vicl_fast.models.neuroverse3d.widen import widen_state_dict


def _pair(old, new, seed=0):
    torch.manual_seed(seed)
    narrow = Neuroverse3D(channels=old).double()
    for p in narrow.parameters():  # not the initialisation: weights a training could have left
        p.data.normal_(0, 0.3 / p[0].numel() ** 0.5)
    wide = Neuroverse3D(channels=new).double()
    sd, was_old = widen_state_dict(narrow.state_dict(), old, new, wide.state_dict())
    wide.load_state_dict(sd)
    return narrow, wide, was_old


@pytest.mark.parametrize("old,new", [((4, 8, 16), (8, 12, 16)), ((4, 8, 16, 32), (6, 8, 24, 32)),
                                     ((8, 16, 32, 64, 128), (16, 24, 32, 64, 128))])
def test_wide_model_computes_what_the_narrow_one_did(old, new):
    narrow, wide, was_old = _pair(old, new)
    g = torch.Generator().manual_seed(1)
    S = 2 ** (len(old) - 1) * 2
    x = torch.rand(2, 1, S, S, S, generator=g, dtype=torch.float64)
    ci = torch.rand(2, 3, 1, S, S, S, generator=g, dtype=torch.float64)
    co = (torch.rand(2, 3, 1, S, S, S, generator=g) > 0.5).double()
    with torch.no_grad():
        a, b = narrow(x, ci, co, fast=False), wide(x, ci, co, fast=False)
    assert a.abs().max() > 0.01
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    # every narrow weight is somewhere in the wide one, nothing else counts as old
    n_old = sum(int(m.sum()) for m in was_old.values())
    assert n_old == sum(p.numel() for p in narrow.parameters())
    assert n_old < sum(p.numel() for p in wide.parameters())


def test_new_channels_get_gradients():
    narrow, wide, was_old = _pair((4, 8, 16), (8, 12, 16))
    S = 8
    x = torch.rand(1, 1, S, S, S, dtype=torch.float64)
    ci, co = torch.rand(1, 2, 1, S, S, S, dtype=torch.float64), torch.ones(1, 2, 1, S, S, S, dtype=torch.float64)
    wide(x, ci, co, fast=False).square().mean().backward()
    new_grads = [p.grad[~was_old[n]].abs().sum() for n, p in wide.named_parameters() if (~was_old[n]).any()]
    assert sum(new_grads) > 0


@pytest.mark.parametrize("old,new,text", [((4, 8), (4, 8, 16), "same number of stages"),
                                          ((8, 16), (4, 16), "at least as wide"),
                                          ((4, 8, 16), (8, 8, 16), "pooling"),
                                          ((4, 8, 8), (4, 8, 8), "different width per stage")])
def test_impossible_widenings_are_refused(old, new, text):
    with pytest.raises(ValueError, match=text):
        widen_state_dict(Neuroverse3D(channels=old).state_dict(), old, new, Neuroverse3D(channels=old).state_dict())
