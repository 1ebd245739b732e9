"""Which images train the probes and which ones score them.

`official`: the dataset's own split, when the image index holds both sides of one: a `split`
column (train vs val/validation/test), or paths under `train/` and `val/` (FairFace's
layout). `random`: a seeded split, stratified by the joint value of the probed attributes,
that holds out `test_frac` of each stratum. `auto` takes the official split when there is
one and the random one otherwise.
"""

import typing

import numpy as np

from saev.errors import UserError

SplitBy = typing.Literal["auto", "official", "random"]

TRAIN_NAMES = ("train", "training")
TEST_NAMES = ("val", "valid", "validation", "test")


def official(paths: list[str], split_col: list[str] | None) -> np.ndarray | None:
    """Bool mask of held-out images from the dataset's own split, or None when there is no
    split with both a train and a held-out side."""
    if split_col is not None:
        names = np.array([s.strip().lower() for s in split_col])
    else:
        names = np.array(
            [p.replace("\\", "/").lstrip("./").split("/", 1)[0].lower() for p in paths]
        )
    test = np.isin(names, TEST_NAMES)
    train = np.isin(names, TRAIN_NAMES)
    if not test.any() or not train.any():
        return None
    return test


def random(strata: list[tuple], test_frac: float, seed: int) -> np.ndarray:
    """Bool mask of held-out images: round(test_frac * n) of each stratum, seeded."""
    if not 0 < test_frac < 1:
        raise UserError(f"--test-frac {test_frac}; expected a fraction in (0, 1).")
    rng = np.random.default_rng(seed)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    test = np.zeros(len(strata), dtype=bool)
    for key in sorted(groups, key=repr):
        idx = np.array(groups[key])
        k = int(round(test_frac * len(idx)))
        test[rng.permutation(idx)[:k]] = True
    return test


def make_split(
    how: SplitBy,
    *,
    paths: list[str],
    split_col: list[str] | None,
    strata: list[tuple],
    test_frac: float,
    seed: int,
    source: str,
) -> tuple[np.ndarray, str]:
    """(held-out mask, a one-line description of the split used)."""
    if how in ("auto", "official"):
        test = official(paths, split_col)
        if test is not None:
            where = "its 'split' column" if split_col is not None else "train/ and val/ paths"
            return test, f"official split of {source} (from {where})"
        if how == "official":
            raise UserError(
                f"--split-by official, but {source} has no official split (a 'split' column or "
                "paths under train/ and val/ with both sides present); use --split-by random."
            )
    test = random(strata, test_frac, seed)
    return test, f"random split stratified by the attributes, test_frac={test_frac}, seed={seed}"
