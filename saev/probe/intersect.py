"""Intersectional cells: per-cell probe accuracy, and latents whose firing departs from the
marginals.

A *cross* is a tuple of attributes (e.g. gender, race); its *cells* are the combinations of
their values seen among images that have all of them. Cells with fewer than `min_n` images
are listed with their n but take no part in worst-group accuracy or the best-worst gap.

Firing-rate departure (docs/probe.md). For latent i, with p_i its firing rate over the images
of the cross, p_i(A_j = a) its rate among images whose attribute A_j is a, and q_i(c) its rate
in cell c = (a_1, ..., a_m) of n_c images, the marginals predict (no interaction, each
attribute multiplying the rate by its own lift):

    qhat_i(c) = clip(p_i * prod_j p_i(A_j = a_j) / p_i, 0, 1)       (0 when p_i = 0)

and the departure is the binomial z-score

    z_i(c) = (q_i(c) - qhat_i(c)) / sqrt(qt (1 - qt) / n_c),  qt = clip(qhat_i(c), 1/(2 n_c), 1 - 1/(2 n_c)).

Per cell the latents with the largest |z| are reported, with q, qhat, q - qhat and z.
"""

import numpy as np
import torch

MIN_CELL = 30
"""Default minimum number of images for a cell to count."""


def default_crosses(attributes: list[str]) -> list[tuple[str, ...]]:
    """The last two attributes, and all of them when there are three or more (for FairFace's
    `age gender race`: gender x race and age x gender x race)."""
    if len(attributes) < 2:
        return []
    crosses = [tuple(attributes[-2:])]
    if len(attributes) >= 3:
        crosses.append(tuple(attributes))
    return crosses


def cell_ids(
    labels: dict[str, np.ndarray], cross: tuple[str, ...]
) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """(cell keys, id of each image's cell or -1 when one of its labels is missing ("")).

    Keys are sorted; an image's id indexes into them."""
    cols = [np.asarray(labels[a], dtype=object) for a in cross]
    n = len(cols[0])
    present = np.ones(n, dtype=bool)
    for col in cols:
        present &= col != ""
    keys = sorted({tuple(str(col[i]) for col in cols) for i in np.flatnonzero(present)})
    lookup = {k: j for j, k in enumerate(keys)}
    ids = np.full(n, -1, dtype=np.int64)
    for i in np.flatnonzero(present):
        ids[i] = lookup[tuple(str(col[i]) for col in cols)]
    return keys, ids


def cell_accuracy(
    keys: list[tuple[str, ...]],
    ids: np.ndarray,
    correct: np.ndarray,
    cross: tuple[str, ...],
    min_n: int = MIN_CELL,
) -> dict:
    """Per-cell n and accuracy of `correct` (bool per image; ids -1 are skipped), plus the
    worst and best counted cells and their gap."""
    cells = []
    for j, key in enumerate(keys):
        m = ids == j
        n = int(m.sum())
        counted = n >= min_n
        cells.append(
            {
                "cell": dict(zip(cross, key, strict=True)),
                "n": n,
                "accuracy": float(correct[m].mean()) if n else None,
                "counted": counted,
            }
        )
    counted = [c for c in cells if c["counted"]]
    out = {"cells": cells, "n_counted": len(counted), "min_n": min_n}
    if counted:
        worst = min(counted, key=lambda c: c["accuracy"])
        best = max(counted, key=lambda c: c["accuracy"])
        out |= {
            "worst_accuracy": worst["accuracy"],
            "worst_cell": worst["cell"],
            "best_accuracy": best["accuracy"],
            "best_cell": best["cell"],
            "gap": best["accuracy"] - worst["accuracy"],
        }
    else:
        out |= {"worst_accuracy": None, "worst_cell": None, "best_accuracy": None}
        out |= {"best_cell": None, "gap": None}
    return out


def departures(
    fires: torch.Tensor,
    labels: dict[str, np.ndarray],
    cross: tuple[str, ...],
    *,
    min_n: int = MIN_CELL,
    top: int = 10,
    chunk: int = 8192,
) -> list[dict]:
    """For each cell with >= min_n images, the `top` latents by |z| (see module doc).

    `fires` is a bool `[n_images, d]` matrix (latent > 0 on the image)."""
    keys, ids = cell_ids(labels, cross)
    rows = np.flatnonzero(ids >= 0)
    if len(rows) == 0:
        return []
    dev = fires.device
    rows_t = torch.as_tensor(rows, device=dev)
    cell_oh = torch.nn.functional.one_hot(torch.as_tensor(ids[rows], device=dev), len(keys))
    cell_oh = cell_oh.to(torch.float64)
    n_cell = cell_oh.sum(0)  # [K]
    # For each attribute of the cross, the value index of each cell and a one-hot of images.
    attr_oh, cell_val = [], []
    for j in range(len(cross)):
        vals = sorted({k[j] for k in keys})
        pos = {v: i for i, v in enumerate(vals)}
        img_val = np.array([pos[keys[c][j]] for c in ids[rows]])
        attr_oh.append(torch.nn.functional.one_hot(torch.as_tensor(img_val, device=dev), len(vals)))
        cell_val.append(torch.as_tensor([pos[k[j]] for k in keys], device=dev))
    d = fires.shape[1]
    q = torch.empty(len(keys), d, dtype=torch.float64, device=dev)
    qhat = torch.empty_like(q)
    for lo in range(0, d, chunk):
        f = fires[rows_t, lo : lo + chunk].to(torch.float64)  # [n, chunk]
        hi = lo + f.shape[1]
        p = f.mean(0)  # [chunk]
        q[:, lo:hi] = (cell_oh.T @ f) / n_cell[:, None]
        pred = p.expand(len(keys), -1).clone()
        safe = torch.where(p > 0, p, torch.ones_like(p))
        for oh, cv in zip(attr_oh, cell_val, strict=True):
            oh = oh.to(torch.float64)
            p_attr = (oh.T @ f) / oh.sum(0)[:, None]  # [n_values, chunk]
            pred = pred * p_attr[cv] / safe
        qhat[:, lo:hi] = torch.where(p > 0, pred, torch.zeros_like(pred)).clamp(0, 1)
    nc = n_cell[:, None]
    qt = torch.minimum(torch.maximum(qhat, 0.5 / nc), 1 - 0.5 / nc)
    z = (q - qhat) / torch.sqrt(qt * (1 - qt) / nc)
    out = []
    for c, key in enumerate(keys):
        n = int(n_cell[c].item())
        if n < min_n:
            continue
        order = torch.argsort(-z[c].abs(), stable=True)[:top].tolist()
        out.append(
            {
                "cell": dict(zip(cross, key, strict=True)),
                "n": n,
                "latents": [
                    {
                        "latent": i,
                        "rate": q[c, i].item(),
                        "expected": qhat[c, i].item(),
                        "diff": (q[c, i] - qhat[c, i]).item(),
                        "z": z[c, i].item(),
                    }
                    for i in order
                ],
            }
        )
    return out
