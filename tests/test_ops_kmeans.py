"""kmeans: determinism, recovery of separated clusters, the Lloyd step, agreement across backends."""

import pytest
import torch

from dre_kernels import kmeans, residual_encode
from dre_kernels.kmeans import kmeans_plusplus_init


def blobs(n_per=50, k=4, D=6, seed=0, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(k, D, generator=g)
    x = torch.cat([c + spread * torch.randn(n_per, D, generator=g) for c in centres])
    return x, centres


def test_same_seed_same_result_and_shape():
    x, _ = blobs()
    a = kmeans(x, 4, seed=7, backend="torch")
    b = kmeans(x, 4, seed=7, backend="torch")
    assert a.shape == (4, 6) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(kmeans_plusplus_init(x, 4, 7), kmeans_plusplus_init(x, 4, 8))


def test_recovers_separated_clusters(backend_device):
    backend, device = backend_device
    x, centres = blobs()
    c = kmeans(x.to(device), 4, iters=20, seed=0, backend=backend).cpu()
    # each true centre has a found centre within a few spreads, and vice versa
    d = torch.cdist(centres, c)
    assert d.min(1).values.max() < 0.1 and d.min(0).values.max() < 0.1


def test_one_lloyd_step_is_the_mean_of_assigned_rows():
    x, _ = blobs(n_per=20, k=3, D=4, seed=2, spread=0.5)
    c0 = kmeans_plusplus_init(x, 3, 0)
    c1 = kmeans(x, 3, iters=1, seed=0, backend="reference")
    assign = torch.cdist(x, c0).argmin(1)
    for k in range(3):
        rows = x[assign == k]
        want = rows.mean(0) if len(rows) else c0[k]
        torch.testing.assert_close(c1[k], want, atol=1e-5, rtol=1e-5)


def test_backends_agree_and_half_inputs(backend_device):
    backend, device = backend_device
    x, _ = blobs(n_per=30, k=5, D=9, seed=3, spread=0.3)
    want = kmeans(x, 5, iters=5, seed=1, backend="reference")
    got = kmeans(x.to(device), 5, iters=5, seed=1, backend=backend).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    half = kmeans(x.to(torch.bfloat16).to(device), 5, iters=5, seed=1, backend=backend)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_identical_rows_and_k_equals_n():
    x = torch.ones(5, 3)
    c = kmeans(x, 3, seed=0, backend="torch")
    assert torch.equal(c, torch.ones(3, 3))
    y = torch.randn(4, 2)
    c = kmeans(y, 4, seed=0, backend="torch")
    # k = N: every row is its own centre
    assert torch.equal(torch.sort(c, dim=0).values, torch.sort(y, dim=0).values)


def test_step_uses_residual_encode_hard():
    """c <- c + E/mass is the mean of assigned rows: check the identity on one step directly."""
    x, _ = blobs(n_per=10, k=2, D=3, seed=4, spread=1.0)
    c = x[:2].clone()
    E, mass = residual_encode(x, torch.tensor([0, len(x)]), c, assignment="hard", return_mass=True,
                              backend="reference")
    assign = torch.cdist(x, c).argmin(1)
    for k in range(2):
        torch.testing.assert_close(c[k] + E[0, k] / mass[0, k], x[assign == k].mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=300), dict(iters=-1), dict(k=2.5)])
def test_bad_arguments(bad):
    x = torch.randn(10, 3)
    kw = dict(k=3, iters=2, seed=0) | bad
    with pytest.raises((ValueError, TypeError)) as e:
        kmeans(x, kw.pop("k"), **kw)
    assert any(name in str(e.value) for name in ("k", "iters"))
