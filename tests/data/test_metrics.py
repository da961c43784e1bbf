"""Metrics against independent references (scikit-image, numpy formulas) and the evaluation protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vicl_fast.data.metrics import (
    copy_prompt_predict,
    dice,
    dice_per_label,
    evaluate_protocol,
    psnr,
    ssim,
    task_metric,
)


def _sk_ssim(a, b, **kw):
    return structural_similarity(
        a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, **kw
    )


def test_dice_hand_values_and_random():
    a = np.zeros(10, bool)
    b = np.zeros(10, bool)
    a[:4], b[2:8] = True, True  # |A|=4, |B|=6, |A&B|=2 -> 4/10
    assert dice(a, b) == pytest.approx(0.4)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0 and dice(np.zeros(3), np.zeros(3), empty=0.0) == 0.0
    assert dice(np.ones(3), np.zeros(3)) == 0.0
    rng = np.random.default_rng(0)
    p, t = rng.random((9, 10, 11)) > 0.6, rng.random((9, 10, 11)) > 0.3
    assert dice(p, t) == pytest.approx(2 * np.sum(p * t) / (np.sum(p) + np.sum(t)))
    pm, tm = rng.integers(0, 4, (12, 13)), rng.integers(0, 4, (12, 13))
    per = dice_per_label(pm, tm)
    assert set(per) == {1, 2, 3}
    for v, d in per.items():
        assert d == pytest.approx(dice(pm == v, tm == v))
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("shape", [(31, 29), (13, 17, 19)])
def test_psnr_ssim_match_scikit_image(shape):
    rng = np.random.default_rng(1)
    a = rng.random(shape)
    b = np.clip(a + rng.normal(0, 0.1, shape), 0, 1)
    assert psnr(b, a) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-12)
    assert ssim(b, a) == pytest.approx(_sk_ssim(a, b), abs=1e-12)
    c = rng.random(shape)  # unrelated image: low SSIM, same agreement
    assert ssim(c, a) == pytest.approx(_sk_ssim(a, c), abs=1e-12) and ssim(c, a) < 0.2
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")
    assert psnr(2 * b, 2 * a, data_range=2.0) == pytest.approx(psnr(b, a))


def test_ssim_batched_torch_matches_channel_axis():
    rng = np.random.default_rng(2)
    x = rng.random((2, 3, 24, 26))
    y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    got = ssim(torch.tensor(x), torch.tensor(y), spatial_dims=2)
    ref = [_sk_ssim(x[i], y[i], channel_axis=0) for i in range(2)]
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)
    v = rng.random((2, 1, 14, 15, 16))
    w = rng.random((2, 1, 14, 15, 16))
    got3 = ssim(torch.tensor(v), torch.tensor(w), spatial_dims=3)
    np.testing.assert_allclose(got3.numpy(), [_sk_ssim(v[i, 0], w[i, 0]) for i in range(2)], atol=1e-12)
    with pytest.raises(ValueError, match="window"):
        ssim(np.zeros((5, 5)), np.zeros((5, 5)))


def test_evaluation_protocol_and_copy_baseline():
    rng = np.random.default_rng(3)
    # Five "subjects": output = input > 0.5 (a fixed task); inputs differ.
    pairs = []
    for _ in range(5):
        x = rng.random((1, 8, 8, 8)).astype(np.float32)
        pairs.append((x, (x > 0.5).astype(np.float32)))
    seen = []

    def oracle(tin, cin, cout):
        seen.append(cin.shape[0])
        return (tin > 0.5).astype(np.float32)

    res = evaluate_protocol(
        oracle, pairs, pairs, task_metric("seg"), n_context=2, n_repeats=4, exclude_self=True
    )
    assert res.scores.shape == (5, 4) and res.mean == 1.0 and res.std == 0.0 and res.prompt_std == 0.0
    assert set(seen) == {2}

    def checks_self(tin, cin, cout):  # the target is never among its own contexts
        assert not any(np.array_equal(tin, c) for c in cin)
        return copy_prompt_predict(tin, cin, cout)

    res = evaluate_protocol(
        checks_self, pairs, pairs, task_metric("seg"), n_context=1, n_repeats=6, seed=1, exclude_self=True
    )
    # Copy baseline on independent random masks: Dice ~ 0.5, varying with the drawn prompt.
    assert 0.4 < res.mean < 0.6 and res.std > 0 and res.prompt_std > 0
    per_repeat = res.scores.mean(0)
    assert res.mean == pytest.approx(per_repeat.mean()) and res.std == pytest.approx(per_repeat.std())
    assert res.prompt_std == pytest.approx(res.scores.std(1).mean())
    with pytest.raises(ValueError, match="n_context"):
        evaluate_protocol(oracle, pairs, pairs, task_metric("seg"), n_context=5, exclude_self=True)
