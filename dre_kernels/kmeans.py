"""kmeans: Lloyd's algorithm whose assignment and update step is residual_encode(hard, return_mass=True).

    init: k-means++ (seeded, on the CPU in float32 so every backend starts from the same centres)
    step: E, mass = residual_encode(x, [0, N], c, assignment="hard", return_mass=True)
          c_k <- c_k + E_k / mass_k  where mass_k > 0   (the mean of the rows assigned to k; empty clusters stay)
"""

from __future__ import annotations

import torch

from dre_kernels import _checks
from dre_kernels.residual_encode import residual_encode


def kmeans_plusplus_init(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007): each next centre drawn with probability proportional to D(x)^2."""
    gen = torch.Generator().manual_seed(seed)
    X = x.detach().to("cpu", torch.float32)
    N = X.shape[0]
    first = int(torch.randint(N, (1,), generator=gen))
    centres = [X[first]]
    d2 = ((X - X[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if not total > 0.0:  # every row already sits on a centre (or NaN): draw uniformly
            nxt = int(torch.randint(N, (1,), generator=gen))
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=gen))
        centres.append(X[nxt])
        d2 = torch.minimum(d2, ((X - X[nxt]) ** 2).sum(1))
    return torch.stack(centres)


def kmeans(x, k, *, iters=20, seed=0, backend="auto"):
    """K-means codebook of the rows of x (N, D): returns (k, D) float32. Same seed, same result."""
    name = _checks.check_kmeans(x, k, iters, seed, backend)
    x = x.detach()
    c = kmeans_plusplus_init(x, k, seed).to(x.device)
    offsets = torch.tensor([0, x.shape[0]], dtype=torch.int64, device=x.device)
    with torch.no_grad():
        for _ in range(iters):
            E, mass = residual_encode(x, offsets, c, assignment="hard", return_mass=True, backend=name)
            m = mass[0]
            step = torch.where(m[:, None] > 0, E[0].float() / m.clamp_min(1.0)[:, None], torch.zeros_like(c))
            new_c = c + step
            if torch.equal(new_c, c):
                break
            c = new_c
    return c
