"""Losses of Neuroverse3D against hand-computed values and autograd gradcheck."""
from __future__ import annotations

import pytest
import torch

from vicl_fast import losses


def test_modified_smooth_l1_hand_values():
    pred = torch.tensor([0.0, 0.5, -0.5, 1.0, 3.0, -2.5], dtype=torch.float64).view(1, 1, 6)
    tgt = torch.zeros_like(pred)
    # |d|^3/3 below 1, |d| - 2/3 from 1 on
    per = [0.0, 0.125 / 3, 0.125 / 3, 1 / 3, 3 - 2 / 3, 2.5 - 2 / 3]
    got = losses.modified_smooth_l1(pred, tgt, reduction="none")
    assert got.shape == (1,)
    assert torch.allclose(got, torch.tensor([sum(per) / 6], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.isclose(losses.segmentation_loss(pred, tgt), torch.tensor(sum(per) / 6, dtype=torch.float64))
    # continuity at |d| = 1 and the gradient sign(d) min(d^2, 1)
    d = torch.tensor([0.3, -0.7, 0.999999, 1.000001, -4.0], dtype=torch.float64, requires_grad=True)
    losses.modified_smooth_l1(d.view(1, 1, 5), torch.zeros(1, 1, 5, dtype=torch.float64)).backward()
    expect = torch.tensor([0.09, -0.49, 0.999998000001, 1.0, -1.0], dtype=torch.float64) / 5
    assert torch.allclose(d.grad, expect, atol=1e-9)


def test_generation_loss_hand_values():
    # 1 x 1 x 2 x 3 volume (2 spatial dims): values small enough for the quadratic branch
    pred = torch.tensor([[[[0.0, 0.2, 0.4], [0.1, 0.1, 0.1]]]], dtype=torch.float64)
    tgt = torch.tensor([[[[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]]], dtype=torch.float64)
    d = (pred - tgt).view(-1).tolist()

    def sl1(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    base = sum(sl1(x) for x in d) / 6
    # forward differences along H (2 -> 1 rows) and W (3 -> 2 cols)
    ph = [0.1 - 0.0, 0.1 - 0.2, 0.1 - 0.4]
    th = [0.0, 0.0, 2.0]
    pw = [0.2, 0.2, 0.0, 0.0]
    tw = [0.0, 0.0, 0.0, 2.0]
    gh = sum(sl1(a - b) for a, b in zip(ph, th)) / 3
    gw = sum(sl1(a - b) for a, b in zip(pw, tw)) / 4
    expect = base / 2 + (gh + gw) / 2 / 2
    got = losses.generation_loss(pred, tgt)
    assert abs(got.item() - expect) < 1e-14
    assert abs(losses.task_loss(pred, tgt, "slices_to_volume").item() - 0.5 * expect) < 1e-14
    assert abs(losses.task_loss(pred, tgt, "inpainting").item() - expect) < 1e-14
    assert abs(losses.task_loss(pred, tgt, "segmentation").item()
               - 50 * losses.modified_smooth_l1(pred, tgt).item()) < 1e-12


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    pred = (torch.randn(2, 1, 3, 4, 5, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    tgt = torch.rand(2, 1, 3, 4, 5, generator=g, dtype=torch.float64)
    # keep every |d| away from the kink at 1, where the loss is only C1
    with torch.no_grad():
        d = pred - tgt
        pred += torch.where((d.abs() - 1).abs() < 0.05, 0.2 * d.sign(), torch.zeros_like(d))
    for fn in (losses.modified_smooth_l1, losses.generation_loss):
        assert torch.autograd.gradcheck(lambda p: fn(p, tgt), (pred,))
        assert torch.autograd.gradcheck(lambda p: fn(p, tgt, reduction="none"), (pred,))


def test_errors_and_weights():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.generation_loss(x, torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="unknown task"):
        losses.task_loss(x, x, "denoise")
    with pytest.raises(ValueError, match="reduction"):
        losses.smooth_l1(x, x, reduction="sum")
    assert losses.task_weight("segmentation") == 50 and losses.task_weight("slices_to_volume") == 0.5
    assert losses.task_loss(x, x, "segmentation", weighted=False).item() == 0.0
    with pytest.raises(ValueError, match="slices_to_volume"):  # the old name points to the family names
        losses.task_weight("2d_to_3d")


# Supplement Table 3 as printed (row -> sampling rate, weight) and the task of each row; the rows are
# checked against the paper's text (tests/fixtures) in tests/data/test_task_registry.py.
_TABLE3 = [
    ("Segmentation", 2, 50, "segmentation"),
    ("Bias Remove", 1, 1, "bias_field"),
    ("Gaussian Noise Remove", 1, 1, "gaussian_noise"),
    ("Salt & Pepper Noise Remove", 1, 1, "salt_pepper"),
    ("2D to 3D Generation", 1, 0.5, "slices_to_volume"),
    ("Inpainting", 1, 1, "inpainting"),
    ("Super-Resolution", 1, 1, "super_resolution"),
    ("Skull Stripping", 1, 1, "skull_stripping"),
    ("Modality Transform", 1, 1, "modality_transform"),
]


def test_task_names_are_the_tasks3d_families_with_table3_weights():
    """One set of names: the losses, tasks3d's families and the trainer's Neuroverse3D defaults all read
    the task registry, and each task carries its Table 3 row's rate and weight."""
    from vicl_fast.data import tasks3d
    from vicl_fast.data.task_registry import TASKS, default_tasks

    fams = [fam for *_, fam in _TABLE3]
    assert list(tasks3d.FAMILIES_3D) == fams == [n for n, _, _ in default_tasks(3)]
    trainer = {n: (r, w) for n, r, w in default_tasks(3)}
    for row, rate, weight, fam in _TABLE3:
        assert losses.task_weight(fam) == weight, row
        assert (TASKS[fam].rate, TASKS[fam].weight) == (rate, weight), row
        assert trainer[fam] == (rate, weight), row
        assert TASKS[fam].kind == ("seg" if fam == "segmentation" else "gen"), row


def test_task_loss_is_the_registry_loss():
    """Eq. 6 for segmentation, Eq. 7 for every generation task, times the Table 3 weight."""
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.rand(2, 1, 5, 6, 4, generator=g) * 3, torch.rand(2, 1, 5, 6, 4, generator=g)
    for _, _, weight, fam in _TABLE3:
        ref = losses.segmentation_loss if fam == "segmentation" else losses.generation_loss
        torch.testing.assert_close(losses.task_loss(pred, tgt, fam), weight * ref(pred, tgt), rtol=0, atol=0)
        torch.testing.assert_close(losses.task_loss(pred, tgt, fam, weighted=False, reduction="none"),
                                   ref(pred, tgt, "none"), rtol=0, atol=0)


def test_soft_dice_against_float64_sums():
    """Per-sample soft Dice from independent float64 sums; clamping to [0, 1]; an empty target with an
    empty prediction scores 0 loss; gradients."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 1, 5, 6, 7, generator=g) * 1.4 - 0.2
    y = (torch.rand(3, 1, 5, 6, 7, generator=g) > 0.7).float()
    y[2] = 0
    pred[2] = -0.5
    p, t = np.clip(pred.double().numpy(), 0, 1).reshape(3, -1), y.double().numpy().reshape(3, -1)
    ref = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    got = losses.soft_dice_loss(pred, y, "none")
    assert got.shape == (3,) and ref[2] == 0
    torch.testing.assert_close(got.double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.soft_dice_loss(pred, y), got.mean())
    x = (torch.rand(2, 1, 3, 3, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    yy = (torch.rand(2, 1, 3, 3, 3, generator=g) > 0.5).double()
    assert torch.autograd.gradcheck(lambda a: losses.soft_dice_loss(a, yy), (x,))


def test_config_dice_weight_adds_soft_dice_to_segmentation_only(tmp_path):
    """data.tasks[].dice_weight: a segmentation sample's loss is Eq. 6 + dice_weight x soft Dice, a
    generation sample's is unchanged; misuse is a named ConfigError."""
    from tests.training._toy import _nv_raw, _randp_raw, _write_dataset
    from vicl_fast.training import ConfigError, config_from_dict
    from vicl_fast.training.trainer import Trainer

    data = _write_dataset(tmp_path / "toy")
    raw = _nv_raw(data, tmp_path / "r")
    raw["data"]["tasks"][0]["dice_weight"] = 0.3
    tr = Trainer(config_from_dict(raw))
    g = torch.Generator().manual_seed(1)
    pred, y = torch.rand(2, 1, 4, 4, 4, generator=g), (torch.rand(2, 1, 4, 4, 4, generator=g) > 0.5).float()
    per = tr._nv_per_sample(pred, y, torch.tensor([0, 1]))
    torch.testing.assert_close(per[0], losses.modified_smooth_l1(pred[:1], y[:1]) + 0.3 * losses.soft_dice_loss(pred[:1], y[:1]))
    torch.testing.assert_close(per[1], losses.generation_loss(pred[1:], y[1:]))
    raw["data"]["tasks"][1]["dice_weight"] = 0.3
    with pytest.raises(ConfigError, match=r"data.tasks\[1\] \(gaussian_noise\).dice_weight: a Dice term"):
        config_from_dict(raw)
    raw["data"]["tasks"][1]["dice_weight"] = 0.0
    raw["data"]["tasks"][0]["dice_weight"] = -1
    with pytest.raises(ConfigError, match="must be >= 0"):
        config_from_dict(raw)
    r2 = _randp_raw(data, tmp_path / "q")
    r2["data"]["tasks"] = [{"name": "segmentation", "dice_weight": 0.1}]
    with pytest.raises(ConfigError, match="for Neuroverse3D segmentation tasks only"):
        config_from_dict(r2)
