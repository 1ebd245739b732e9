"""DESIGN §6 metrics against hand computations."""

import math

import numpy as np
import pytest
import torch

from saev.evaluate import Metrics, hist_quantile, log10_freq_hist, pareto_front

X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
X_HAT = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
F = torch.tensor([[1.0, 0, 0], [0, 0, 0], [1.0, 2.0, 0], [0.5, 0, 0]])


def score(batches, **kw) -> list[dict]:
    m = Metrics(2, 2, 3, **kw)
    for lo, hi in batches:
        x = X[lo:hi]
        # SAE 0: X_HAT/F above; SAE 1: perfect reconstruction, every latent always on.
        m.update(x, torch.stack([X_HAT[lo:hi], x]), torch.stack([F[lo:hi], torch.ones(hi - lo, 3)]))
    return m.result()


@pytest.mark.parametrize("batches", [[(0, 4)], [(0, 1), (1, 3), (3, 4)]])
def test_metrics_by_hand(batches):
    r, perfect = score(batches)
    # mean = (1, .5); sum ||x - mean||^2 = .25 + 1.25 + .25 + 1.25 = 3; sum ||x - x_hat||^2 = 2.
    assert r["n_tokens"] == 4
    assert r["fvu"] == pytest.approx(2 / 3, abs=1e-12)
    assert r["explained_variance"] == pytest.approx(1 / 3, abs=1e-12)
    assert r["mse"] == pytest.approx(0.5) and r["mse_per_element"] == pytest.approx(0.25)
    assert r["cosine"] == pytest.approx(0.75)  # 1, 0 (zero reconstruction), 1, 1
    # L0 per token: 1, 0, 2, 1.
    assert r["l0_mean"] == 1.0 and r["l0_median"] == 1.0
    assert r["l0_std"] == pytest.approx(math.sqrt(0.5))
    assert r["l0_p99"] == pytest.approx(np.percentile([1, 0, 2, 1], 99))
    assert r["freq"].tolist() == [0.75, 0.25, 0.0]
    assert (r["n_dead"], r["n_dense"]) == (1, 2)
    assert r["dead_frac"] == pytest.approx(1 / 3)
    assert perfect["fvu"] == 0 and perfect["cosine"] == pytest.approx(1.0)
    assert perfect["l0_mean"] == 3 and perfect["n_dense"] == 3 and perfect["n_dead"] == 0


def test_dense_threshold_is_configurable():
    (r, _) = score([(0, 4)], dense_threshold=0.5)
    assert r["n_dense"] == 1


def test_fvu_uses_float64_split_mean_with_large_offset():
    # A large shared offset (as in ViT residual streams) must not change FVU.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=gen, dtype=torch.float64) + 3e4
    noise = torch.randn(4096, 8, generator=gen, dtype=torch.float64) * 0.1
    m = Metrics(1, 8, 4)
    for i in range(0, 4096, 1000):
        m.update(
            x[i : i + 1000].float(),
            (x[i : i + 1000] + noise[i : i + 1000]).float()[None],
            torch.ones(1, len(x[i : i + 1000]), 4),
        )
    xf = x.float().double()
    want = ((xf - (x + noise).float().double()) ** 2).sum() / ((xf - xf.mean(0)) ** 2).sum()
    assert m.result()[0]["fvu"] == pytest.approx(float(want), rel=1e-9)


def test_hist_quantile_matches_numpy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = rng.integers(0, 12, size=rng.integers(1, 50))
        hist = np.bincount(values, minlength=13)
        for q in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0):
            assert hist_quantile(hist, q) == pytest.approx(np.percentile(values, q * 100))


def test_pareto_front_and_freq_hist():
    pts = [(10, 0.5), (20, 0.3), (15, 0.6), (40, 0.31), (5, 0.9)]
    assert pareto_front(pts) == [4, 0, 1]
    # Fraction recovered: higher is better (lower L0, higher y).
    assert pareto_front(pts, maximise=True) == [4]
    rec = [(1, 0.8), (4, 0.7), (8, 0.95), (8, 0.9), (32, 0.99)]
    assert pareto_front(rec, maximise=True) == [0, 2, 4]
    h = log10_freq_hist(np.array([0.0, 1e-3, 1e-3, 0.5]), bins=8, lo=-8)
    assert h["n_dead"] == 1 and sum(h["counts"]) == 3


def test_freq_hist_bins_latents_rarer_than_its_default_range():
    # One firing in 10^9 tokens is live, not dead: it must land in a bin.
    h = log10_freq_hist(np.array([0.0, 1e-9, 0.01]), bins=10, lo=-8)
    assert h["n_dead"] == 1 and sum(h["counts"]) == 2 and h["edges"][0] <= -9
