"""Ablations of the top aligned latents: are they necessary, are they sufficient, and are they
specific to their attribute?

For each k (clipped to the number of latents), with S = the k most aligned latents of an
attribute, its fitted probe is scored on the held-out images with:
- necessity, mean-ablation: S replaced by their training means (the probe's standardised
  weights of S set to 0): S carry no information and shift no logit; and its accuracy drop;
- necessity, zero-ablation: S set to 0, what the SAE literature calls ablating a latent. It
  also moves every logit by the probe's response to S at 0, which for a latent that fires on
  most images is far from its mean; and its drop;
- necessity, refit: a probe refit without S (same L2 strength as the full probe, warm-started
  from it), and its drop: whether the rest of the dictionary carries the same information;
- sufficiency: a probe on S alone (L2 strength chosen on the validation fold).

Targeted probe perturbation (TPP, SAEBench; Karvonen et al. 2025): ablating attribute A's top
k latents should hurt the probe of A and no other. drop[A, B] is the accuracy drop of B's
probe when A's top k latents are ablated, and

    TPP(k) = mean_A drop[A, A] - mean_{A != B} drop[A, B],

for zero-ablation (SAEBench's) and for mean-ablation. Both ablations replace S by constants,
so the ablated logits are the full ones minus (x_S - c_S) W_S: k columns per probe, never
the whole matrix again.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from saev.probe import fit as fitting
from saev.probe.schema import AblationRow, Tpp, TppDrops, TppRow


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
) -> list[AblationRow]:
    """One row per k: the latents ablated and the accuracies of the module doc.

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
    out: list[AblationRow] = []
    for k in tqdm(clip_ks(ks, d), desc=desc, unit="k"):
        idx = np.asarray(ranking[:k], dtype=np.int64)
        mean_ablated = probe.mean_ablated(idx)
        keep = torch.ones(d, dtype=torch.bool, device=x.device)
        keep[torch.as_tensor(idx, device=x.device)] = False
        refit = fitting.fit(
            x, y_train, n_classes, probe.lam, keep=keep, init=mean_ablated, max_iter=max_iter
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
        mean_acc = acc(mean_ablated, x)
        zero_acc = acc(probe.zero_ablated(idx), x)
        refit_acc = acc(refit, x)
        out.append(
            {
                "k": k,
                "latents": idx.tolist(),
                "mean_ablation_accuracy": mean_acc,
                "mean_ablation_drop": base - mean_acc,
                "zero_ablation_accuracy": zero_acc,
                "zero_ablation_drop": base - zero_acc,
                "refit_accuracy": refit_acc,
                "refit_drop": base - refit_acc,
                "sufficiency_accuracy": acc(alone, x[:, torch.as_tensor(idx, device=x.device)]),
            }
        )
    return out


ABLATIONS = ("zero", "mean")
"""TPP's ablations: zero-ablation (SAEBench's) and mean-ablation."""


def tpp(
    x: torch.Tensor,
    probes: dict[str, fitting.Probe],
    tests: dict[str, tuple[np.ndarray, np.ndarray]],
    rankings: dict[str, np.ndarray],
    ks,
) -> Tpp:
    """The drop matrices and TPP scores of the module doc, for each k.

    `probes`, `tests` (held-out rows and their labels) and `rankings` (latents, most aligned
    first) are keyed by attribute, two or more. Rows of each drop matrix are the ablated
    attribute, columns the probed one, in the order of `probes`."""
    attrs = list(probes)
    dev = x.device
    parts = {}
    for b in attrs:
        rows, y = tests[b]
        rows_t = torch.as_tensor(rows, device=dev)
        w, _ = probes[b].effective()
        logits = probes[b].logits(x, rows_t)
        y_t = torch.as_tensor(y, device=dev)
        base = (logits.argmax(1) == y_t).double().mean().item()
        parts[b] = (rows_t, w, logits, y_t, base)
    out: list[TppRow] = []
    for k in clip_ks(ks, x.shape[1]):
        drops = {kind: np.zeros((len(attrs), len(attrs))) for kind in ABLATIONS}
        for i, a in enumerate(attrs):
            idx = torch.as_tensor(np.asarray(rankings[a][:k], dtype=np.int64), device=dev)
            for j, b in enumerate(attrs):
                rows_t, w, logits, y_t, base = parts[b]
                xs = x[rows_t[:, None], idx[None, :]]  # [n_test, k]
                constants = {"zero": 0.0, "mean": probes[b].mean[idx]}
                for kind, c in constants.items():
                    ablated = logits - (xs - c) @ w[idx]
                    acc = (ablated.argmax(1) == y_t).double().mean().item()
                    drops[kind][i, j] = base - acc
        out.append({"k": k, "zero": _tpp_drops(drops["zero"]), "mean": _tpp_drops(drops["mean"])})
    return {"attributes": attrs, "ablations": list(ABLATIONS), "rows": out}


def _tpp_drops(m: np.ndarray) -> TppDrops:
    """One drop matrix with its mean diagonal and off-diagonal drops and their difference."""
    diag = float(np.mean(np.diag(m)))
    off = float(m[~np.eye(len(m), dtype=bool)].mean())
    return {"drop": m.tolist(), "diagonal": diag, "off_diagonal": off, "tpp": diag - off}
