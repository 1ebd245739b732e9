"""Which SAE families exist and which per-member hyperparameters each one takes.

A sweep sets these per member of a stack; the trainer validates its sweep keys against
`HPARAMS` and groups members into stacks by family, width and `GROUP_HPARAMS` (the
structural keys that must be equal inside one stack). Learning rate, batch size and
schedules belong to the trainer, not here. Meaning of every key: docs/families.md.

This module is the one home of each hyperparameter: `HPARAM_SPECS` gives its name, type and
one-line doc, `HPARAMS` its default in each family that takes it. `saev train` builds its
`--sae.*` flags, their `--help` text and the `[sae]` keys of a sweep TOML from them.
"""

import dataclasses
import math
import typing

from saev.errors import UserError

Family = typing.Literal[
    "relu",
    "topk",
    "batchtopk",
    "jumprelu",
    "gated",
    "matryoshka",
    "vsae-topk",
    "vsae-gated",
    "vsae-jumprelu",
    "vsae-iso",
    "vsae-mixture",
]
"""Every SAE family name; the one list (train's `--sae.family` choices come from it)."""
FAMILIES: tuple[str, ...] = typing.get_args(Family)


@dataclasses.dataclass(frozen=True)
class Hparam:
    """What one per-member hyperparameter is. Its default lives in `HPARAMS`, per family,
    because families differ (relu's `sparsity_coeff` is not gated's)."""

    type: typing.Any
    """int, float, bool, str or tuple[float, ...]: what `saev train` parses for it."""
    doc: str
    """One line: its meaning and the families that use it (`saev train --help` shows it)."""


HPARAM_SPECS: dict[str, Hparam] = {
    "k": Hparam(int, "Active latents per token (topk, batchtopk, matryoshka, vsae-topk)."),
    "k_aux": Hparam(int, "Dead latents used by the AuxK loss (topk, batchtopk, matryoshka)."),
    "aux_coeff": Hparam(float, "AuxK coefficient alpha (topk, batchtopk, matryoshka)."),
    "threshold_decay": Hparam(
        float, "EMA decay of the BatchTopK inference threshold (batchtopk, matryoshka)."
    ),
    "sparsity_coeff": Hparam(
        float,
        "Sparsity coefficient lambda (relu, vsae-iso, vsae-mixture L1; jumprelu L0; gated L1).",
    ),
    "target_l0": Hparam(
        float, "JumpReLU target L0: lambda*(L0/L0*-1)^2 instead of the plain L0 penalty when > 0."
    ),
    "bandwidth": Hparam(float, "JumpReLU straight-through bandwidth epsilon."),
    "threshold_init": Hparam(float, "JumpReLU initial threshold theta."),
    "threshold_lr_scale": Hparam(
        float, "JumpReLU: learning rate of the thresholds (log theta) as a multiple of the lr."
    ),
    "base": Hparam(str, "Matryoshka base family (topk or batchtopk)."),
    "prefix_fracs": Hparam(
        tuple[float, ...], "Matryoshka nested prefixes as fractions of d_sae (the last one is 1.0)."
    ),
    "kl_coeff": Hparam(float, "Variational (vsae-*) KL coefficient beta."),
    "logvar_min": Hparam(float, "Variational lower clamp of log sigma^2."),
    "logvar_max": Hparam(float, "Variational upper clamp of log sigma^2."),
    "n_components": Hparam(
        int, "vsae-mixture: Gaussian components K of each latent's prior (equal within a stack)."
    ),
    "prior_spread": Hparam(
        float,
        "vsae-mixture: initial component means evenly spaced over [-prior_spread, prior_spread].",
    ),
    "prior_std": Hparam(
        float, "vsae-mixture: initial standard deviation of every prior component."
    ),
    "learn_prior": Hparam(
        bool, "vsae-mixture: train the prior's means, variances and weights through the KL."
    ),
    "dead_after_tokens": Hparam(
        int,
        "A latent that has not fired for this many tokens counts as dead (AuxK, dead fraction).",
    ),
    "seed": Hparam(int, "Seed of the member's initialisation (`saev train` sets it from --seed)."),
}
"""Every per-member hyperparameter, in the order `saev train --help` lists them."""

_COMMON = {"seed": 0, "dead_after_tokens": 10_000_000}
_AUXK = {"k": 32, "k_aux": 512, "aux_coeff": 1 / 32}
_JUMP = {
    "sparsity_coeff": 0.01,
    "target_l0": 0.0,
    "bandwidth": 0.05,
    "threshold_init": 0.1,
    "threshold_lr_scale": 1.0,
}
_VAR = {"kl_coeff": 1.0, "logvar_min": -8.0, "logvar_max": 4.0}
_VL1 = 0.1  # vsae-iso / vsae-mixture L1, relu's (docs/families.md: why this value)

HPARAMS: dict[str, dict[str, typing.Any]] = {
    "relu": {**_COMMON, "sparsity_coeff": 0.1},
    "topk": {**_COMMON, **_AUXK},
    "batchtopk": {**_COMMON, **_AUXK, "threshold_decay": 0.99},
    "jumprelu": {**_COMMON, **_JUMP},
    "gated": {**_COMMON, "sparsity_coeff": 0.1},
    "matryoshka": {
        **_COMMON,
        **_AUXK,
        "threshold_decay": 0.99,
        "base": "batchtopk",
        "prefix_fracs": [0.0625, 0.125, 0.25, 0.5, 1.0],
    },
    "vsae-topk": {**_COMMON, "k": 32, **_VAR},
    "vsae-gated": {**_COMMON, "sparsity_coeff": 0.1, **_VAR},
    "vsae-jumprelu": {**_COMMON, **_JUMP, **_VAR},
    "vsae-iso": {**_COMMON, "sparsity_coeff": _VL1, **_VAR},
    "vsae-mixture": {
        **_COMMON,
        "sparsity_coeff": _VL1,
        **_VAR,
        "n_components": 2,
        "prior_spread": 1.0,
        "prior_std": 1.0,
        "learn_prior": True,
    },
}

_GROUP = {"matryoshka": {"base", "prefix_fracs"}, "vsae-mixture": {"n_components"}}
GROUP_HPARAMS: dict[str, frozenset[str]] = {fam: frozenset(_GROUP.get(fam, ())) for fam in FAMILIES}

# Keys whose values must be integers >= 0 (k, k_aux, n_components >= 1 where present).
INT_KEYS = frozenset(name for name, spec in HPARAM_SPECS.items() if spec.type is int)


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise UserError(f"unknown SAE family {family!r}; expected one of {', '.join(FAMILIES)}.")
    return family


def check_hparams(family: str, member: dict[str, typing.Any]) -> dict[str, typing.Any]:
    """Return `member` with defaults filled in; UserError on an unknown key or a bad value."""
    defaults = HPARAMS[check_family(family)]
    unknown = sorted(set(member) - set(defaults))
    if unknown:
        raise UserError(
            f"SAE family {family!r} has no hyperparameter {unknown[0]!r}; "
            f"allowed: {', '.join(sorted(defaults))}."
        )
    hp = {**defaults, **member}
    for key, value in hp.items():
        if key in INT_KEYS:
            least = 1 if key in ("k", "k_aux", "n_components") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(
                    f"{family} hyperparameter {key}={value!r}: expected an integer >= {least}."
                )
        elif HPARAM_SPECS[key].type is bool:
            if not isinstance(value, bool):
                raise UserError(f"{family} {key}={value!r}: expected true or false.")
        elif key == "base":
            if value not in ("topk", "batchtopk"):
                raise UserError(f"matryoshka base={value!r}: expected 'topk' or 'batchtopk'.")
        elif key == "prefix_fracs":
            ok = (
                isinstance(value, (list, tuple))
                and len(value) > 0
                and all(isinstance(v, (int, float)) and 0 < v <= 1 for v in value)
                and list(value) == sorted(set(value))
                and value[-1] == 1
            )
            if not ok:
                raise UserError(
                    f"matryoshka prefix_fracs={value!r}: expected increasing fractions in (0, 1] ending at 1."
                )
            hp[key] = [float(v) for v in value]
        else:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise UserError(
                    f"{family} hyperparameter {key}={value!r}: expected a finite number."
                )
            hp[key] = float(value)
    for key in ("bandwidth", "threshold_init", "threshold_lr_scale", "prior_std"):
        if key in hp and hp[key] <= 0:
            raise UserError(f"{family} hyperparameter {key}={hp[key]!r}: expected a value > 0.")
    if "threshold_decay" in hp and not 0 <= hp["threshold_decay"] < 1:
        raise UserError(
            f"{family} threshold_decay={hp['threshold_decay']!r}: expected 0 <= value < 1."
        )
    if "logvar_min" in hp and hp["logvar_min"] >= hp["logvar_max"]:
        raise UserError(
            f"{family} logvar_min={hp['logvar_min']!r} must be below logvar_max={hp['logvar_max']!r}."
        )
    for key in ("sparsity_coeff", "aux_coeff", "kl_coeff", "target_l0", "prior_spread"):
        if key in hp and hp[key] < 0:
            raise UserError(f"{family} hyperparameter {key}={hp[key]!r}: expected a value >= 0.")
    if (
        "prior_std" in hp
        and not hp["logvar_min"] <= 2 * math.log(hp["prior_std"]) <= hp["logvar_max"]
    ):
        raise UserError(
            f"{family} prior_std={hp['prior_std']!r}: its log-variance must lie in "
            f"[logvar_min, logvar_max] = [{hp['logvar_min']!r}, {hp['logvar_max']!r}]."
        )
    return hp
