"""Record the residual stream: forward hooks on chosen blocks of a `Vit`.

Each hooked block's output is copied once, straight into a preallocated
`[batch, n_layers, n_tokens, d_vit]` buffer, in the stored token order: CLS first (when the
model has one), then patches in row-major grid order; register tokens are dropped.
`record` stops the forward pass after the deepest recorded block, since nothing after it is
stored; `forward` runs the whole model and also returns its output.
"""

import typing

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import nn

from saev.vits.models import Vit


class _Stop(Exception):
    """Raised from the deepest hook to skip the rest of the forward pass."""


class Recorder(nn.Module):
    """Wraps a `Vit` and returns the activations of `layers` (block indices, negatives allowed)."""

    def __init__(self, vit: Vit, layers: typing.Sequence[int]):
        super().__init__()
        self.vit = vit
        self.layers = vit.resolve_layers(layers)
        self.n_tokens = vit.n_patches + int(vit.cls_token)
        self._buf: torch.Tensor | None = None
        self._stop_early = False
        self._deepest = max(self.layers)
        self._handles = [
            vit.blocks[layer].register_forward_hook(self._hook(pos, layer))
            for pos, layer in enumerate(self.layers)
        ]

    def _hook(self, pos: int, layer: int):
        n_prefix, cls = self.vit.n_prefix, self.vit.cls_token

        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            if not self.vit.batch_first:
                x = x.transpose(0, 1)
            buf = self._buf
            if cls:
                buf[:, pos, 0] = x[:, 0]
                buf[:, pos, 1:] = x[:, n_prefix:]
            else:
                buf[:, pos] = x[:, n_prefix:]
            if self._stop_early and layer == self._deepest:
                raise _Stop

        return hook

    def _alloc(self, imgs: torch.Tensor) -> torch.Tensor:
        shape = (imgs.shape[0], len(self.layers), self.n_tokens, self.vit.d_vit)
        dtype = next(self.vit.parameters()).dtype
        return torch.empty(shape, dtype=dtype, device=imgs.device)

    @torch.inference_mode()
    def record(self, imgs: Float[torch.Tensor, "b 3 h w"]) -> Float[torch.Tensor, "b l t d"]:
        """Activations `[b, n_layers, n_tokens, d_vit]`; skips the blocks after the deepest layer."""
        self._buf = self._alloc(imgs)
        self._stop_early = True
        try:
            self.vit(imgs)
        except _Stop:
            pass
        finally:
            self._stop_early = False
        buf, self._buf = self._buf, None
        return buf

    @jaxtyped(typechecker=beartype)
    @torch.inference_mode()
    def forward(
        self, imgs: Float[torch.Tensor, "b 3 h w"]
    ) -> tuple[torch.Tensor, Float[torch.Tensor, "b l t d"]]:
        """(model output, activations `[b, n_layers, n_tokens, d_vit]`), like the reference
        saev's RecordedVisionTransformer."""
        self._buf = self._alloc(imgs)
        out = self.vit(imgs)
        buf, self._buf = self._buf, None
        return out, buf

    def remove(self) -> None:
        """Detach the hooks (the Vit then runs as if never wrapped)."""
        for h in self._handles:
            h.remove()
        self._handles = []
