"""``make demo`` (temporary, until the models exist): RandP's token matching on real-looking tokens.

Builds B prompt/query image pairs from the Shepp-Logan head phantom (bundled
with scikit-image; a smooth synthetic phantom otherwise): the prompt is the
phantom, the query a slightly rotated/scaled, elastically deformed, intensity-jittered,
noisy copy (another "subject"). Each
256x256 image becomes 16x16 patches -> 256 tokens, embedded ViT-style (a fixed
random linear projection of the patch pixels to 768-d, plus a 2D sin-cos
position embedding). The prompt tokens are matched one-to-one to the query
tokens with :func:`vicl_fast.ops.matching_permutation` on ``-cos`` costs (RandP,
Appendix A), and the demo prints:

* time per matrix of the vicl_fast solver (1 thread, all threads) vs SciPy
  (and lapx's ``lapjvr`` when installed), on the same costs;
* that the total costs equal SciPy's (exactness);
* match quality: the fraction of query tokens matched to the spatially
  corresponding prompt patch (and within one patch), over all tokens and
  over tokens that contain anatomy (background patches are near-identical).

Run: ``python -m vicl_fast.demo`` (well under a minute on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
from scipy import ndimage

import vicl_fast
from vicl_fast.ops import matching_permutation

IMG, PATCH, DIM = 256, 16, 768


def phantom(size: int = IMG) -> np.ndarray:
    """(size, size) float32 head phantom in [0, 1]."""
    try:
        from skimage.data import shepp_logan_phantom
        from skimage.transform import resize

        img = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)
    except ImportError:  # smooth synthetic stand-in: skull ring, brain, ventricles, lesion
        yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
        r = (xx / 0.72) ** 2 + (yy / 0.92) ** 2
        img = 1.0 * (r < 1) - 0.7 * (r < 0.85) + 0.2 * (((xx / 0.15) ** 2 + ((yy - 0.1) / 0.35) ** 2) < 1)
        img += 0.3 * ((((xx - 0.3) / 0.1) ** 2 + ((yy + 0.4) / 0.1) ** 2) < 1)
    img = img.astype(np.float32)
    return (img - img.min()) / (img.max() - img.min() + 1e-8)


def deformed_copy(img: np.ndarray, rng: np.random.Generator, max_rot_deg: float = 6.0, max_scale: float = 0.06,
                  max_shift: float = 4.0, noise: float = 0.08) -> np.ndarray:
    """Another "subject": small rotation and scaling, smooth elastic deformation (<= ~max_shift px),
    intensity jitter and Gaussian noise."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    a = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg))
    s = 1.0 + rng.uniform(-max_scale, max_scale)
    ys = cy + ((yy - cy) * np.cos(a) - (xx - cx) * np.sin(a)) / s
    xs = cx + ((yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)) / s
    for coords in (ys, xs):
        f = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=24)
        coords += f / (np.abs(f).max() + 1e-8) * max_shift
    warped = ndimage.map_coordinates(img, [ys, xs], order=1, mode="constant")
    warped = warped * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    return (warped + noise * rng.standard_normal(warped.shape)).astype(np.float32)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2D sin-cos position embedding (as in MAE / ViT)."""
    pos = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    out = []
    for coord in torch.meshgrid(pos, pos, indexing="ij"):
        ang = coord.reshape(-1, 1) * omega[None]
        out += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(out, dim=1).float()


def tokens(images: torch.Tensor, proj: torch.Tensor, pos: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """images (B, H, W) -> tokens (B, (H/P)*(W/P), D): patch pixels @ proj + pos_weight * pos."""
    b = images.shape[0]
    g = IMG // PATCH
    patches = images.reshape(b, g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4).reshape(b, g * g, PATCH * PATCH)
    return patches @ proj + pos_weight * pos


def _time(fn, reps: int = 3) -> float:
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="number of prompt/query pairs (B)")
    ap.add_argument("--pos-weight", type=float, default=0.5, help="weight of the position embedding")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    print(vicl_fast.backends_report())

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    base = phantom()
    prompt = torch.from_numpy(np.stack([base] * args.batch))
    query = torch.from_numpy(np.stack([deformed_copy(base, rng) for _ in range(args.batch)]))
    proj = torch.randn(PATCH * PATCH, DIM) / PATCH  # fixed random patch embedding
    pos = sincos_2d(IMG // PATCH, DIM)
    zp = torch.nn.functional.normalize(tokens(prompt, proj, pos, args.pos_weight), dim=-1)
    zq = torch.nn.functional.normalize(tokens(query, proj, pos, args.pos_weight), dim=-1)
    cost = -(zp @ zq.transpose(1, 2))  # (B, P, Q): -cos(prompt_p, query_q)
    B, P, Q = cost.shape
    print(f"\n{B} prompt/query pairs, {IMG}x{IMG} images, patch {PATCH}: {P} tokens of dim {DIM}")

    # --- solve and time ---------------------------------------------------------------
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    perm = matching_permutation(cost)
    prev = torch.get_num_threads()
    timings = {}
    torch.set_num_threads(1)
    timings["vicl_fast, 1 thread"] = _time(lambda: matching_permutation(cost))
    torch.set_num_threads(os.cpu_count() or 1)
    timings[f"vicl_fast, {torch.get_num_threads()} threads"] = _time(lambda: matching_permutation(cost))
    torch.set_num_threads(prev)
    arr = cost.numpy()
    timings["scipy.optimize.linear_sum_assignment"] = _time(lambda: [scipy_lsa(c) for c in arr], reps=2)
    try:
        from lap._lapjv_rh import lapjvr

        timings["lapx lapjvr"] = _time(lambda: [lapjvr(c, return_cost=False) for c in arr], reps=2)
    except ImportError:
        pass
    scipy_ms = timings["scipy.optimize.linear_sum_assignment"] / B * 1e3
    print("\ntime per matrix (best of a few runs; the machine may be shared):")
    for name, t in timings.items():
        ms = t / B * 1e3
        print(f"  {name:40s} {ms:8.3f} ms   ({scipy_ms / ms:5.1f}x SciPy)")

    # --- exactness ----------------------------------------------------------------------
    x = cost.double().numpy()
    gap = 0.0
    for b in range(B):
        r, c = scipy_lsa(x[b])
        ours = x[b][perm[b].numpy(), np.arange(Q)].sum()
        gap = max(gap, abs(ours - x[b][r, c].sum()))
    print(f"\ntotal cost vs SciPy: max |difference| = {gap:.2e} over {B} matrices (exact solver)")

    # --- match quality --------------------------------------------------------------------
    g = IMG // PATCH
    q_idx = torch.arange(Q)
    dy = (perm // g - q_idx // g).abs()
    dx = (perm % g - q_idx % g).abs()
    exact = (perm == q_idx).float()
    near = ((dy <= 1) & (dx <= 1)).float()
    fg = torch.from_numpy(base.reshape(g, PATCH, g, PATCH).mean(axis=(1, 3)).reshape(-1) > 0.05)
    print("\nmatch quality (query token -> spatially corresponding prompt patch):")
    print(f"  all tokens:        exact {exact.mean():6.1%}   within 1 patch {near.mean():6.1%}")
    print(f"  anatomy tokens ({int(fg.sum())}/{Q}): exact {exact[:, fg].mean():6.1%}   "
          f"within 1 patch {near[:, fg].mean():6.1%}")
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
