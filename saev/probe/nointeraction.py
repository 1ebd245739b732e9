"""What a latent's firing rate in each intersectional cell would be if the attributes did not
interact: the logistic model `fires ~ A_1 + ... + A_m`, fitted to the joint attribute table.

For a cross of attributes (A_1, ..., A_m), cell c = (a_1, ..., a_m) holds n_c images, of which
o_c fire the latent. The no-interaction model gives each cell the firing probability

    qhat_c = sigmoid(theta_0 + sum_j theta_j(a_j))

with the parameters that maximise the binomial likelihood of the o_c. In log-linear terms it is
the model of the table [fires x A_1 x ... x A_m] with margins [A_1 x ... x A_m] (the joint
attribute table, so unequal shares of women across races are taken as given) and
[fires x A_j] for each j. Its maximum-likelihood fit is the unique table of that form whose
[fires x A_j] margins equal the observed ones, which iterative proportional fitting (IPF)
reaches by scaling the table to each margin in turn (Bishop, Fienberg & Holland 1975, ch. 3).
A latent whose firing depends on one attribute only (or on each attribute by its own factor
on the odds) is fitted exactly, whatever the attributes' joint distribution: its departure is 0.

Boundary fits. When a latent never fires in some cells and always fires in others in a way
no single attribute explains (e.g. exactly on "female and Black" images), the likelihood is
maximised only in the limit of infinite parameters: the fitted table lies on the boundary of
the model, equal to the observed counts on those cells. IPF approaches such a limit only as
1/sweeps. So a latent that has not converged after `lp_after` sweeps and has cells where it
never or always fires gets one small linear programme (Geyer 2009; Konis 2007) that finds the
cells on which some direction of the parameters drives the likelihood up without bound:
there the fit equals the observation, and IPF continues on the other cells, where the
maximum is finite and convergence is linear.

Everything is vectorised over latents: the table of d latents is two `[K, d]` arrays (fires,
does not fire) and a sweep is a handful of `[K, V] x [V, d]` products; latents that have
converged leave the working set.
"""

import dataclasses
import logging

import numpy as np
import scipy.optimize
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped

logger = logging.getLogger("saev.probe.nointeraction")

TOL = 1e-6
"""Convergence: every fitted [fires x A_j] margin within this many images of the observed."""
MAX_SWEEPS = 2000
"""Cap on IPF sweeps (a latent still off by more than TOL is counted as unconverged)."""
LP_AFTER = 25
"""Sweeps after which an unconverged latent is checked for a boundary fit."""


@dataclasses.dataclass(frozen=True)
class Fit:
    """The expected firing rates and how the fit went."""

    rate: Float[torch.Tensor, "K d"]
    """Expected firing rate qhat of each latent in each cell (float64)."""
    sweeps: int
    """IPF sweeps run (the slowest latent's)."""
    boundary: int
    """Latents whose fit lies on the boundary (some cells fitted exactly at 0 or 1 by the LP)."""
    unconverged: int
    """Latents still off by more than `tol` after `max_sweeps` sweeps."""


@jaxtyped(typechecker=beartype)
def boundary_cells(
    o1: Float[np.ndarray, " K"], n: Float[np.ndarray, " K"], design: Float[np.ndarray, "K p"]
) -> np.ndarray:
    """Bool [K]: the cells where the maximum-likelihood fit of the logistic model with
    `design` (cells x parameters) sits at the observed rate 0 or 1.

    A direction delta = design @ beta raises the likelihood without bound when delta_c <= 0
    wherever the cell never fires, delta_c >= 0 wherever it always fires, and delta_c = 0 on the
    other cells. Such directions form a convex cone; the LP below finds one that is nonzero on
    as many cells as possible (t_c <= |delta_c|, t_c in [0, 1]); cells with t_c = 1 are on the
    boundary."""
    zero, full = o1 <= 0, o1 >= n
    mixed = ~(zero | full)
    edge = np.flatnonzero(zero | full)
    if len(edge) == 0:
        return np.zeros(len(n), dtype=bool)
    p, ne = design.shape[1], len(edge)
    sign = np.where(zero[edge], 1.0, -1.0)  # zero cells: delta + t <= 0; full: -delta + t <= 0
    a_ub = np.concatenate([sign[:, None] * design[edge], np.eye(ne)], 1)
    a_eq = np.concatenate([design[mixed], np.zeros((int(mixed.sum()), ne))], 1)
    res = scipy.optimize.linprog(
        c=np.concatenate([np.zeros(p), -np.ones(ne)]),
        A_ub=a_ub,
        b_ub=np.zeros(ne),
        A_eq=a_eq if len(a_eq) else None,
        b_eq=np.zeros(len(a_eq)) if len(a_eq) else None,
        bounds=[(None, None)] * p + [(0, 1)] * ne,
        method="highs",
    )
    out = np.zeros(len(n), dtype=bool)
    if res.status == 0:
        out[edge] = res.x[p:] > 0.5
    return out


@jaxtyped(typechecker=beartype)
def expected_rates(
    o1: Float[torch.Tensor, "K d"],
    n: Float[torch.Tensor, " K"],
    values: list[Int[torch.Tensor, " K"]],
    *,
    tol: float = TOL,
    max_sweeps: int = MAX_SWEEPS,
    lp_after: int = LP_AFTER,
) -> Fit:
    """The no-interaction firing rate of every latent in every cell (module doc).

    `o1[c, i]` counts the images of cell c on which latent i fires, `n[c]` the images of cell c
    (>= 1), and `values[j][c]` the index of attribute j's value in cell c.

    IPF here works on the log-odds eta[c, i] of the fitted table, re-imposing the cell counts
    after every attribute: fitting the margin [fires x A_j] multiplies the firing part of every
    cell with A_j = v by r1 = observed / fitted firing count of v and the rest by r0, the same
    for not firing, so eta gains log r1 - log r0 on those cells. Both fitted counts are summed
    from their own probabilities (sigmoid(eta), sigmoid(-eta)), never one as the difference of
    the other from n, so a rate near 0 or 1 keeps its precision. Cells fixed by the LP carry
    eta = +-inf (rate exactly 1 or 0) and are masked out of both sides of every margin."""
    dev, dt = o1.device, torch.float64
    o1, n = o1.to(dt), n.to(dt)
    n_cells, d = o1.shape
    index = [v.to(dev) for v in values]
    onehots = [torch.nn.functional.one_hot(v).to(dt) for v in index]  # [K, V_j]
    weighted = [g * n[:, None] for g in onehots]  # margin of rates: weighted.T @ rate
    design = np.concatenate([np.ones((n_cells, 1))] + [g.cpu().numpy() for g in onehots], 1)
    rate = torch.empty(n_cells, d, dtype=dt, device=dev)

    # The working set: latents not yet converged, as columns of these arrays.
    active = torch.arange(d, device=dev)
    obs = o1.clone()
    free = None  # [K, d] 1.0 where IPF fits the cell, 0.0 where the LP fixed it; None: all

    def observed() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The observed [fires x A_j] margins over the cells IPF fits, [V_j, d] each."""
        o, no = (obs, n[:, None] - obs) if free is None else (obs * free, (n[:, None] - obs) * free)
        return [g.T @ o for g in onehots], [g.T @ no for g in onehots]

    want1, want0 = observed()
    # Start from each latent's overall rate (a member of the model, as IPF requires): a latent
    # that never or always fires is done at once.
    eta = torch.logit(obs.sum(0) / n.sum()).expand(n_cells, d).clone()
    boundary, sweeps = 0, 0

    def log_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        """log(num / den), 0 where both are 0 (no cells left to fit with this value)."""
        both = (num <= 0) & (den <= 0)
        return torch.where(both, 0.0, torch.log(num) - torch.log(den))

    while len(active) and sweeps < max_sweeps:
        sweeps += 1
        err = torch.zeros(len(active), dtype=dt, device=dev)
        for j in range(len(onehots)):
            s1, s0 = torch.sigmoid(eta), torch.sigmoid(-eta)
            if free is not None:
                s1, s0 = s1 * free, s0 * free
            fit1, fit0 = weighted[j].T @ s1, weighted[j].T @ s0  # [V_j, d]
            err = torch.maximum(err, (fit1 - want1[j]).abs().amax(0))
            step = log_ratio(want1[j], fit1) - log_ratio(want0[j], fit0)
            eta = eta + step[index[j]]
        done = err <= tol
        if sweeps == lp_after:
            # The rest converge slowly: find the boundary of those with cells at rate 0 or 1.
            edge = ((obs <= 0) | (obs >= n[:, None])).any(0) & ~done
            obs_np, n_np = obs.cpu().numpy(), n.cpu().numpy()
            for i in torch.nonzero(edge).squeeze(1).tolist():
                cells = torch.as_tensor(boundary_cells(obs_np[:, i], n_np, design), device=dev)
                if not cells.any():
                    continue
                boundary += 1
                if free is None:
                    free = torch.ones_like(eta)
                free[cells, i] = 0.0
                eta[cells, i] = torch.where(obs[cells, i] > 0, torch.inf, -torch.inf).to(dt)
            if free is not None:
                want1, want0 = observed()
        if done.any():
            rate[:, active[done]] = torch.sigmoid(eta[:, done])
            keep = ~done
            active, obs, eta = active[keep], obs[:, keep], eta[:, keep]
            free = None if free is None else free[:, keep]
            want1, want0 = ([t[:, keep] for t in ts] for ts in (want1, want0))
    if len(active):
        rate[:, active] = torch.sigmoid(eta)
        logger.warning(
            "%d latent(s) still off their margins by more than %g images after %d IPF sweeps.",
            len(active),
            tol,
            sweeps,
        )
    return Fit(rate=rate, sweeps=sweeps, boundary=boundary, unconverged=len(active))
