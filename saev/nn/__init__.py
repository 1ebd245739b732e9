"""SAE families as stacked modules, their optimiser, and checkpoints.

Interface: docs/internals.md (`saev.nn`); maths and hyperparameters: docs/families.md;
on-disk format: docs/checkpoints.md.
"""

import typing

import torch
from beartype import beartype
from jaxtyping import jaxtyped

from saev.nn.checkpoint import (
    LEGACY_UNKNOWN,
    SAE,
    calibrate_legacy,
    calibrate_legacy_from_shards,
    load,
    save,
)
from saev.nn.families import (
    BatchTopKStack,
    GatedStack,
    JumpReLUStack,
    MatryoshkaStack,
    ReLUStack,
    TopKStack,
)
from saev.nn.hparams import (
    FAMILIES,
    GROUP_HPARAMS,
    HPARAMS,
    Family,
    check_family,
    check_hparams,
)
from saev.nn.optim import StackAdam
from saev.nn.stack import Codes, Stack, StackOutput
from saev.nn.vsae import VGatedStack, VIsoStack, VJumpReLUStack, VMixtureStack, VTopKStack

STACKS: dict[str, type[Stack]] = {
    cls.family: cls
    for cls in (
        ReLUStack,
        TopKStack,
        BatchTopKStack,
        JumpReLUStack,
        GatedStack,
        MatryoshkaStack,
        VTopKStack,
        VGatedStack,
        VJumpReLUStack,
        VIsoStack,
        VMixtureStack,
    )
}


@jaxtyped(typechecker=beartype)
def make_stack(
    family: str,
    *,
    d_vit: int,
    d_sae: int,
    members: list[dict[str, typing.Any]],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Stack:
    """A stack of len(members) SAEs of `family`; each dict holds that member's hyperparameters."""
    return STACKS[check_family(family)](d_vit, d_sae, members).to(device=device, dtype=dtype)


__all__ = [
    "FAMILIES",
    "GROUP_HPARAMS",
    "HPARAMS",
    "LEGACY_UNKNOWN",
    "SAE",
    "STACKS",
    "Codes",
    "Family",
    "Stack",
    "StackAdam",
    "StackOutput",
    "calibrate_legacy",
    "calibrate_legacy_from_shards",
    "check_hparams",
    "load",
    "make_stack",
    "save",
]
