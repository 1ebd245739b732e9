"""Learning-rate and sparsity-coefficient schedules, as pure functions of tokens seen.

Schedules are written in tokens, not steps, so a sweep over batch sizes keeps the same
warmup in data terms. They are pure functions so that a resumed run recomputes exactly the
value an uninterrupted run would have used at that step.
"""

import math
import typing

Decay = typing.Literal["cosine", "linear", "constant"]


def lr_at(
    tokens: int,
    *,
    lr: float,
    warmup: int,
    n_train: int,
    decay: Decay = "cosine",
    min_frac: float = 0.0,
) -> float:
    """Linear warmup from 0 to `lr` over `warmup` tokens, then decay to `min_frac * lr` at `n_train`."""
    if warmup > 0 and tokens < warmup:
        return lr * (tokens + 1) / warmup
    if decay == "constant" or n_train <= warmup:
        return lr
    progress = min(1.0, (tokens - warmup) / (n_train - warmup))
    if decay == "linear":
        shape = 1.0 - progress
    elif decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown decay {decay!r}")
    return lr * (min_frac + (1.0 - min_frac) * shape)


DEFAULT_LR_WARMUP = 1_000_000
"""Learning-rate warmup in tokens when none is given, capped at `DEFAULT_LR_WARMUP_FRAC` of the run."""
DEFAULT_LR_WARMUP_FRAC = 0.05


def lr_warmup_tokens(lr_warmup: int | None, n_train: int) -> int:
    """The warmup a run uses: `lr_warmup` as given, or by default the smaller of 1M tokens and 5%
    of `n_train` (a fixed 1M would leave a short run below its peak lr throughout)."""
    if lr_warmup is not None:
        return lr_warmup
    return min(DEFAULT_LR_WARMUP, int(DEFAULT_LR_WARMUP_FRAC * n_train))


def warmup_frac(tokens: int, warmup: int) -> float:
    """Multiplier on a sparsity (or KL) coefficient: linear from 0 to 1 over `warmup` tokens."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (tokens + 1) / warmup)
