"""Record the residual stream, or replace it: forward hooks on chosen blocks of a `Vit`.

Each hooked block's output is copied once, straight into a preallocated
`[batch, n_layers, n_tokens, d_vit]` buffer, in the stored token order: CLS first (when the
model has one), then patches in row-major grid order; register tokens are dropped.
`record` stops the forward pass after the deepest recorded block, since nothing after it is
stored; `forward` runs the whole model and also returns its output.

`splice` is the way back in: within it, a block's output is replaced by a function of its
stored tokens (same layout, registers passed through untouched), so the rest of the model runs
on, say, an SAE's reconstruction (`saev evaluate --downstream`).
"""

import contextlib
import typing
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def splice(
    vit: Vit,
    layer: int,
    fn: Callable[[Float[torch.Tensor, "b t d"]], Float[torch.Tensor, "b t d"]],
) -> Iterator[None]:
    """Within the block, block `layer`'s output is replaced (for every forward of `vit`).

    `fn` gets the block output's stored tokens `[b, n_tokens, d_vit]`, laid out as `Recorder`
    gives them (CLS first when the model has one, then patches; registers left out), and
    returns new values of the same shape. The hook writes them back over those tokens of a
    copy of the output and returns it, so register tokens pass through untouched and the
    layout the next block sees is the model's own. A `fn` that returns its input unchanged
    leaves the forward pass bit-identical.
    """
    layer = vit.resolve_layers([layer])[0]
    n_prefix, cls = vit.n_prefix, vit.cls_token
    n_tokens = vit.n_patches + int(cls)

    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        xb = x if vit.batch_first else x.transpose(0, 1)  # [b, n_prefix + n_patches, d]
        stored = torch.cat([xb[:, :1], xb[:, n_prefix:]], dim=1) if cls else xb[:, n_prefix:]
        new = fn(stored)
        if new.shape != (xb.shape[0], n_tokens, xb.shape[2]):
            raise ValueError(
                f"splice: fn returned {tuple(new.shape)}; expected {tuple(stored.shape)}."
            )
        out = xb.clone()  # keeps xb's strides, so the transpose below restores the model's layout
        if cls:
            out[:, 0] = new[:, 0]
            out[:, n_prefix:] = new[:, 1:]
        else:
            out[:, n_prefix:] = new
        out = out if vit.batch_first else out.transpose(0, 1)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = vit.blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
