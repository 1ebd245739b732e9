"""SAE families as stacked modules, their optimiser, and checkpoints.

Interface: docs/internals.md (`saev.nn`); maths and hyperparameters: docs/families.md;
on-disk format: docs/checkpoints.md.
"""

from saev.nn.checkpoint import calibrate_legacy, load, save
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
    HPARAM_SPECS,
    HPARAMS,
    Family,
    Hparam,
    check_family,
    check_hparams,
)
from saev.nn.optim import StackAdam
from saev.nn.registry import STACKS, make_stack
from saev.nn.sae import LEGACY_UNKNOWN, SAE
from saev.nn.stack import Codes, Stack, StackOutput
from saev.nn.vsae import VGatedStack, VIsoStack, VJumpReLUStack, VMixtureStack, VTopKStack

__all__ = [
    "FAMILIES",
    "GROUP_HPARAMS",
    "HPARAM_SPECS",
    "HPARAMS",
    "LEGACY_UNKNOWN",
    "SAE",
    "STACKS",
    "BatchTopKStack",
    "Codes",
    "GatedStack",
    "JumpReLUStack",
    "MatryoshkaStack",
    "ReLUStack",
    "TopKStack",
    "VGatedStack",
    "VIsoStack",
    "VJumpReLUStack",
    "VMixtureStack",
    "VTopKStack",
    "Family",
    "Hparam",
    "Stack",
    "StackAdam",
    "StackOutput",
    "calibrate_legacy",
    "check_family",
    "check_hparams",
    "load",
    "make_stack",
    "save",
]
