"""Learning-rate and sparsity-coefficient schedules, as pure functions of tokens seen.

Schedules are written in tokens, not steps, so a sweep over batch sizes keeps the same
warmup in data terms. They are pure functions so that a resumed run recomputes exactly the
value an uninterrupted run would have used at that step.

The default learning-rate schedule is warmup, hold, decay: a short linear warmup, the peak
held for most of the run, and a decay over its last `decay_frac` (20%), as dictionary_learning
and OpenAI's TopK recipe do. Decaying from the end of warmup (cosine over the whole run) spends
most tokens at a fraction of the peak and gave clearly worse SAEs per token
(docs/benchmarks.md, "Training recipe").
"""

import math
import typing

Decay = typing.Literal["linear", "cosine", "constant"]

DEFAULT_LR_BASE = 1e-3
"""Peak Adam learning rate of an SAE with 2^14 latents; see `default_lr`."""


FAMILY_LR_FACTOR = {
    "relu": 4.0,
    "gated": 4.0,
    "jumprelu": 4.0,
    "vsae-gated": 4.0,
    "vsae-jumprelu": 4.0,
    "vsae-iso": 4.0,
    "vsae-mixture": 4.0,
}
"""Families whose measured best default lr is a multiple of the top-k one.

relu + L1 at 4x: 2x gave a much better front than 1x on random-ViT activations (d 384, 8x,
400k tokens: lambda 0.1 at L0 67 and FVU 0.136 against L0 129 at 0.135), and 4x a better one
again, at every L0 on both data kinds: FVU at matched L0 0.84-0.94x that of dictionary_learning
with its own lr tuned on the ViT set (2x: 0.99-1.22x), 14-24% below 2x at L0 9-29 on a planted
dictionary after 4M tokens, with fewer dead latents at the same L0 (docs/benchmarks.md, "A
tuned peer, relu"; docs/train.md, "Choosing hyperparameters").

gated at 4x: FVU at matched L0 0.66-0.86x that of 1x on the ViT set and 0.60-0.91x on the
planted one (6x: within 7% of 4x). vsae-gated, which trains the same gate: 0.79x on the ViT
set (1x is 1.13-1.64x of 4x at 4x's L0s) and 0.62-1.01x on the planted one.

jumprelu at 4x: its thresholds are learned in log space by Adam, so each moves by about lr per
step, and at 1x a short run leaves them near their init whatever lambda: L0 29-43 of 512 for
lambda 0.001-0.1 on the planted set (1M tokens) and 480-570 of 3,072, above d_vit 384, on the
ViT set (400k). At 4x lambda takes hold on the planted set (L0 38 down to 1.5, FVU 0.42x that
of 1x at L0 38) and the ViT code lands at L0 125-135, below d_vit. vsae-jumprelu likewise: at
1x L0 51-58 (planted) and 110-112 (ViT) whatever lambda; at 4x L0 2.2-26 on the planted set,
and on the ViT set L0 73 at FVU 0.067 against 1x's L0 111 at 0.092 (docs/benchmarks.md,
"Default lr of gated and jumprelu").

vsae-iso and vsae-mixture (relu's L1 on a variational code) at 4x: FVU at matched L0 0.66-0.90x
that of 1x on the ViT set and 0.78-0.87x on the planted one; read at 4x's L0s, 1x is 1.35-1.66x
and 1.02-2.00x of 4x (docs/benchmarks.md, "Default lr of the vsae L1 families")."""


def default_lr(d_sae: int, base: float = DEFAULT_LR_BASE, family: str = "topk") -> float:
    """`base / sqrt(d_sae / 2^14)`: the width scaling of Gao et al. (2024) and dictionary_learning,
    times the family's `FAMILY_LR_FACTOR` (1 unless measured otherwise).

    Wider SAEs share the same gradient signal among more latents, each updated less often, and
    want a smaller step; halving the learning rate per 4x width is the empirical rule both use.
    The base is higher than their 2e-4 because saev scales inputs to E||x|| = sqrt(d_vit)
    (coordinates of order 1) where they train on raw activations.
    """
    return FAMILY_LR_FACTOR.get(family, 1.0) * base / math.sqrt(d_sae / 2**14)


def lr_at(
    tokens: int,
    *,
    lr: float,
    warmup: int,
    n_train: int,
    decay: Decay = "linear",
    decay_frac: float = 0.2,
    min_frac: float = 0.0,
) -> float:
    """Linear warmup from 0 to `lr` over `warmup` tokens, hold, then decay over the last
    `decay_frac` of `n_train` to `min_frac * lr` (`decay_frac` 1: decay right after warmup)."""
    if warmup > 0 and tokens < warmup:
        return lr * (tokens + 1) / warmup
    start = max(warmup, n_train - int(decay_frac * n_train))
    if decay == "constant" or tokens < start or n_train <= start:
        return lr
    progress = min(1.0, (tokens - start) / (n_train - start))
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
