"""Sparse paths for top-k style codes: encoder gradients and decoding touch only active latents.

A top-k code has k nonzeros out of d_sae per token. The dense way to train it multiplies
a [B, d_sae] gradient with the input again (as costly as the encoder forward) and decodes
with a dense [B, d_sae] x [d_sae, d] matmul. Here both are replaced by work over the active
(token, latent) pairs only.

A `Layout` says where the nonzeros of a whole stack's codes are, as the CSR structure of the
block-diagonal [S*B, S*F] code matrix C (row = member*B + token, column = member*F + latent,
columns ascending within each row). Members may keep different numbers of latents per token
(ragged k): a member with k=16 in a stack whose largest k is 128 pays for 16, not 128. Every
product with C is an embedding bag (a gather of rows, weighted, summed per bag):

- row side, C @ M (decode, the input gradient): bags are C's rows, gathering rows of M;
- column side, C^T @ M (the encoder and decoder weight gradients): bags are C's columns,
  gathering rows of M in the order of one argsort of the column indices per batch, shared
  by the encoder and the decoder backward;
- the gradient of the code values, (G @ W^T) at C's positions only, is torch's sampled matmul.

Dense codes (the other families, and ReLU members while their codes are dense) get the same
encoder backward from `dense_pre`, which sums the gradient over tokens before it meets W_enc
for b_dec's share: autograd of (xs - b_dec) W_enc would spend a whole [B, F] x [F, d] product on it.

On the CPU an embedding bag does C^T @ M 6-8x faster than MKL's sparse-dense product of the
transposed CSR, and torch's own embedding-bag backward sorts the indices on every call;
benchmarks/sae_step.py measures the step against the encoder matmul it must keep up with.
"""

import dataclasses
import math
import typing
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saev.nn.products import member_matmul


def flat_nonzero(mask: Tensor) -> Tensor:
    """Ascending positions (int64) of the nonzero entries of `mask` flattened:
    `mask.reshape(-1).nonzero().squeeze(1)`.

    On the CPU through numpy's `flatnonzero`, 1.7-7x faster than torch's nonzero on a 2-core
    CPU (6.3M entries at 3% nonzero: 2.9 against 5.1 ms; at 0.1%: 0.7 against 4.5 ms; inside
    a relu sweep step, the comparison included, 4.7 against 5.4 ms): the relu step's active
    pairs, the screen's candidates and the layouts' selections all take their positions here.
    Elsewhere torch's own.
    """
    if mask.device.type != "cpu":
        return mask.reshape(-1).nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.detach().numpy())).long()


@dataclasses.dataclass(eq=False)
class Layout:
    """Positions of the nonzeros of a stack's codes (CSR of the block-diagonal [S*B, S*F] matrix)."""

    rows: Tensor
    """[nnz] member*B + token, ascending."""
    cols: Tensor
    """[nnz] member*F + latent, ascending within each row."""
    crow: Tensor
    """[S*B + 1] CSR row pointers: row r's entries are [crow[r], crow[r+1])."""
    S: int
    B: int
    F: int
    _by_col: tuple[Tensor, Tensor, Tensor] | None = dataclasses.field(default=None, repr=False)
    _flat: Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def flat(self) -> Tensor:
        """[nnz] index of every entry into a flattened [S, B, F] tensor."""
        if self._flat is None:
            self._flat = self.rows * self.F + self.cols % self.F
        return self._flat

    @property
    def latents(self) -> Tensor:
        """[nnz] latent index (within its member) of every entry."""
        return self.cols % self.F

    def member_ptr(self) -> Tensor:
        """[S + 1] where each member's entries start in the flat arrays."""
        return self.crow[:: self.B]

    def by_col(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, rows in that order, column pointers [S*F + 1]): the entries sorted by column,
        i.e. the CSR structure of C^T. Computed once per layout."""
        if self._by_col is None:
            n_rows = self.S * self.B
            if self.cols.device.type == "cpu" and self.S * self.F <= 2**16:
                # Rows are ascending, so a stable sort by column alone orders by (column,
                # row); numpy sorts 16-bit integers by radix: 0.10 against 1.04 ms for the
                # 24.6k entries of a top-6 batch, 0.58 against 0.79 ms for 131k.
                cols16 = self.cols.numpy().astype(np.uint16)
                order = torch.from_numpy(np.argsort(cols16, kind="stable")).long()
            elif self.S * self.F * n_rows < 2**31:
                # (column, row) as one unique int32 key: any sort gives the same order, and
                # int32 sorts ~3x faster than a stable int64 sort on the CPU.
                order = torch.argsort(self.cols.int() * n_rows + self.rows.int())
            else:
                order = torch.argsort(self.cols, stable=True)
            ccol = torch.searchsorted(
                self.cols.index_select(0, order),
                torch.arange(self.S * self.F + 1, device=self.cols.device),
            )
            self._by_col = (order, self.rows.index_select(0, order), ccol)
        return self._by_col

    def select(self, keep: Tensor) -> tuple["Layout", Tensor]:
        """The layout of the entries where `keep` ([nnz] bool) holds, and their positions here."""
        pos = flat_nonzero(keep)
        rows, cols = self.rows.index_select(0, pos), self.cols.index_select(0, pos)
        crow = torch.searchsorted(rows, torch.arange(self.S * self.B + 1, device=rows.device))
        return Layout(rows, cols, crow, self.S, self.B, self.F), pos

    def row_sum(self, values: Tensor, M: Tensor) -> Tensor:
        """C @ M: [S*B, m] from M [S*F, m], C holding `values` at the layout's positions."""
        return F.embedding_bag(
            self.cols,
            M,
            self.crow,
            per_sample_weights=values.to(M.dtype),
            mode="sum",
            include_last_offset=True,
        )

    def col_sum(self, values: Tensor, M: Tensor) -> Tensor:
        """C^T @ M: [S*F, m] from M [S*B, m]."""
        order, rows, ccol = self.by_col()
        return F.embedding_bag(
            rows,
            M,
            ccol,
            per_sample_weights=values.index_select(0, order).to(M.dtype),
            mode="sum",
            include_last_offset=True,
        )

    def sampled(self, A: Tensor, Bt: Tensor) -> Tensor:
        """(A @ Bt^T) at the layout's positions: [nnz] from A [S*B, m] and Bt [S*F, m]."""
        with warnings.catch_warnings():
            # torch calls sparse CSR support "beta"; sampled_addmm is one MKL / cuSPARSE SDDMM.
            warnings.simplefilter("ignore", UserWarning)
            mask = torch.sparse_csr_tensor(
                self.crow,
                self.cols,
                A.new_zeros(self.cols.numel()),
                (self.S * self.B, self.S * self.F),
                check_invariants=False,
            )
            return torch.sparse.sampled_addmm(mask, A, Bt.t(), beta=0.0).values()


def _prefilter_block(n: int, m: int) -> int | None:
    """Entries per block for `largest` on rows of n entries, or None where torch.topk alone is
    faster.

    torch.topk on the CPU partial-sorts a row while m*64 <= n; past that it selects with
    nth_element and sorts, 2-3x slower (4,096 rows of 512: m 7 3.4 ms, m 9 9.3 ms). Measured on
    a 2-core CPU over n 512-24,576 and m 5-513 (4,096 rows): before the switch, blocks of 32
    pay from n 2,048 (blocks of 16 where n is not a multiple of 32, from n 3,072); shorter rows
    keep torch.topk, which takes a few ms there. Past it, blocks of 8 pay wherever m*16 <= n,
    more than blocks of 16: n 512, m 9: 4.2 against 9.3 ms (bfloat16 3.3); n 2,048, m 33: 16.2
    against 36.9 (16-blocks 17.3); n 6,144, m 129: 54.4 against 112.8 (62.7); n 24,576, m 513:
    227 against 456 (256)."""
    if m * 64 <= n:
        if n >= 2048 and n % 32 == 0:
            return 32
        if n >= 3072 and n % 16 == 0:
            return 16
        return None
    if n % 8 == 0 and m * 16 <= n:
        return 8
    return None


def largest(values: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The m largest entries of every row of `values` ([..., N]), descending: (values, indices),
    each [..., m]. The values are torch.topk's, bit for bit; of several equal values, which
    indices it returns may differ (top_sets settles ties at the members' boundaries itself).

    On the CPU, torch.topk keeps a heap of pairs per row in scalar code: 36 ms of a 290 ms
    topk step at d_sae 6,144, k 32, batch 4,096 (33 ms in bfloat16). A block-max prefilter
    finds the same entries in 19 ms (12 in bfloat16): cut each row into blocks, take the m
    largest block maxima; their smallest, t, has at least m entries at or above it (those
    maxima), so each of the row's m largest is >= t, and lies in one of those m blocks (an
    entry of another block is <= its block's max <= t). Only the entries >= t of those blocks
    (a few more than m on continuous data) go to a final torch.topk. A row where that count is
    not small (many equal values), NaN (t is NaN and nothing passes) or -inf (masked entries,
    not to be told from the padding) sends the whole tensor to torch.topk; so do GPUs, where
    torch.topk is fast already, and short rows (`_prefilter_block`). bfloat16 is compared as
    its bit patterns (int16: the same order for positive values, negative ones below every
    positive one, and element-wise passes several times faster), so there every row's t must
    be positive and finite; one exception to "torch.topk's values": a bfloat16 NaN with its
    sign bit set is passed over where torch.topk ranks every NaN largest (a scan for them
    would cost more than the selection; NaN pre-activations come from NaN inputs or weights,
    and a NaN input row has no positive t, so torch.topk takes it).
    """
    n = values.shape[-1]
    size = _prefilter_block(n, m)
    if (
        values.device.type != "cpu"
        or values.dtype not in (torch.float32, torch.float64, torch.bfloat16)
        or values.numel() == 0
    ):
        size = None
    if size is None:
        top = values.topk(m, dim=-1)
        return top.values, top.indices
    shape = values.shape[:-1]
    v = values.reshape(-1, n)
    keys = v.view(torch.int16) if v.dtype == torch.bfloat16 else v
    R, nb = v.shape[0], n // size
    blocks = keys.reshape(R * nb, size)
    tops = blocks.amax(-1).view(R, nb).topk(m, dim=-1, sorted=False)
    t = tops.values.amin(-1, keepdim=True)
    if keys is v:
        usable = bool(t.min() > -math.inf)
    else:  # positive and finite: 0x7F80 is +inf, above it NaNs
        usable = bool(t.min() > 0) and bool(tops.values.max() < 0x7F80)
    if not usable:
        top = values.topk(m, dim=-1)
        return top.values, top.indices
    chosen = (tops.indices + torch.arange(R)[:, None] * nb).view(-1)
    cand = blocks.index_select(0, chosen).view(R, m * size)
    # Pack each row's passing entries (flat positions into cand, ascending) into [R, width].
    pos = flat_nonzero(cand >= t)
    row = pos.div(m * size, rounding_mode="floor")
    start = torch.searchsorted(row, torch.arange(R + 1))
    count = start[1:] - start[:-1]
    lo, width = (int(c) for c in count.aminmax())
    if lo < m or width > n // 4:
        top = values.topk(m, dim=-1)
        return top.values, top.indices
    dest = row * width + (torch.arange(pos.numel()) - start.index_select(0, row))
    packed = v.new_full((R * width,), -math.inf)
    packed.index_put_((dest,), cand.view(v.dtype).view(-1).index_select(0, pos))
    block = pos.div(size, rounding_mode="floor")  # which of the R*m chosen blocks
    latent = tops.indices.view(-1).index_select(0, block) * size + (pos - block * size)
    where = torch.zeros(R * width, dtype=torch.long).index_put_((dest,), latent)
    top = packed.view(R, width).topk(m, dim=-1)
    idx = where.view(R, width).gather(-1, top.indices)
    return top.values.view(*shape, m), idx.view(*shape, m)


def top_sets(values: Tensor, ks: typing.Sequence[int]) -> tuple[Tensor, Tensor]:
    """The largest entries of every row of `values` ([S, ..., N]), for member s the first ks[s]
    of its rows: (values, indices), each [S, ..., max(ks)], descending.

    Which of several equal values torch.topk keeps depends on how many it was asked for, so a
    member selecting its prefix of the stack's top max(k) could keep another latent than the
    same member selecting its own top k alone (a tie at its boundary: it happens, float32 pre-
    activations collide every few thousand tokens). Here a tie at a member's boundary keeps the
    lowest indices of the tied value, whatever the stack: a member trained in a sweep follows
    the trajectory it follows alone. Under bfloat16 autocast about half the rows tie at the
    boundary, and the repair would cost several times the top-k itself: there ties are left
    to torch.topk (members with equal k still match their alone runs; a k grid matches to
    bfloat16 rounding).
    """
    kmax, n = max(ks), values.shape[-1]
    if values.dtype not in (torch.float32, torch.float64):
        # Member by member: `largest` picks its path (prefilter or torch.topk, which may keep
        # different ones of equal values) from the member's own rows, as it does alone.
        tops = [largest(v, min(kmax, n)) for v in values.unbind(0)]
        return torch.stack([t[0] for t in tops]), torch.stack([t[1] for t in tops])
    # One extra entry shows whether the value at a boundary continues past it.
    vals, idx = largest(values, min(kmax + 1, n))
    for s, k in enumerate(ks):
        if k >= n:
            continue
        edge = vals[s, ..., k - 1]
        # -inf ties are masked-out entries (AuxK, dead latents only): never kept, any order.
        tied = (edge == vals[s, ..., k]) & (edge > -math.inf)
        if not bool(tied.any()):
            continue
        # The tied rows at once (bfloat16 codes tie often): keep every entry above the edge
        # value, then the lowest-index entries equal to it until the row holds k.
        v = edge[tied][:, None]
        rows = values[s][tied]  # [R, N]
        above = rows > v
        equal = rows == v
        need = k - above.sum(-1, keepdim=True)
        keep = above | (equal & (equal.cumsum(-1) <= need))
        picked = (flat_nonzero(keep) % keep.shape[1]).view(-1, k)  # [R, k]: each row keeps k
        picked_vals = rows.gather(-1, picked)
        order = picked_vals.argsort(dim=-1, descending=True, stable=True)
        idx[s][tied, :k] = picked.gather(-1, order)
        vals[s][tied, :k] = picked_vals.gather(-1, order)
    return vals[..., :kmax], idx[..., :kmax]


def top_mask(values: Tensor, k: int) -> Tensor:
    """[B, n] bool: each row's k largest entries of `values` ([B, n], k < n); a tie at the
    boundary keeps the lowest columns, as `top_sets` does.

    For a large k (AuxK's 512 of a member's dead latents) the order by value that top_sets
    returns costs most of the selection (torch.topk of 513 of 920 columns: 65 ms sorted, 22 ms
    not); here the k + 1 largest come unsorted and the smallest of them is dropped, unless it
    ties the next (then top_sets decides)."""
    B, n = values.shape
    keep = torch.zeros(B, n, dtype=torch.bool, device=values.device)
    sel = values.topk(k + 1, dim=-1, sorted=False)
    low = sel.values.topk(2, dim=-1, largest=False)  # the (k+1)-th and the k-th largest
    if bool((low.values[:, 0] == low.values[:, 1]).any()):
        return keep.scatter_(1, top_sets(values[None], [k])[1][0, :, :k], True)
    keep.scatter_(1, sel.indices, True)
    return keep.scatter_(1, sel.indices.gather(1, low.indices[:, :1]), False)


class _ColumnsPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, b_dec, W_enc, b_enc, members, cols, *subs):
        # subs[i]: [B, n_i] = pre's columns cols[i] of member members[i], detached; xs [S or 1,
        # B, d]; b_dec [S, d]; W_enc [S, d, F] (a transposed view of its [S, F, d] storage).
        ctx.save_for_backward(xs, b_dec, W_enc, b_enc, *cols)
        ctx.members = members
        return subs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        xs, b_dec, W_enc, b_enc, *cols = ctx.saved_tensors
        W_rows = W_enc.transpose(1, 2)  # [S, F, d]: each latent's row, in storage order
        need_xs, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[:4]
        # One full-size gradient per parameter for the whole stack (a gradient per member, each
        # as large as the stack's, would cost S times S).
        grad_xs = torch.zeros_like(xs) if need_xs else None
        grad_b_dec = torch.zeros_like(b_dec) if need_b_dec else None
        grad_rows = torch.zeros_like(W_rows, memory_format=torch.contiguous_format)
        grad_b_enc = torch.zeros_like(b_enc) if need_b_enc else None
        for s, c, g in zip(ctx.members, cols, grads, strict=True):
            g = g.to(W_rows.dtype)
            g_sum = g.sum(0)
            W_cols = W_rows[s].index_select(0, c)  # [n, d]
            x_s = xs[s] if xs.shape[0] > 1 else xs[0]
            if need_xs:
                grad_xs[s if xs.shape[0] > 1 else 0] += (g @ W_cols).to(xs.dtype)
            if need_b_dec:
                grad_b_dec[s] = -(g_sum @ W_cols)
            if need_W:
                grad_rows[s].index_copy_(0, c, g.t() @ (x_s - b_dec[s]).to(g.dtype))
            if need_b_enc:
                grad_b_enc[s].index_copy_(0, c, g_sum)
        grad_W = grad_rows.transpose(1, 2) if need_W else None
        return grad_xs, grad_b_dec, grad_W, grad_b_enc, None, None, *([None] * len(grads))


def columns_pre(
    xs: Tensor,
    b_dec: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    members: typing.Sequence[int],
    cols: typing.Sequence[Tensor],
    subs: typing.Sequence[Tensor],
) -> tuple[Tensor, ...]:
    """Some columns of some members' pre-activations: `subs[i]` = ((xs - b_dec) W_enc +
    b_enc)[members[i]][:, cols[i]] ([B, n_i], computed without grad by the caller), with that
    expression's gradient from dense products over those columns only (AuxK over each member's
    dead latents)."""
    return _ColumnsPre.apply(xs, b_dec, W_enc, b_enc, list(members), list(cols), *subs)


def topk_layout(idx: Tensor, ks: typing.Sequence[int], F_: int) -> Layout:
    """Layout of per-token top-k codes: member s keeps the first ks[s] of `idx[s]` ([S, B, kmax],
    latents ordered by value as torch.topk returns them), re-sorted by latent index."""
    return sets_layout([idx[s, :, :k].sort(-1).values for s, k in enumerate(ks)], F_)


def sets_layout(sets: typing.Sequence[Tensor], F_: int) -> Layout:
    """Layout of the same number of latents for every token of a member: `sets[s]` ([B, k_s],
    ascending along each row; k_s may be 0) holds member s's latents for each token."""
    B, device = sets[0].shape[0], sets[0].device
    cols = [(c + s * F_).reshape(-1) for s, c in enumerate(sets)]
    rows = [
        (torch.arange(B, device=device) + s * B).repeat_interleave(c.shape[1])
        for s, c in enumerate(sets)
    ]
    per_row = torch.tensor([c.shape[1] for c in sets], device=device).repeat_interleave(B)
    crow = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])
    return Layout(torch.cat(rows), torch.cat(cols), crow, len(sets), B, F_)


def positions_layout(pos: typing.Sequence[Tensor], B: int, F_: int) -> Layout:
    """Layout from each member's flat positions `b * F + f` into its [B, F] code matrix, any
    number per token (BatchTopK); positions are sorted here."""
    flat = torch.cat([p.sort().values + s * B * F_ for s, p in enumerate(pos)])
    return flat_layout(flat, len(pos), B, F_)


def flat_layout(flat: Tensor, S: int, B: int, F_: int) -> Layout:
    """Layout from ascending positions into a flattened [S, B, F] code tensor (as
    `flat_nonzero(mask)` returns them for a whole stack's mask: ReLU)."""
    rows = torch.div(flat, F_, rounding_mode="floor")
    cols = flat - rows * F_ + torch.div(rows, B, rounding_mode="floor") * F_
    crow = torch.searchsorted(rows, torch.arange(S * B + 1, device=flat.device))
    return Layout(rows, cols, crow, S, B, F_, _flat=flat)


def _rows_of(W: Tensor) -> Tensor:
    """[S, F, d] (or a transposed view of one) as [S*F, d] rows, copying only if it must."""
    return W.reshape(-1, W.shape[-1])


class _AttachPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, xs, b_dec, W_enc, b_enc, layout):
        # vals: [nnz] detached; xs: [S or 1, B, d] scaled input; layout: the selection.
        ctx.save_for_backward(xs, b_dec, W_enc)
        ctx.layout = layout
        # Under bfloat16 autocast the values come from a bf16 matmul; the codes and everything
        # after them are float32 (the master weights' dtype).
        return vals.to(W_enc.dtype)

    @staticmethod
    def backward(ctx, g):
        xs, b_dec, W_enc = ctx.saved_tensors
        lay: Layout = ctx.layout
        S, B, Fdim = lay.S, lay.B, lay.F
        d = W_enc.shape[1]
        g = g.contiguous()
        # Each latent's sum over its active tokens, in token order. On a GPU index_add_'s
        # atomic adds sum in another order in every run, so a run would not repeat; the column
        # sum is the same sums in the same order (bit-equal on the CPU, 2-3x slower there).
        if g.device.type == "cpu":
            grad_b_enc = g.new_zeros(S * Fdim).index_add_(0, lay.cols, g).view(S, Fdim)
        else:
            grad_b_enc = lay.col_sum(g, g.new_ones(S * B, 1)).view(S, Fdim)

        grad_xs = grad_W_enc = None
        if ctx.needs_input_grad[3]:
            # dW_enc = x~^T G, G the sparse gradient of pre: nnz*d work instead of B*F*d. Built
            # as [S, F, d] and returned transposed, the layout of W_enc itself (stack.py).
            x_t = (xs.expand(S, B, d) - b_dec[:, None, :]).reshape(S * B, d).to(g.dtype)
            grad_W_enc = lay.col_sum(g, x_t).view(S, Fdim, d).transpose(1, 2)
        if ctx.needs_input_grad[1]:
            # d pre / d xs = W_enc^T: attributions through a spliced SAE need this.
            grad = lay.row_sum(g, _rows_of(W_enc.transpose(1, 2))).view(S, B, d)
            grad_xs = _as_input_grad(grad, xs)
        grad_b_dec = _b_dec_grad(grad_b_enc, W_enc) if ctx.needs_input_grad[2] else None
        return None, grad_xs, grad_b_dec, grad_W_enc, grad_b_enc, None


def _as_input_grad(grad: Tensor, xs: Tensor) -> Tensor:
    """The [S, B, d] gradient of the stack's input in xs's shape and dtype: summed over the
    members for a shared [1, B, d] input."""
    shared = xs.shape[0] == 1 and grad.shape[0] > 1
    return (grad.sum(0, keepdim=True) if shared else grad).to(xs.dtype)


def _b_dec_grad(grad_b_enc: Tensor, W_enc: Tensor) -> Tensor:
    """b_dec's gradient through pre = (xs - b_dec) W_enc + b_enc: d pre / d b_dec = -W_enc, so
    the token sum of pre's gradient (b_enc's) times -W_enc^T, a [1, F] x [F, d] product per
    member. Autograd of the expression would form the [B, d] gradient of xs - b_dec first, a
    product as costly as the encoder matmul, only to sum it over tokens."""
    W_t = W_enc.transpose(1, 2).to(grad_b_enc.dtype)
    return -torch.bmm(grad_b_enc[:, None, :], W_t).squeeze(1)


def attach_pre(
    vals: Tensor, xs: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, layout: Layout
) -> Tensor:
    """`vals` ([nnz], computed without grad by the caller: the entries of (xs - b_dec) W_enc +
    b_enc at the layout's positions) with that expression's gradient, by sparse products:
    gradients flow to xs, b_dec, W_enc and b_enc exactly as through the dense expression."""
    return _AttachPre.apply(vals, xs, b_dec, W_enc, b_enc, layout)


def gather_pre(
    pre: Tensor, xs: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, layout: Layout
) -> Tensor:
    """Differentiable `pre.reshape(-1)[layout.flat]` ([nnz]) with a sparse backward
    (`attach_pre`); `pre` ([S, B, F]) is the whole expression, computed without grad."""
    return attach_pre(pre.reshape(-1).index_select(0, layout.flat), xs, b_dec, W_enc, b_enc, layout)


class _DensePre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, xs, b_dec, W_enc, b_enc):
        # pre: [S, B, F] detached; returned as is (autograd makes the output a view of it).
        ctx.save_for_backward(xs, b_dec, W_enc)
        return pre

    @staticmethod
    def backward(ctx, g):
        xs, b_dec, W_enc = ctx.saved_tensors
        # Under bfloat16 autocast g is bf16: the products run in g's dtype, as autocast's own
        # backward would, and autograd casts each gradient to its parameter's dtype.
        grad_b_enc = g.sum(1)
        grad_xs = grad_W_enc = grad_b_dec = None
        if ctx.needs_input_grad[3]:
            # Built as [S, F, d] = G^T x~ and returned transposed: W_enc's own layout (stack.py).
            x_t = xs - b_dec[:, None, :]  # [S, B, d], a shared [1, B, d] input broadcast
            grad_W_enc = member_matmul(g.transpose(1, 2), x_t).transpose(1, 2)
        if ctx.needs_input_grad[1]:
            grad_xs = _as_input_grad(member_matmul(g, W_enc.transpose(1, 2)), xs)
        if ctx.needs_input_grad[2]:
            grad_b_dec = _b_dec_grad(grad_b_enc, W_enc)
        return None, grad_xs, grad_b_dec, grad_W_enc, grad_b_enc


def dense_pre(pre: Tensor, xs: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """`pre` ([S, B, F], computed without grad by the caller as (xs - b_dec) W_enc + b_enc)
    with the gradient of that expression, as `gather_pre` but for the whole dense matrix: dense
    families skip the [B, F] x [F, d] product autograd spends on b_dec's gradient."""
    return _DensePre.apply(pre, xs, b_dec, W_enc, b_enc)


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W_dec, b_dec, vals, layout):
        S, Fdim, d = W_dec.shape
        ctx.save_for_backward(W_dec, vals)
        ctx.layout = layout
        out = layout.row_sum(vals, W_dec.reshape(S * Fdim, d))
        return out.view(S, layout.B, d) + b_dec[:, None, :]

    @staticmethod
    def backward(ctx, g):
        W_dec, vals = ctx.saved_tensors
        lay: Layout = ctx.layout
        S, Fdim, d = W_dec.shape
        g_rows = g.reshape(S * lay.B, d)
        grad_W = grad_b = grad_vals = None
        if ctx.needs_input_grad[0]:
            grad_W = lay.col_sum(vals, g_rows).view(S, Fdim, d)
        if ctx.needs_input_grad[1]:
            grad_b = g.sum(1)
        if ctx.needs_input_grad[2]:
            grad_vals = lay.sampled(g_rows, W_dec.reshape(S * Fdim, d)).to(vals.dtype)
        return grad_W, grad_b, grad_vals, None


def decode(W_dec: Tensor, b_dec: Tensor, layout: Layout, vals: Tensor) -> Tensor:
    """x[s, b] = sum over the row's entries of vals * W_dec[s, latent] + b_dec[s]: [S, B, d]."""
    return _Decode.apply(W_dec, b_dec, vals.to(W_dec.dtype), layout)


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
