"""Latent x class alignment: mean activation, firing rate, one-vs-rest AUROC, selectivity.

Every metric is a `[d, n_classes]` matrix over latents (columns of `x`) and classes. The
work is chunked over latents and runs on `x`'s device, so 100K images x 24K latents fits
on a GPU: the only large temporary is one chunk's sort.

- AUROC of latent i for class c is P(x_i of a class-c image > x_i of another image), ties
  counting one half; computed exactly from mid-ranks (Mann-Whitney U / (n_c * n_rest)).
- Selectivity is (mu_c - mu_rest) / (|mu_c| + |mu_rest| + eps). For the non-negative codes of
  SAEs this is DESIGN's (mu_c - mu_rest) / (mu_c + mu_rest + eps); the absolute values keep
  it inside [-1, 1] for any real input.
- A latent fires on an image when its pooled value is > 0.
"""

import dataclasses

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped

EPS = 1e-8
"""The epsilon of the selectivity denominator."""


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Per latent x class metrics, each `[d, n_classes]` float64 numpy."""

    mean: np.ndarray
    """Mean activation over images of the class."""
    mean_rest: np.ndarray
    """Mean activation over images of every other class."""
    rate: np.ndarray
    """Firing rate (fraction of the class's images with activation > 0)."""
    auroc: np.ndarray
    """One-vs-rest AUROC."""
    selectivity: np.ndarray
    """(mu_c - mu_rest) / (|mu_c| + |mu_rest| + eps), in [-1, 1]."""

    def score(self) -> np.ndarray:
        """Attribute-level alignment of each latent: its best one-vs-rest AUROC over classes."""
        return self.auroc.max(axis=1)

    def ranking(self) -> np.ndarray:
        """Latent ids, most aligned first (score descending, ties by id)."""
        return np.lexsort((np.arange(self.auroc.shape[0]), -self.score()))

    def top(self, c: int, n: int) -> np.ndarray:
        """The `n` latents with the highest AUROC for class `c` (ties by id)."""
        d = self.auroc.shape[0]
        return np.lexsort((np.arange(d), -self.auroc[:, c]))[:n]


def midranks(x: Float[torch.Tensor, "n d"]) -> Float[torch.Tensor, "n d"]:
    """Ranks 1..n of each column, tied values sharing the mean of their ranks."""
    n = x.shape[0]
    xs, order = torch.sort(x, dim=0)
    pos = torch.arange(n, device=x.device).unsqueeze(1).expand_as(xs)
    first = torch.ones_like(xs, dtype=torch.bool)
    first[1:] = xs[1:] != xs[:-1]
    last = torch.ones_like(xs, dtype=torch.bool)
    last[:-1] = xs[:-1] != xs[1:]
    # Each position's run spans [start, end]: the latest run start at or before it, the
    # earliest run end at or after it.
    start = torch.where(first, pos, 0).cummax(dim=0).values
    end = torch.where(last, pos, n - 1).flip(0).cummin(dim=0).values.flip(0)
    ranks_sorted = (start + end).to(torch.float64) / 2 + 1
    ranks = torch.empty_like(ranks_sorted)
    ranks.scatter_(0, order, ranks_sorted)
    return ranks


@jaxtyped(typechecker=beartype)
def align(
    x: Float[torch.Tensor, "n d"],
    y: Int[torch.Tensor, " m"],
    n_classes: int,
    *,
    rows: torch.Tensor | None = None,
    chunk: int = 1024,
    eps: float = EPS,
) -> Alignment:
    """All alignment metrics of the columns of `x` against labels `y` in [0, n_classes).

    With `rows`, only those rows of `x` count (`y` then has one label per row of `rows`);
    they are gathered one chunk of columns at a time, never as a copy of `x`."""
    dev = x.device
    if rows is not None:
        rows = rows.to(dev)
    n = x.shape[0] if rows is None else len(rows)
    d = x.shape[1]
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} rows.")
    onehot = torch.nn.functional.one_hot(y.to(dev), n_classes).to(torch.float64)  # [n, C]
    n_c = onehot.sum(0)  # [C]
    n_r = n - n_c
    if bool((n_c == 0).any()) or bool((n_r == 0).any()):
        raise ValueError(f"every class needs images in and out of it; class counts {n_c.tolist()}.")
    out = {k: np.empty((d, n_classes)) for k in ("mean", "mean_rest", "rate", "auroc")}
    for lo in range(0, d, chunk):
        xc = x[:, lo : lo + chunk] if rows is None else x[rows, lo : lo + chunk]
        xc = xc.to(torch.float64)
        sums = xc.T @ onehot  # [chunk, C]
        total = xc.sum(0, keepdim=True).T  # [chunk, 1]
        fires = (xc > 0).to(torch.float64).T @ onehot
        rank_sums = midranks(xc).T @ onehot
        u = rank_sums - n_c * (n_c + 1) / 2
        hi = lo + xc.shape[1]
        out["mean"][lo:hi] = (sums / n_c).cpu().numpy()
        out["mean_rest"][lo:hi] = ((total - sums) / n_r).cpu().numpy()
        out["rate"][lo:hi] = (fires / n_c).cpu().numpy()
        out["auroc"][lo:hi] = (u / (n_c * n_r)).cpu().numpy()
    mu_c, mu_r = out["mean"], out["mean_rest"]
    sel = (mu_c - mu_r) / (np.abs(mu_c) + np.abs(mu_r) + eps)
    return Alignment(selectivity=sel, **out)


@jaxtyped(typechecker=beartype)
def firing_rate(x: Float[torch.Tensor, "n d"]) -> Float[np.ndarray, " d"]:
    """Fraction of rows on which each column is > 0."""
    return (x > 0).to(torch.float64).mean(0).cpu().numpy()
