"""Firing-rate departures against the no-interaction model fitted to the joint attribute table."""

import numpy as np
import pytest
import sklearn.linear_model
import torch

from saev.probe import intersect, nointeraction


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tables here are tiny: thread start-up dominates, and the test machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


RACES = [f"r{i}" for i in range(7)]


def confounded(seed: int = 0, n: int = 2800):
    """Gender x race labels where the share of women runs from 15% (r0) to 85% (r6)."""
    rng = np.random.default_rng(seed)
    race = rng.choice(RACES, size=n)
    share = 0.15 + 0.7 * np.array([RACES.index(r) for r in race]) / 6
    gender = np.where(rng.random(n) < share, "F", "M")
    return gender, race, rng


def z_of(out: intersect.Departures) -> dict[int, list[float]]:
    """Every reported z per latent, over all cells."""
    zs: dict[int, list[float]] = {}
    for cell in out.cells:
        for r in cell["latents"]:
            zs.setdefault(r["latent"], []).append(r["z"])
    return zs


def test_single_attribute_latents_have_no_departure_when_attributes_are_confounded():
    gender, race, rng = confounded()
    female = gender == "F"
    fires = np.stack(
        [
            female,  # pure gender
            race == "r3",  # pure race
            np.isin(race, ["r0", "r5"]),  # pure race, two values
            female & (rng.random(len(gender)) < 0.6),  # gender, noisily
            female == np.isin(race, RACES[:3]),  # gender flips with race: an interaction
        ],
        1,
    )
    out = intersect.departures(
        torch.tensor(fires), {"g": gender, "r": race}, ("g", "r"), min_n=30, top=5
    )
    assert len(out.cells) == 14
    zs = z_of(out)
    for i in (0, 1, 2):
        np.testing.assert_allclose(zs[i], 0.0, atol=1e-6)
    # A noisy single-attribute latent departs only by chance.
    assert max(abs(z) for z in zs[3]) < 4
    for cell in out.cells:
        top = cell["latents"][0]
        assert top["latent"] == 4 and abs(top["z"]) > 5, cell
    # The old independence model (rate x product of marginal lifts) flagged pure gender: in
    # (F, r0) it expected p * (p_F / p) * (p_r0 / p) = p_r0 / p, far from 1.
    p = female.mean()
    p_r0 = female[race == "r0"].mean()
    f_r0 = next(c for c in out.cells if c["cell"] == {"g": "F", "r": "r0"})
    assert p_r0 / p < 0.5
    assert {r["latent"]: r["expected"] for r in f_r0["latents"]}[0] == pytest.approx(1.0)
    assert out.fit["model"] == "fires ~ g + r" and out.fit["unconverged"] == 0


def test_three_way_cross_fits_the_joint_table():
    gender, race, rng = confounded(seed=1, n=6000)
    # Age depends on both gender and race, so no pair of attributes is independent.
    old = rng.random(len(gender)) < np.where(gender == "F", 0.3, 0.6) + np.where(
        np.isin(race, RACES[:3]), 0.2, -0.2
    )
    age = np.where(old, "old", "young")
    fires = np.stack(
        [
            age == "old",  # pure age
            (gender == "F") == np.isin(race, RACES[:3]),  # a gender x race interaction
            (age == "old") & (rng.random(len(age)) < 0.5),  # age, noisily
        ],
        1,
    )
    labels = {"a": age, "g": gender, "r": race}
    out = intersect.departures(torch.tensor(fires), labels, ("a", "g", "r"), min_n=30, top=3)
    assert len(out.cells) >= 20
    zs = z_of(out)
    np.testing.assert_allclose(zs[0], 0.0, atol=1e-6)
    assert max(abs(z) for z in zs[2]) < 4
    assert all(c["latents"][0]["latent"] == 1 for c in out.cells)


def test_expected_rates_equal_an_unpenalised_logistic_regression():
    rng = np.random.default_rng(2)
    shape = (3, 2, 4)
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, 3)
    n = rng.integers(20, 200, size=len(grid)).astype(float)
    true = rng.uniform(0.05, 0.9, size=(len(grid), 3))
    o1 = rng.binomial(n[:, None].astype(int), true).astype(float)
    fit = nointeraction.expected_rates(
        torch.tensor(o1), torch.tensor(n), [torch.tensor(grid[:, j]) for j in range(3)]
    )
    assert fit.unconverged == 0 and fit.boundary == 0
    x = np.concatenate([np.eye(s)[grid[:, j]] for j, s in enumerate(shape)], 1)
    for i in range(3):
        # One row per cell and outcome, weighted by its count.
        lr = sklearn.linear_model.LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000)
        lr.fit(
            np.repeat(x, 2, 0),
            np.tile([1, 0], len(grid)),
            sample_weight=np.stack([o1[:, i], n - o1[:, i]], 1).ravel(),
        )
        np.testing.assert_allclose(fit.rate[:, i].numpy(), lr.predict_proba(x)[:, 1], atol=1e-5)


def test_boundary_cells_by_hand():
    design = np.concatenate([np.ones((4, 1)), np.eye(2)[[0, 0, 1, 1]], np.eye(2)[[0, 1, 0, 1]]], 1)
    n = np.full(4, 10.0)
    # Fires exactly on (a1, b1): never/always everywhere, a product of two lifts in the limit.
    conj = np.array([0.0, 0, 0, 10])
    assert nointeraction.boundary_cells(conj, n, design).tolist() == [True] * 4
    # XOR: never/always too, but no direction of the parameters explains it: finite fit.
    xor = np.array([10.0, 0, 0, 10])
    assert nointeraction.boundary_cells(xor, n, design).tolist() == [False] * 4
    # (a0, b0) never fires, the others fire sometimes: only a full row or column could
    # push it to 0, and the rest of each is mixed.
    assert not nointeraction.boundary_cells(np.array([0.0, 3, 4, 5]), n, design).any()


def test_conjunction_latent_is_fitted_exactly_on_the_boundary():
    gender, race, _ = confounded(seed=3)
    fires = np.stack([(gender == "F") & (race == "r3"), gender == "M"], 1)
    out = intersect.departures(
        torch.tensor(fires), {"g": gender, "r": race}, ("g", "r"), min_n=1, top=2
    )
    np.testing.assert_allclose(z_of(out)[0], 0.0, atol=1e-9)
    # Latent 1 follows one attribute: IPF fits it in one sweep, without the LP.
    assert out.fit["boundary"] == 1 and out.fit["unconverged"] == 0


def test_dead_and_saturated_latents():
    gender, race, _ = confounded(seed=4, n=600)
    fires = np.zeros((len(gender), 2), dtype=bool)
    fires[:, 1] = True
    fit = intersect.departures(
        torch.tensor(fires), {"g": gender, "r": race}, ("g", "r"), min_n=1, top=2
    )
    for cell in fit.cells:
        for r in cell["latents"]:
            assert r["expected"] == r["rate"] and r["z"] == 0
    assert fit.fit["sweeps"] == 1


@pytest.mark.parametrize("shape", [(2, 7), (3, 2, 4)])
def test_tables_full_of_zero_and_full_cells_fit_their_margins(shape):
    """Cells that never, always or sometimes fire, at random: every latent converges, fits
    every [fires x A_j] margin, and is finite."""
    rng = np.random.default_rng(5)
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, len(shape))
    grid = grid[rng.random(len(grid)) > 0.1]  # a few empty cells
    n = rng.integers(1, 60, size=len(grid)).astype(float)
    kind = rng.integers(0, 3, size=(len(grid), 150))  # 0 never, 1 always, 2 sometimes
    kind[rng.random(kind.shape) < rng.random(150)] = 0
    o1 = np.where(kind == 1, n[:, None], 0.0)
    o1[kind == 2] = rng.binomial(
        np.broadcast_to(n[:, None], kind.shape)[kind == 2].astype(int), 0.5
    )
    values = [torch.tensor(grid[:, j]) for j in range(len(shape))]
    fit = nointeraction.expected_rates(torch.tensor(o1), torch.tensor(n), values)
    rate = fit.rate.numpy()
    assert fit.unconverged == 0 and fit.boundary > 0 and np.isfinite(rate).all()
    for j in range(len(shape)):
        g = np.eye(grid[:, j].max() + 1)[grid[:, j]]
        np.testing.assert_allclose(g.T @ (rate * n[:, None]), g.T @ o1, atol=1e-5)
