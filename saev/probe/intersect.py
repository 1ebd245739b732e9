"""Intersectional cells: per-cell probe accuracy, and latents whose firing departs from what
the attributes predict without interaction.

A *cross* is a tuple of attributes (e.g. gender, race); its *cells* are the combinations of
their values seen among images that have all of them. Cells with fewer than `min_n` images
are listed with their n but take no part in worst-group accuracy or the best-worst gap.

Firing-rate departure (docs/probe.md). For latent i and cell c of n_c images, q_i(c) is the
fraction of them on which it fires and qhat_i(c) the rate of the no-interaction model
`fires ~ A_1 + ... + A_m` fitted to the joint attribute table (`nointeraction`), so a latent
that follows one attribute is fully predicted however the attributes are confounded in the
images. The departure is the Pearson residual of the cell's firing count

    z_i(c) = (n_c q_i(c) - n_c qhat_i(c)) / sqrt(n_c qt (1 - qt)),  qt = clip(qhat_i(c), 1/(2 n_c), 1 - 1/(2 n_c))

(the clip keeps a cell fitted at exactly 0 or 1 finite). Per cell the latents with the
largest |z| are reported, with q, qhat, q - qhat and z.
"""

import typing

import numpy as np
import torch

from saev.probe import nointeraction
from saev.probe.schema import Cell, CellAccuracy, Departure, DepartureFit

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
) -> CellAccuracy:
    """Per-cell n and accuracy of `correct` (bool per image; ids -1 are skipped), plus the
    worst and best counted cells and their gap."""
    cells: list[Cell] = []
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
    out: CellAccuracy = {
        "cells": cells,
        "n_counted": len(counted),
        "min_n": min_n,
        "worst_accuracy": None,
        "worst_cell": None,
        "best_accuracy": None,
        "best_cell": None,
        "gap": None,
    }
    if counted:
        worst = min(counted, key=lambda c: c["accuracy"])
        best = max(counted, key=lambda c: c["accuracy"])
        out["worst_accuracy"], out["worst_cell"] = worst["accuracy"], worst["cell"]
        out["best_accuracy"], out["best_cell"] = best["accuracy"], best["cell"]
        out["gap"] = best["accuracy"] - worst["accuracy"]
    return out


class Departures(typing.NamedTuple):
    cells: list[Departure]
    """Per cell with >= min_n images: cell, n, and its top latents by |z|."""
    fit: DepartureFit
    """How the no-interaction model was fitted: model, sweeps, boundary and unconverged latents."""


def departures(
    fires: torch.Tensor,
    labels: dict[str, np.ndarray],
    cross: tuple[str, ...],
    *,
    min_n: int = MIN_CELL,
    top: int = 10,
    chunk: int = 4096,
) -> Departures:
    """For each cell with >= min_n images, the `top` latents by |z| (see module doc).

    `fires` is a bool `[n_images, d]` matrix (latent > 0 on the image)."""
    keys, ids = cell_ids(labels, cross)
    rows = np.flatnonzero(ids >= 0)
    fit: DepartureFit = {
        "model": "fires ~ " + " + ".join(cross),
        "sweeps": 0,
        "boundary": 0,
        "unconverged": 0,
    }
    if len(rows) == 0:
        return Departures([], fit)
    dev = fires.device
    rows_t = torch.as_tensor(rows, device=dev)
    cell_oh = torch.nn.functional.one_hot(torch.as_tensor(ids[rows], device=dev), len(keys))
    # Counts are sums of 0/1 in float32: exact below 2**24 images per cell, at half the
    # memory of float64 for the [n_images, chunk] block.
    cell_oh = cell_oh.to(torch.float32)
    n_cell = cell_oh.sum(0).to(torch.float64)  # [K]
    # Each attribute's value index in each cell.
    values = []
    for j in range(len(cross)):
        pos = {v: i for i, v in enumerate(sorted({k[j] for k in keys}))}
        values.append(torch.as_tensor([pos[k[j]] for k in keys], device=dev))
    d = fires.shape[1]
    q = torch.empty(len(keys), d, dtype=torch.float64, device=dev)
    qhat = torch.empty_like(q)
    for lo in range(0, d, chunk):
        count = (cell_oh.T @ fires[rows_t, lo : lo + chunk].to(torch.float32)).double()
        hi = lo + count.shape[1]
        q[:, lo:hi] = count / n_cell[:, None]
        expected = nointeraction.expected_rates(count, n_cell, values)
        qhat[:, lo:hi] = expected.rate
        fit["sweeps"] = max(fit["sweeps"], expected.sweeps)
        fit["boundary"] += expected.boundary
        fit["unconverged"] += expected.unconverged
    nc = n_cell[:, None]
    qt = torch.minimum(torch.maximum(qhat, 0.5 / nc), 1 - 0.5 / nc)
    z = (q - qhat) / torch.sqrt(qt * (1 - qt) / nc)
    out: list[Departure] = []
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
    return Departures(out, fit)
