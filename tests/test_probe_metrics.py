"""saev.probe metric functions against hand computations and reference implementations."""

import numpy as np
import pytest
import scipy.stats
import sklearn.linear_model
import sklearn.metrics
import torch

from saev.probe import ablate, align, fit, intersect, split


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The probes here are tiny: thread start-up dominates, and the test machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_midranks_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(50, 6)).astype(np.float32)
    got = align.midranks(torch.tensor(x)).numpy()
    want = np.stack([scipy.stats.rankdata(x[:, j]) for j in range(6)], 1)
    np.testing.assert_array_equal(got, want)


def test_auroc_by_hand():
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    al = align.align(x, y, 2)
    # Column 0 separates perfectly; column 1 is constant: every pair ties, AUROC 1/2.
    np.testing.assert_allclose(al.auroc, [[0.0, 1.0], [0.5, 0.5]])
    # One swapped pair out of four: class 1 = {1, 3} vs rest {0, 2}: pairs (1>0, 1<2, 3>0, 3>2).
    al = align.align(torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([0, 1, 0, 1]), 2)
    assert al.auroc[0, 1] == pytest.approx(3 / 4)


def test_auroc_matches_sklearn_and_rows_subset():
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(size=(120, 9)), 0).astype(np.float32)  # sparse-ish, many ties at 0
    y = rng.integers(0, 3, size=120)
    al = align.align(torch.tensor(x), torch.tensor(y), 3, chunk=4)
    want = np.array(
        [[sklearn.metrics.roc_auc_score(y == c, x[:, i]) for c in range(3)] for i in range(9)]
    )
    np.testing.assert_allclose(al.auroc, want, atol=1e-12)
    rows = np.arange(0, 120, 3)
    sub = align.align(torch.tensor(x), torch.tensor(y[rows]), 3, rows=torch.tensor(rows))
    ref = align.align(torch.tensor(x[rows]), torch.tensor(y[rows]), 3)
    np.testing.assert_allclose(sub.auroc, ref.auroc)
    np.testing.assert_allclose(sub.rate, ref.rate)


def test_means_rates_selectivity_by_hand():
    x = torch.tensor([[3.0, 0.0], [3.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    al = align.align(x, y, 2)
    np.testing.assert_allclose(al.mean[:, 0], [3.0, 0.0])
    np.testing.assert_allclose(al.mean_rest[:, 0], [0.5, 1.0])
    np.testing.assert_allclose(al.rate[:, 0], [1.0, 0.0])
    np.testing.assert_allclose(al.rate[:, 1], [0.5, 0.5])
    # (3 - 0.5) / (3 + 0.5) and (0 - 1) / (0 + 1): a latent silent on the class gives -1.
    np.testing.assert_allclose(al.selectivity[:, 0], [2.5 / 3.5, -1.0], rtol=1e-6)
    np.testing.assert_allclose(align.firing_rate(x), [0.75, 0.25])


def test_selectivity_stays_in_bounds_for_any_sign():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(300, 40)) * rng.exponential(size=40))
    al = align.align(x, torch.tensor(rng.integers(0, 4, size=300)), 4)
    assert al.selectivity.min() >= -1 and al.selectivity.max() <= 1
    only_c = torch.zeros(10, 1)
    only_c[:5] = 2.0
    al = align.align(only_c, torch.tensor([0] * 5 + [1] * 5), 2)
    assert al.selectivity[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert al.selectivity[0, 1] == pytest.approx(-1.0, abs=1e-6)


def test_ranking_and_top():
    auroc = np.array([[0.6, 0.4], [0.1, 0.9], [0.7, 0.3], [0.5, 0.5]])
    z = np.zeros_like(auroc)
    al = align.Alignment(mean=z, mean_rest=z, rate=z, auroc=auroc, selectivity=z)
    assert al.ranking().tolist() == [1, 2, 0, 3]
    assert al.top(0, 2).tolist() == [2, 0]


def test_fit_matches_sklearn():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 6)) * np.arange(1, 7)
    y = (x[:, 0] + x[:, 1] / 2 + rng.normal(size=200) > 0).astype(int) + (x[:, 2] > 3)
    lam = 1e-2
    probe = fit.fit(torch.tensor(x), torch.tensor(y), 3, lam, max_iter=500)
    xs = (x - x.mean(0)) / x.std(0)
    sk = sklearn.linear_model.LogisticRegression(C=1 / (lam * 200), tol=1e-10, max_iter=10_000)
    sk.fit(xs, y)
    got = torch.softmax(probe.logits(torch.tensor(x)), 1).numpy()
    np.testing.assert_allclose(got, sk.predict_proba(xs), atol=1e-4)


def test_fit_ignores_rows_labelled_minus_one():
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(size=(100, 3)))
    y = torch.tensor((rng.normal(size=100) > 0).astype(int))
    y_masked = y.clone()
    y_masked[50:] = -1
    a = fit.fit(x, y_masked, 2, 1e-2)
    b = fit.fit(x[:50], y[:50], 2, 1e-2)
    torch.testing.assert_close(a.logits(x), b.logits(x), atol=1e-5, rtol=1e-5)


def test_mean_and_zero_ablation_replace_the_features_by_constants():
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(80, 4)) + 3)
    y = torch.tensor(rng.integers(0, 3, size=80))
    probe = fit.fit(x, y, 3, 1e-2)
    x_mean, x_zero = x.clone(), x.clone()
    x_mean[:, [1, 3]] = x[:, [1, 3]].mean(0)
    x_zero[:, [1, 3]] = 0
    torch.testing.assert_close(probe.mean_ablated([1, 3]).logits(x), probe.logits(x_mean))
    torch.testing.assert_close(probe.zero_ablated([1, 3]).logits(x), probe.logits(x_zero))
    # The features sit near 3, not 0: the two ablations differ.
    assert not torch.allclose(probe.zero_ablated([1]).logits(x), probe.mean_ablated([1]).logits(x))


def test_scores_by_hand():
    s = fit.scores(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 1, 1]), 3)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert s["confusion"] == [[1, 1, 0], [0, 3, 0], [0, 1, 0]]


def toy(n=400, seed=0):
    """Two copies of the signal (features 0 and 1) and six noise features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    signal = (2 * y - 1) + 0.3 * rng.normal(size=n)
    x = np.concatenate(
        [
            signal[:, None],
            signal[:, None] + 0.05 * rng.normal(size=(n, 1)),
            rng.normal(size=(n, 6)),
        ],
        1,
    )
    test = np.arange(n) >= n * 3 // 4
    return torch.tensor(x, dtype=torch.float32), y, test


def test_necessity_and_sufficiency_on_a_toy_probe():
    x, y, test = toy()
    y_train = torch.tensor(np.where(~test, y, -1))
    rows = np.flatnonzero(test)
    probe, _ = fit.fit_cv(x, y_train, 2)
    base = (probe.predict(x, torch.tensor(rows)).numpy() == y[rows]).mean()
    assert base > 0.97
    ranking = np.arange(8)
    out = ablate.ablate(x, y_train, rows, y[rows], probe, ranking, [1, 2, 50])
    assert [r["k"] for r in out] == [1, 2, 8]
    k1, k2, k8 = out
    assert k1["latents"] == [0] and k2["latents"] == [0, 1]
    # One copy gone: the refit probe recovers from the other, so only the refit is unhurt.
    assert k1["refit_accuracy"] > 0.95
    assert k1["sufficiency_accuracy"] > 0.95
    # Both copies gone: nothing left, ablated or refit; the two alone are enough.
    for key in ("mean_ablation", "zero_ablation", "refit"):
        assert abs(k2[f"{key}_accuracy"] - 0.5) < 0.15, key
        assert k2[f"{key}_drop"] == pytest.approx(base - k2[f"{key}_accuracy"])
    assert k2["sufficiency_accuracy"] > 0.95
    # Ablating all eight leaves a constant predictor: the accuracy of one class.
    majority = [pytest.approx(np.mean(y[rows] == c)) for c in (0, 1)]
    assert k8["mean_ablation_accuracy"] in majority and k8["zero_ablation_accuracy"] in majority
    # The features are centred: zero- and mean-ablation nearly agree.
    assert k1["zero_ablation_accuracy"] == pytest.approx(k1["mean_ablation_accuracy"], abs=0.05)


def planted(n=900, seed=0):
    """Three independent attributes (3, 2 and 4 classes) and 20 sparse non-negative latents:
    latents 0-2 fire on A's classes, 3-4 on B's, 5-8 on C's, 9-19 are noise."""
    rng = np.random.default_rng(seed)
    ys = {"A": rng.integers(0, 3, n), "B": rng.integers(0, 2, n), "C": rng.integers(0, 4, n)}
    x = np.maximum(rng.normal(-0.5, 1.0, size=(n, 20)), 0)
    for first, y in zip((0, 3, 5), ys.values(), strict=True):
        x[np.arange(n), first + y] += 2 + rng.exponential(size=n)
    test = np.arange(n) % 4 == 0
    return torch.tensor(x, dtype=torch.float32), ys, test


def test_tpp_diagonal_drops_exceed_off_diagonal_when_latents_are_planted_per_attribute():
    x, ys, test = planted()
    probes, tests, rankings = {}, {}, {}
    for a, y in ys.items():
        y_train = torch.tensor(np.where(test, -1, y))
        probes[a] = fit.fit(x, y_train, int(y.max()) + 1, 1e-3)
        rows = np.flatnonzero(test)
        tests[a] = (rows, y[rows])
        train = np.flatnonzero(~test)
        al = align.align(x, torch.tensor(y[train]), int(y.max()) + 1, rows=torch.tensor(train))
        rankings[a] = al.ranking()
    assert set(rankings["A"][:3]) == {0, 1, 2} and set(rankings["B"][:2]) == {3, 4}
    out = ablate.tpp(x, probes, tests, rankings, [1, 2, 4, 50])
    assert out["attributes"] == ["A", "B", "C"] and [r["k"] for r in out["rows"]] == [1, 2, 4, 20]
    by_k = {r["k"]: r for r in out["rows"]}
    off = ~np.eye(3, dtype=bool)
    for kind in ("zero", "mean"):
        drop = np.array(by_k[2][kind]["drop"])
        # Each attribute's own latents hurt its probe; the others' leave it as it was.
        assert np.diag(drop).min() > 0.2, drop
        assert np.abs(drop[off]).max() < 0.03, drop
        tpp = by_k[2][kind]["tpp"]
        assert tpp == pytest.approx(np.diag(drop).mean() - drop[off].mean()) and tpp > 0.2
        assert tpp > by_k[1][kind]["tpp"] > 0
        # Past the planted latents, k reaches into the other attributes' latents; with all of
        # them ablated every probe is at its constant prediction whatever was targeted: TPP 0.
        assert by_k[4][kind]["off_diagonal"] > by_k[2][kind]["off_diagonal"]
        assert by_k[20][kind]["tpp"] == pytest.approx(0.0, abs=1e-12)
    # Each entry is the probe's accuracy drop under that ablation, computed the slow way.
    rows, y_b = tests["C"]
    base = (probes["C"].predict(x, torch.tensor(rows)).numpy() == y_b).mean()
    ablated = probes["C"].zero_ablated(rankings["A"][:2])
    acc = (ablated.predict(x, torch.tensor(rows)).numpy() == y_b).mean()
    assert by_k[2]["zero"]["drop"][0][2] == pytest.approx(base - acc)
    ablated = probes["A"].mean_ablated(rankings["A"][:2])
    acc = (ablated.predict(x, torch.tensor(rows)).numpy() == tests["A"][1]).mean()
    base = (probes["A"].predict(x, torch.tensor(rows)).numpy() == tests["A"][1]).mean()
    assert by_k[2]["mean"]["drop"][0][0] == pytest.approx(base - acc)


def test_clip_ks():
    assert ablate.clip_ks([1, 5, 10, 20, 50, 100], 8) == [1, 5, 8]
    assert ablate.clip_ks([100, 1, 0], 1000) == [1, 100]


def test_default_crosses():
    assert intersect.default_crosses(["age", "gender", "race"]) == [
        ("gender", "race"),
        ("age", "gender", "race"),
    ]
    assert intersect.default_crosses(["gender"]) == []
    assert intersect.default_crosses(["a", "b"]) == [("a", "b")]


def test_cells_accuracy_and_min_count_rule():
    labels = {
        "g": np.array(["f", "f", "f", "m", "m", "m", "m", "", "f"], dtype=object),
        "r": np.array(["x", "x", "y", "x", "x", "y", "y", "x", "x"], dtype=object),
    }
    keys, ids = intersect.cell_ids(labels, ("g", "r"))
    assert keys == [("f", "x"), ("f", "y"), ("m", "x"), ("m", "y")]
    assert ids.tolist() == [0, 0, 1, 2, 2, 3, 3, -1, 0]
    correct = np.array([1, 1, 0, 1, 0, 1, 1, 0, 0], dtype=bool)
    out = intersect.cell_accuracy(keys, ids, correct, ("g", "r"), min_n=2)
    by = {tuple(c["cell"].values()): c for c in out["cells"]}
    assert by[("f", "x")]["n"] == 3 and by[("f", "x")]["accuracy"] == pytest.approx(2 / 3)
    assert by[("f", "y")] == {
        "cell": {"g": "f", "r": "y"},
        "n": 1,
        "accuracy": 0.0,
        "counted": False,
    }
    # f/y (n=1, accuracy 0) is below the minimum: it is not the worst group.
    assert out["n_counted"] == 3
    assert out["worst_accuracy"] == 0.5 and out["worst_cell"] == {"g": "m", "r": "x"}
    assert out["best_accuracy"] == 1.0 and out["gap"] == 0.5
    none = intersect.cell_accuracy(keys, ids, correct, ("g", "r"), min_n=10)
    assert none["n_counted"] == 0 and none["gap"] is None


def test_departures_find_the_interaction_latent():
    # 2 x 2 cells of 50 images. Latent 0 fires on (a0, b0) and (a1, b1): an XOR, which no
    # product of marginal lifts explains. Latent 1 fires on every a1 image and latent 2 only
    # on (a1, b1): both are products of marginals (the model predicts them exactly). Latent 3
    # never fires.
    a = np.repeat(["a0", "a1"], 100)
    b = np.tile(np.repeat(["b0", "b1"], 50), 2)
    fires = np.zeros((200, 4), dtype=bool)
    fires[(a == "a0") == (b == "b0"), 0] = True
    fires[a == "a1", 1] = True
    fires[(a == "a1") & (b == "b1"), 2] = True
    out = intersect.departures(
        torch.tensor(fires), {"A": a, "B": b}, ("A", "B"), min_n=30, top=4
    ).cells
    assert [tuple(c["cell"].values()) for c in out] == [
        ("a0", "b0"),
        ("a0", "b1"),
        ("a1", "b0"),
        ("a1", "b1"),
    ]
    for c in out:
        assert c["n"] == 50
        top = c["latents"][0]
        assert top["latent"] == 0 and top["expected"] == pytest.approx(0.5)
        assert abs(top["z"]) > 5
        for r in c["latents"][1:]:
            assert r["z"] == pytest.approx(0.0, abs=1e-9)
            assert r["diff"] == pytest.approx(0.0, abs=1e-12)
    none = intersect.departures(torch.tensor(fires), {"A": a, "B": b}, ("A", "B"), min_n=51)
    assert none.cells == []


def test_departure_formula_by_hand():
    # One latent, 2 x 2 cells with 40 images each, rates 0.5, 0.25 / 0.25, 0.5 (a0b0, a0b1,
    # a1b0, a1b1). p = 0.375; p(a0) = p(a1) = p(b0) = p(b1) = 0.375; qhat = 0.375 everywhere.
    a = np.repeat(["a0", "a1"], 80)
    b = np.tile(np.repeat(["b0", "b1"], 40), 2)
    fires = np.zeros((160, 1), dtype=bool)
    for (aa, bb), k in {
        ("a0", "b0"): 20,
        ("a0", "b1"): 10,
        ("a1", "b0"): 10,
        ("a1", "b1"): 20,
    }.items():
        fires[np.flatnonzero((a == aa) & (b == bb))[:k], 0] = True
    out = intersect.departures(torch.tensor(fires), {"A": a, "B": b}, ("A", "B"), min_n=1).cells
    z = {tuple(c["cell"].values()): c["latents"][0] for c in out}
    se = np.sqrt(0.375 * 0.625 / 40)
    assert z[("a0", "b0")]["expected"] == pytest.approx(0.375)
    assert z[("a0", "b0")]["z"] == pytest.approx((0.5 - 0.375) / se)
    assert z[("a0", "b1")]["z"] == pytest.approx((0.25 - 0.375) / se)


def test_official_split_from_paths_and_column():
    paths = ["train/1.jpg", "train/2.jpg", "val/1.jpg", "./val/2.jpg"]
    assert split.official(paths, None).tolist() == [False, False, True, True]
    assert split.official(["val/1.jpg", "val/2.jpg"], None) is None
    col = ["train", "test", "Validation", "train"]
    assert split.official(["a", "b", "c", "d"], col).tolist() == [False, True, True, False]


def test_random_split_is_stratified_and_seeded():
    strata = [("a",)] * 50 + [("b",)] * 10 + [("c",)] * 1
    test = split.random(strata, 0.2, seed=0)
    assert test[:50].sum() == 10 and test[50:60].sum() == 2 and test[60:].sum() == 0
    assert (split.random(strata, 0.2, seed=0) == test).all()
    assert not (split.random(strata, 0.2, seed=1) == test).all()
