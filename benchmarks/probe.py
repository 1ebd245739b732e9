"""Benchmark the probe's torch logistic regression against scikit-learn, and the alignment pass.

Prints, on synthetic sparse "SAE codes" with a planted multiclass label:
- seconds per fit (one L2 strength, same objective) for saev.probe.fit and for scikit-learn's
  `LogisticRegression(solver="lbfgs")` on the standardised matrix, their ratio, and the
  final objective of each (they should agree to ~1e-4: the same problem);
- seconds for the full alignment (means, rates, AUROC, selectivity of every latent x class)
  and latents/s;
- seconds for the firing-rate departures of every latent in the gender x race (14 cells) and
  age x gender x race (126 cells) crosses of confounded FairFace-like labels (the
  no-interaction model fitted by IPF), with the sweeps and boundary fits it needed;
- seconds for targeted ablation (TPP) over three attributes and the default k list.

    python benchmarks/probe.py                                   # small, for a 2-core CPU
    python benchmarks/probe.py --device cuda --n 100000 --d 24576 --skip-sklearn
"""

import argparse
import time

import numpy as np
import torch


def objective(logits: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float) -> float:
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean() + lam / 2 * (w**2).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000, help="images")
    p.add_argument("--d", type=int, default=2048, help="latents")
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-sklearn", action="store_true")
    args = p.parse_args()

    from saev.probe import ablate, align, fit, intersect

    rng = np.random.default_rng(0)
    y = rng.integers(0, args.classes, size=args.n)
    # Sparse non-negative codes; the first 4 latents per class fire more on that class.
    x = np.maximum(rng.normal(-1.5, 1.0, size=(args.n, args.d)), 0).astype(np.float32)
    for c in range(args.classes):
        x[y == c, 4 * c : 4 * c + 4] += 1.0
    dev = torch.device(args.device)
    xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    fit.fit(xt[:256], yt[:256], args.classes, args.lam, max_iter=2)  # warm-up (imports, kernels)
    sync()
    t0 = time.perf_counter()
    probe = fit.fit(xt, yt, args.classes, args.lam, max_iter=args.max_iter)
    sync()
    t_torch = time.perf_counter() - t0
    obj_torch = objective(
        probe.logits(xt).cpu().double().numpy(), y, probe.weight.cpu().double().numpy(), args.lam
    )
    print(f"data: {args.n} x {args.d}, {args.classes} classes, lam={args.lam}, device={dev}")
    print(f"saev.probe.fit:   {t_torch:8.2f} s   objective {obj_torch:.6f}")

    if not args.skip_sklearn:
        import sklearn.linear_model

        mu, sd = x.mean(0), x.std(0)
        xs = (x - mu) / np.where(sd > 1e-12, sd, 1)
        sk = sklearn.linear_model.LogisticRegression(
            C=1 / (args.lam * args.n), max_iter=args.max_iter, tol=1e-6
        )
        t0 = time.perf_counter()
        sk.fit(xs, y)
        t_sk = time.perf_counter() - t0
        obj_sk = objective(sk.decision_function(xs), y, sk.coef_.T, args.lam)
        print(f"scikit-learn:     {t_sk:8.2f} s   objective {obj_sk:.6f}")
        print(f"ratio sklearn / saev: {t_sk / t_torch:.2f}x")

    sync()
    t0 = time.perf_counter()
    al = align.align(xt, yt, args.classes)
    sync()
    t_al = time.perf_counter() - t0
    print(
        f"alignment:        {t_al:8.2f} s   ({args.d / t_al:,.0f} latents/s over {args.n} images)"
    )

    # FairFace-like labels: the share of women and the age both vary with race.
    race = rng.integers(0, 7, size=args.n)
    gender = (rng.random(args.n) < 0.2 + 0.1 * race).astype(int)
    age = np.minimum(rng.poisson(2 + 0.5 * race + gender), 8)
    labels = {
        "age": np.array([f"a{v}" for v in age], dtype=object),
        "gender": np.array(["FM"[v] for v in gender], dtype=object),
        "race": np.array([f"r{v}" for v in race], dtype=object),
    }
    # The first 4 latents per class of y follow y; make a few follow gender and race too.
    fires = xt > 0
    fires[:, -1] = torch.from_numpy(gender == 0).to(dev)
    fires[:, -2] = torch.from_numpy(race == 3).to(dev)
    for cross in (("gender", "race"), ("age", "gender", "race")):
        sync()
        t0 = time.perf_counter()
        out = intersect.departures(fires, labels, cross, min_n=30, top=10)
        sync()
        t_dep = time.perf_counter() - t0
        print(
            f"departures {' x '.join(cross):>18}: {t_dep:6.2f} s   ({args.d / t_dep:,.0f} "
            f"latents/s; {out.fit['sweeps']} sweeps, {out.fit['boundary']} boundary, "
            f"{out.fit['unconverged']} unconverged)"
        )

    test_rows = np.arange(0, args.n, 5)
    ranking = al.ranking()
    keys = ("A", "B", "C")
    sync()
    t0 = time.perf_counter()
    ablate.tpp(
        xt,
        dict.fromkeys(keys, probe),
        dict.fromkeys(keys, (test_rows, y[test_rows])),
        {k: np.roll(ranking, 7 * i) for i, k in enumerate(keys)},
        (1, 5, 10, 20, 50, 100),
    )
    sync()
    print(f"tpp (3 attributes, 6 k): {time.perf_counter() - t0:6.2f} s")


if __name__ == "__main__":
    main()
