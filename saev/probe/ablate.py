"""Ablations of the top aligned latents: are they necessary, are they sufficient?

For each k (clipped to the number of latents), with S = the k most aligned latents:
- necessity, zeroed: accuracy of the fitted probe with the weights of S set to 0 (in
  standardised units: S replaced by their training means), and its drop from the full probe;
- necessity, refit: accuracy of a probe refit without S (same L2 strength as the full probe,
  warm-started from it), and its drop;
- sufficiency: accuracy of a probe on S alone (L2 strength chosen on the validation fold).
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from saev.probe import fit as fitting


def clip_ks(ks, d: int) -> list[int]:
    """Each k clipped to [1, d], duplicates removed, ascending."""
    return sorted({min(max(int(k), 1), d) for k in ks})


def ablate(
    x: torch.Tensor,
    y_train: torch.Tensor,
    test_rows: np.ndarray,
    y_test: np.ndarray,
    probe: fitting.Probe,
    ranking: np.ndarray,
    ks,
    *,
    lams: tuple[float, ...] = fitting.LAMS,
    val_frac: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
    desc: str = "ablations",
) -> list[dict]:
    """One row per k: the latents ablated and the three accuracies of the module doc.

    `y_train` is the label of every row of `x` with -1 outside the train split; `test_rows`
    and `y_test` are the held-out rows and their labels; `ranking` orders the latents, most
    aligned first.
    """
    d = x.shape[1]
    n_classes = probe.n_classes
    rows_t = torch.as_tensor(test_rows, device=x.device)
    y_t = torch.as_tensor(y_test, device=x.device)

    def acc(p: fitting.Probe, xx: torch.Tensor) -> float:
        return (p.predict(xx, rows_t) == y_t).float().mean().item()

    base = acc(probe, x)
    out = []
    for k in tqdm(clip_ks(ks, d), desc=desc, unit="k"):
        idx = np.asarray(ranking[:k], dtype=np.int64)
        zeroed = probe.zeroed(idx)
        keep = torch.ones(d, dtype=torch.bool, device=x.device)
        keep[torch.as_tensor(idx, device=x.device)] = False
        refit = fitting.fit(
            x, y_train, n_classes, probe.lam, keep=keep, init=zeroed, max_iter=max_iter
        )
        alone, _ = fitting.fit_cv(
            x[:, torch.as_tensor(idx, device=x.device)].contiguous(),
            y_train,
            n_classes,
            lams=lams,
            val_frac=val_frac,
            seed=seed,
            max_iter=max_iter,
        )
        zeroed_acc = acc(zeroed, x)
        refit_acc = acc(refit, x)
        out.append(
            {
                "k": k,
                "latents": idx.tolist(),
                "zeroed_accuracy": zeroed_acc,
                "zeroed_drop": base - zeroed_acc,
                "refit_accuracy": refit_acc,
                "refit_drop": base - refit_acc,
                "sufficiency_accuracy": acc(alone, x[:, torch.as_tensor(idx, device=x.device)]),
            }
        )
    return out
