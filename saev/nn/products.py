"""Dense matrix products over a stack's member axis: one GEMM per member on the CPU.

A stack's dense products are batched over its S members ([S, B, m] @ [S, m, n]). On the CPU,
torch's batched matmul splits the batch between its threads, so S = 5 members on 2 cores run
as rounds of whole GEMMs with one core idle in the last; a loop of per-member GEMMs, each
using every core, is 12-25% faster for S = 5 (encoder forward, batch 4,096, d_vit 64-384;
benchmarks/sae_step.py times the whole step). The loop also makes a member's product the same
call whatever the stack around it, one of the things that keeps a member of a sweep equal bit
for bit to the same member trained alone (docs/internals.md). On a GPU one batched kernel
stays the better choice.
"""

import torch
from torch import Tensor


def member_matmul(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """`bias + a @ b` per member: a [S, B, m], b [S, m, n], bias [S, 1 or B, n] -> [S, B, n].

    No autograd (callers compute without grad or inside a backward). Under CPU autocast the
    product runs in the autocast dtype and returns it, as torch.baddbmm would.
    """
    device = a.device.type
    if device != "cpu":
        return torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
    S, B, _ = a.shape
    out = a.new_empty((S, B, b.shape[-1]), dtype=dtype)
    with torch.autocast(device, enabled=False):
        for s in range(S):
            a_s, b_s = a[s].to(dtype), b[s].to(dtype)
            if bias is None:
                torch.mm(a_s, b_s, out=out[s])
            else:
                torch.addmm(bias[s].to(dtype), a_s, b_s, out=out[s])
    return out


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, W_dec, b_dec):
        ctx.save_for_backward(f, W_dec)
        return member_matmul(f, W_dec, b_dec[:, None, :])

    @staticmethod
    def backward(ctx, g):
        f, W_dec = ctx.saved_tensors
        # Under bfloat16 autocast g is bf16: the products run in g's dtype, as autocast's own
        # backward would, and autograd casts each gradient to its input's dtype.
        grad_f = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_f = member_matmul(g, W_dec.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_W = member_matmul(f.transpose(1, 2), g)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(1)
        return grad_f, grad_W, grad_b


def decode(f: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Dense codes f [S, B, F] -> f W_dec + b_dec [S, B, d], differentiable, member by member."""
    return _Decode.apply(f, W_dec, b_dec)
