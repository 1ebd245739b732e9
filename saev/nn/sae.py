"""One SAE in memory: `SAE`, a single member of a stack taking raw activations.

It is what `Stack.member` returns and what `saev.nn.load` builds, so it sits below both
`stack` and `checkpoint`: this module needs a stack only as the object it wraps, never
the class itself (the annotation is for type checkers).
"""

import typing

from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor, nn

import saev

if typing.TYPE_CHECKING:
    from saev.nn.stack import Stack

SCHEMA = 1
"""`schema` of config.json (docs/checkpoints.md)."""
LEGACY_UNKNOWN = "unknown (saev 0.1: re-estimate from shards)"
"""`cfg["input_normalisation"]` of a saev 0.1 SAE that `calibrate_legacy` has not seen yet."""


class SAE(nn.Module):
    """One SAE taking RAW activations: `encode(x) -> f`, `decode(f) -> x_hat`, `forward(x) -> x_hat`.

    Wraps an S=1 stack (`.stack`) and always uses the inference rule (no sampling; BatchTopK
    uses its threshold), whatever `train()`/`eval()` says.
    """

    def __init__(self, stack: "Stack", extra: dict[str, typing.Any]):
        super().__init__()
        if stack.S != 1:
            raise ValueError(f"SAE wraps a single member; got a stack of {stack.S}.")
        self.stack = stack.eval()
        self.cfg = {
            "schema": SCHEMA,
            "family": stack.family,
            "d_vit": stack.d_vit,
            "d_sae": stack.d_sae,
            "hparams": dict(stack.members[0]),
            "input_scale": float(stack.scale[0]),
            "saev_version": saev.__version__,
            **extra,
        }

    @property
    def family(self) -> str:
        return self.stack.family

    @property
    def d_vit(self) -> int:
        return self.stack.d_vit

    @property
    def d_sae(self) -> int:
        return self.stack.d_sae

    @property
    def layer(self) -> int | None:
        return self.cfg.get("layer")

    @property
    def tokens(self) -> str | None:
        return self.cfg.get("tokens")

    def train(self, mode: bool = True) -> "SAE":
        super().train(mode)
        self.stack.eval()
        return self

    @property
    def needs_calibration(self) -> bool:
        """True for a saev 0.1 SAE whose input normalisation is not known yet."""
        return self.cfg.get("input_normalisation") == LEGACY_UNKNOWN

    # Checked on every call: the check costs tens of microseconds, the matmuls of a
    # [4096, 768] batch milliseconds.
    @jaxtyped(typechecker=beartype)
    def encode(self, x: Float[Tensor, "*batch d_vit"]) -> Float[Tensor, "*batch d_sae"]:
        """Raw [..., d_vit] -> codes [..., d_sae]."""
        lead = x.shape[:-1]
        return self.stack.encode(x.reshape(-1, x.shape[-1]))[0].reshape(*lead, self.d_sae)

    @jaxtyped(typechecker=beartype)
    def decode(self, f: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_vit"]:
        """Codes [..., d_sae] -> raw reconstruction [..., d_vit]."""
        lead = f.shape[:-1]
        return self.stack.decode(f.reshape(1, -1, f.shape[-1]))[0].reshape(*lead, self.d_vit)

    def forward(self, x: Float[Tensor, "*batch d_vit"]) -> Float[Tensor, "*batch d_vit"]:
        return self.decode(self.encode(x))
