"""Standardised multinomial logistic regression, in torch, with the L2 strength chosen on a
validation fold.

One full-batch L-BFGS problem per regularisation strength, on whatever device holds `x`
(100K images x 24K latents is 9.6 GB of float32: it fits on one GPU). Standardisation is
folded into the weights (logits = ((x - mean) / scale) W + b = x (W / scale) + b'), so the
standardised matrix is never materialised. Rows whose label is -1 are ignored, which is how
the train/validation/test rows of one matrix are told apart without copying it.

Objective: mean cross-entropy + lam / 2 * ||W||^2 over the standardised weights (the bias
is not penalised). scikit-learn's `LogisticRegression(C=...)` is the same problem with
lam = 1 / (C * n_rows).
"""

import dataclasses
import logging

import numpy as np
import sklearn.metrics
import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped

from saev.probe.schema import Scores

logger = logging.getLogger("saev.probe.fit")

LAMS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
"""Default grid of L2 strengths, tried strongest first (each warm-starts the next)."""


@dataclasses.dataclass
class Probe:
    """A fitted linear probe over standardised features."""

    weight: Float[torch.Tensor, "d c"]
    """Weights in standardised units (comparable across features)."""
    bias: Float[torch.Tensor, " c"]
    mean: Float[torch.Tensor, " d"]
    """Feature means of the rows it was fitted on."""
    scale: Float[torch.Tensor, " d"]
    """Feature standard deviations (1 where a feature is constant)."""
    lam: float
    """L2 strength it was fitted with."""

    @property
    def n_classes(self) -> int:
        return self.weight.shape[1]

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) acting on raw features: logits = x W + b."""
        w = self.weight / self.scale[:, None]
        return w, self.bias - self.mean @ w

    def logits(self, x: torch.Tensor, rows: torch.Tensor | None = None, chunk: int = 16384):
        """Logits of `x[rows]` (all rows when None), computed in row chunks."""
        w, b = self.effective()
        rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows.to(x.device)
        out = [x[rows[i : i + chunk]] @ w + b for i in range(0, len(rows), chunk)]
        return torch.cat(out) if out else torch.empty(0, self.n_classes, device=x.device)

    def predict(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(x, rows).argmax(1)

    def mean_ablated(self, features) -> "Probe":
        """This probe with `features` replaced by their training means: their standardised
        weights set to 0, so they carry no information and shift no logit (mean-ablation)."""
        weight = self.weight.clone()
        weight[torch.as_tensor(features, dtype=torch.long, device=weight.device)] = 0
        return dataclasses.replace(self, weight=weight)

    def zero_ablated(self, features) -> "Probe":
        """This probe with `features` set to 0 (zero-ablation, what the SAE literature means by
        ablating a latent): their weights set to 0 and the bias moved by what a 0 in those
        features adds to the logits, ((0 - mean) / scale) W."""
        idx = torch.as_tensor(features, dtype=torch.long, device=self.weight.device)
        shift = (-self.mean[idx] / self.scale[idx]) @ self.weight[idx]
        return dataclasses.replace(self.mean_ablated(idx), bias=self.bias + shift)


def standardise_stats(
    x: torch.Tensor, rows: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each column over `rows`, accumulated in float64."""
    d = x.shape[1]
    mean = torch.empty(d, dtype=torch.float64, device=x.device)
    var = torch.empty_like(mean)
    for lo in range(0, d, chunk):
        xc = x[rows, lo : lo + chunk].to(torch.float64)
        mean[lo : lo + xc.shape[1]] = xc.mean(0)
        var[lo : lo + xc.shape[1]] = xc.var(0, unbiased=False)
    scale = var.sqrt()
    # A constant column standardises to 0 whatever its scale; 1 keeps the algebra finite.
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    return mean.to(x.dtype), scale.to(x.dtype)


@jaxtyped(typechecker=beartype)
def fit(
    x: Float[torch.Tensor, "n d"],
    y: Int[torch.Tensor, " n"],
    n_classes: int,
    lam: float,
    *,
    keep: torch.Tensor | None = None,
    init: Probe | None = None,
    max_iter: int = 200,
) -> Probe:
    """Fit on the rows with y >= 0. `keep` (bool [d]) pins the other features' weights at 0."""
    dev = x.device
    y = y.to(dev)
    rows = torch.nonzero(y >= 0).squeeze(1)
    if len(rows) == 0:
        raise ValueError("no rows to fit (every label is -1).")
    mean, scale = standardise_stats(x, rows)
    d = x.shape[1]
    dt = x.dtype
    mask = torch.ones(d, 1, device=dev, dtype=dt) if keep is None else keep.to(dev, dt)[:, None]
    w0 = torch.zeros(d, n_classes, device=dev, dtype=dt) if init is None else init.weight
    b0 = torch.zeros(n_classes, device=dev, dtype=dt) if init is None else init.bias
    weight = (w0.detach().to(dt) * mask).clone().requires_grad_(True)
    bias = b0.detach().to(dt).clone().requires_grad_(True)
    inv = (1 / scale)[:, None]
    y_fit = y[rows]
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )
    # Rows are gathered once per fit only when they are a minority; otherwise the ignored
    # rows ride along in the matmul, which is cheaper than copying most of `x`.
    gather = len(rows) < 0.5 * x.shape[0]
    xs = x[rows] if gather else x
    ys = y_fit if gather else y

    def closure():
        opt.zero_grad()
        w = weight * mask
        logits = xs @ (w * inv) + (bias - (mean * inv.squeeze(1)) @ w)
        loss = F.cross_entropy(logits, ys, ignore_index=-1) + lam / 2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(
        weight=(weight * mask).detach(), bias=bias.detach(), mean=mean, scale=scale, lam=lam
    )


def stratified_fold(y: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Bool mask over rows with y >= 0: a seeded `frac` of each class, at least one per class
    that has two or more rows, so every class is seen on both sides."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(y), dtype=bool)
    for c in np.unique(y[y >= 0]):
        idx = np.flatnonzero(y == c)
        k = int(round(frac * len(idx)))
        k = min(max(k, 1), len(idx) - 1) if len(idx) >= 2 else 0
        out[rng.permutation(idx)[:k]] = True
    return out


@dataclasses.dataclass(frozen=True)
class Selection:
    """How the L2 strength was chosen."""

    lams: list[float]
    val_accuracy: list[float]
    best: float


def fit_cv(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    *,
    lams: tuple[float, ...] = LAMS,
    val_frac: float = 0.2,
    seed: int = 0,
    keep: torch.Tensor | None = None,
    max_iter: int = 200,
) -> tuple[Probe, Selection]:
    """Choose lam on a stratified validation fold of the rows with y >= 0, then refit on all
    of them. The best validation accuracy wins; ties go to the stronger regularisation."""
    y_np = y.cpu().numpy()
    val = stratified_fold(y_np, val_frac, seed)
    y_fit = torch.as_tensor(np.where(val, -1, y_np), device=x.device)
    val_rows = torch.as_tensor(np.flatnonzero(val), device=x.device)
    y_val = y.to(x.device)[val_rows]
    accs, probes = [], []
    probe = None
    for lam in sorted(lams, reverse=True):
        probe = fit(x, y_fit, n_classes, lam, keep=keep, init=probe, max_iter=max_iter)
        acc = (probe.predict(x, val_rows) == y_val).float().mean().item() if len(val_rows) else 0.0
        accs.append(acc)
        probes.append(probe)
        logger.debug("lam=%g: validation accuracy %.4f", lam, acc)
    best = int(np.argmax(accs))  # argmax takes the first maximum = the strongest lam
    final = fit(x, y, n_classes, probes[best].lam, keep=keep, init=probes[best], max_iter=max_iter)
    lams_sorted = sorted(lams, reverse=True)
    return final, Selection(lams=lams_sorted, val_accuracy=accs, best=lams_sorted[best])


def scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> Scores:
    """Accuracy, balanced accuracy, macro-F1 and the confusion matrix (rows = true class)."""
    labels = list(range(n_classes))
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        "balanced_accuracy": float(sklearn.metrics.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            sklearn.metrics.f1_score(
                y_true, y_pred, labels=labels, average="macro", zero_division=0
            )
        ),
        "confusion": sklearn.metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def evaluate(probe: Probe, x: torch.Tensor, rows: np.ndarray, y: np.ndarray) -> Scores:
    """`scores` of `probe` on `x[rows]` against labels `y` (numpy, one per row of `rows`)."""
    pred = probe.predict(x, torch.as_tensor(rows, device=x.device)).cpu().numpy()
    return scores(y, pred, probe.n_classes)
