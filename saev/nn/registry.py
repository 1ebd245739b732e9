"""The family registry: family name -> stack class, and `make_stack`.

Its own module so that `checkpoint` (which builds the stack a config.json names) and the
package's `__init__` both import it, and neither imports the other.
"""

import typing

import torch
from beartype import beartype
from jaxtyping import jaxtyped

from saev.nn.families import (
    BatchTopKStack,
    GatedStack,
    JumpReLUStack,
    MatryoshkaStack,
    ReLUStack,
    TopKStack,
)
from saev.nn.hparams import check_family
from saev.nn.stack import Stack
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
