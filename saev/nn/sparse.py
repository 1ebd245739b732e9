"""Sparse paths for top-k style codes: encoder gradients and decoding touch only active latents.

A top-k code has k nonzeros out of d_sae per token. The dense way to train it multiplies
a [B, d_sae] gradient with the input again (as costly as the encoder forward) and decodes
with a dense [B, d_sae] x [d_sae, d] matmul. Here both are replaced by gathers and
index-adds over the B*k active (token, latent) pairs:

- `gather_pre` picks the selected pre-activations out of an already computed
  (detached) pre-activation tensor; its backward scatters the gradient into the selected
  encoder columns and b_enc only.
- `decode_fixed` / `decode_flat` multiply a sparse (CSR) code matrix with the decoder; the
  backward touches only the active decoder rows.

Both backward passes are one sparse-dense matmul (MKL / cuSPARSE) over the block-diagonal
[S*B, S*F] code matrix of the whole stack. A gather-multiply-index_add formulation was
~6x slower on CPU than this, and slower than the dense matmul it replaces.

Positions are flat indices into a member's [B, d_sae] code matrix (`b * d_sae + f`), so one
representation serves per-token top-k (k per row) and BatchTopK (any number per row).
"""

import warnings

import torch
import torch.nn.functional as F


def _flat_rows_cols(pos: torch.Tensor, B: int, Fdim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (member*B + token) and column (member*F + latent) of every active entry; pos: [S, N]."""
    S = pos.shape[0]
    member = torch.arange(S, device=pos.device)[:, None]
    rows = (torch.div(pos, Fdim, rounding_mode="floor") + member * B).reshape(-1)
    cols = (pos % Fdim + member * Fdim).reshape(-1)
    return rows, cols


def _csr(rows, cols, values, n_rows: int, n_cols: int) -> torch.Tensor:
    """Block-diagonal [S*B, S*F] code matrix; `rows` must be ascending (they are: positions are
    sorted within a member and members are stacked in order)."""
    crow = torch.searchsorted(rows, torch.arange(n_rows + 1, device=rows.device))
    with warnings.catch_warnings():
        # torch warns that CSR support is "beta"; the ops used here (CSR @ dense and its
        # transpose) are plain MKL / cuSPARSE SpMM calls.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, (n_rows, n_cols), check_invariants=False)


class _GatherPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, xs, b_dec, W_enc, b_enc, pos):
        # pre: [S, B, F] detached; xs: [S or 1, B, d] scaled input (no grad); pos: [S, N] long.
        S, B, Fdim = pre.shape
        ctx.save_for_backward(xs, b_dec, W_enc, pos)
        ctx.shape = (S, B, Fdim)
        return pre.reshape(S, B * Fdim).gather(1, pos)

    @staticmethod
    def backward(ctx, g):
        xs, b_dec, W_enc, pos = ctx.saved_tensors
        S, B, Fdim = ctx.shape
        d = W_enc.shape[1]
        g = g.contiguous()
        grad_b_enc = torch.zeros(S, Fdim, dtype=g.dtype, device=g.device)
        grad_b_enc.scatter_add_(1, pos % Fdim, g)

        grad_W_enc = None
        if ctx.needs_input_grad[3]:
            # dW_enc = x~^T G with G the sparse [B, F] gradient of pre: one sparse-dense matmul
            # (G^T x~) over the block-diagonal stack, B*k*d work instead of B*F*d.
            x_t = (xs.expand(S, B, d) - b_dec[:, None, :]).reshape(S * B, d)
            rows, cols = _flat_rows_cols(pos, B, Fdim)
            G = _csr(rows, cols, g.reshape(-1), S * B, S * Fdim)
            grad_W_enc = (G.t() @ x_t).view(S, Fdim, d).transpose(1, 2)

        grad_b_dec = None
        if ctx.needs_input_grad[2]:
            # d pre / d b_dec = -W_enc, summed over tokens: -W_enc @ (sum of g per latent).
            grad_b_dec = -torch.bmm(W_enc, grad_b_enc[:, :, None]).squeeze(-1)
        return None, None, grad_b_dec, grad_W_enc, grad_b_enc, None


def gather_pre(pre, xs, b_dec, W_enc, b_enc, pos):
    """Differentiable `pre.view(S, B*F).gather(1, pos)` with a sparse backward.

    `pre` must equal `xs - b_dec` times `W_enc` plus `b_enc` (computed without grad by the
    caller); gradients flow to b_dec, W_enc and b_enc exactly as through the dense expression.
    """
    return _GatherPre.apply(pre, xs, b_dec, W_enc, b_enc, pos)


def decode_fixed(W_dec, b_dec, idx, vals):
    """x = sum_j vals[s, b, j] * W_dec[s, idx[s, b, j]] + b_dec[s]; idx, vals: [S, B, K]."""
    S, Fdim, d = W_dec.shape
    _, B, K = idx.shape
    offs = (torch.arange(S, device=idx.device) * Fdim)[:, None, None]
    out = F.embedding_bag(
        (idx + offs).reshape(S * B, K),
        W_dec.reshape(S * Fdim, d),
        per_sample_weights=vals.reshape(S * B, K),
        mode="sum",
    )
    return out.view(S, B, d) + b_dec[:, None, :]


def decode_flat(W_dec, b_dec, pos, vals, B):
    """Same for positions `pos` [S, N] into [B*F], sorted ascending within each member."""
    S, Fdim, d = W_dec.shape
    member = torch.arange(S, device=pos.device)[:, None]
    rows = (pos // Fdim + member * B).reshape(-1)
    cols = (pos % Fdim + member * Fdim).reshape(-1)
    offsets = torch.searchsorted(rows, torch.arange(S * B, device=pos.device))
    out = F.embedding_bag(
        cols, W_dec.reshape(S * Fdim, d), offsets, per_sample_weights=vals.reshape(-1), mode="sum"
    )
    return out.view(S, B, d) + b_dec[:, None, :]


@torch.no_grad()
def geometric_median(x: torch.Tensor, n_iter: int = 50, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm over the second-to-last axis: x [..., N, d] -> [..., d]."""
    x = x.double()
    med = x.mean(-2)
    for _ in range(n_iter):
        w = 1.0 / (x - med[..., None, :]).norm(dim=-1).clamp_min(eps)
        new = (w[..., None] * x).sum(-2) / w.sum(-1, keepdim=True)
        if torch.allclose(new, med, rtol=0, atol=1e-7):
            med = new
            break
        med = new
    return med
