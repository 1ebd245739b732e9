"""Exact top-k of float32 pre-activations, screened by a bfloat16 GEMM (CPU).

A TopK step needs the encoder's pre-activations only where it keeps them: k of d_sae per
token. Yet computing them all is the encoder matmul, three quarters of a float32 TopK step on
the CPU. With bfloat16 instructions (avx512_bf16, AMX) the same GEMM in bfloat16 takes half
the time (94 vs 199 ms at [4096, 768] x [768, 6144]). So:

1. screen: s = (a W + b) in bfloat16, a = x~ (float32) rounded to bfloat16, likewise W and b;
2. bound: for each token a number C (and a relative term) such that |s_j - z_j| <= C + T|s_j|
   for every latent j, z_j the exact (real-number) pre-activation. The bound is rigorous, not
   statistical: it takes the actual rounding residuals of a, W and b (a - bf16(a) is known),
   Cauchy-Schwarz for their products, and the float32 accumulation and bfloat16 output
   roundings of the GEMM;
3. candidates: the latents whose screen value could still put them among the token's k
   largest (~70 of 6,144 per token at d_vit 768), found by comparing bfloat16 bit patterns as
   int16 (the same order for positive values; a token whose threshold is not positive takes
   its whole row), only in the blocks of 32 whose maximum passes;
4. exact: float32 dot products for the candidates only (torch's sampled matmul: each entry
   one dot product, the same whatever else is computed), plus b; the token keeps the k
   largest of those, a tie at the boundary keeping the lowest latents (`sparse.top_sets`).

`top_latents` selects per token (TopK), `top_of_batch` the k·B largest of a whole batch
(BatchTopK: a lower bound on the batch's kB-th value from its block maxima, then the same
per-token thresholds). The values are float32 dot products (rounded in another order than a
GEMM's, so they differ from `x~ W_enc + b_enc` in the last bits), and the selection is exactly
the top k of them: every latent left out has, by the bound, a smaller exact value than the k
kept.

The screen gives up (returns None: the caller computes the float32 GEMM) for a member whose
inputs are not finite or where more than one token in 8 would take its whole row. If a
candidate ever lies outside the bound (a GEMM that does not round as assumed), it warns once
and stops screening for the process.
"""

import dataclasses
import functools
import math
import warnings

import torch
from torch import Tensor

from saev.nn import sparse

BLOCK = 32
"""Entries per block for the screen's block maxima (its threshold); d_sae must be a multiple."""

WHOLE = torch.iinfo(torch.int16).min
"""The threshold key of a token that takes every latent as a candidate."""


def available(W_enc: Tensor, d_sae: int, min_d_sae: int | None) -> bool:
    """Whether the screen can serve an encoder: float32 weights on a CPU with bfloat16 GEMMs,
    outside autocast, rows of at least `min_d_sae` latents (None: never)."""
    return (
        min_d_sae is not None
        and d_sae >= min_d_sae
        and d_sae % BLOCK == 0
        and W_enc.device.type == "cpu"
        and W_enc.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and _fast_bf16_gemm()
    )


def _fast_bf16_gemm() -> bool:
    """Whether this CPU runs bfloat16 GEMMs natively (avx512_bf16 or AMX) through oneDNN
    (available and not turned off); elsewhere they are emulated, slower than float32."""
    return _native_bf16() and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


@functools.cache
def _native_bf16() -> bool:
    cpu = torch.cpu
    return any(
        getattr(cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


@dataclasses.dataclass
class _Screen:
    """A member's bfloat16 screen of z = a W^T + b and its error bound: |s - z| <= C + T|s|."""

    s: Tensor
    """[B, F] bfloat16 screen values."""
    block_max: Tensor
    """[B, F / BLOCK] int16: each block's largest bit pattern (its maximum where positive)."""
    C: Tensor
    """[B] absolute part of the screen's error bound, per token."""
    ev: Tensor
    """[B] bound on |v - z| for the exact values v (float32 dot product, then + b)."""
    T: float = 2.02 * 2.0**-8
    """Relative part of the bound: two bfloat16 roundings of the GEMM's output."""

    @property
    def keys(self) -> Tensor:
        """s's bit patterns as int16: ordered as s for positive values, negative ones below."""
        return self.s.view(torch.int16)


def _screen(a: Tensor, W_rows: Tensor, b: Tensor) -> _Screen | None:
    """The bfloat16 GEMM and its error bound, or None for inputs that are not finite."""
    B, d = a.shape
    a16, W16, b16 = a.bfloat16(), W_rows.bfloat16(), b.bfloat16()
    s = torch.addmm(b16, a16, W16.t())  # [B, F] bfloat16

    # The bound (float32; every term rounded up by a margin of 1%).
    u16, u32 = 2.0**-8, 2.0**-24
    g = 2 * d * u32 / (1 - 2 * d * u32)  # float32 accumulation of d products (2 roundings each)
    a_hat = a16.float()
    an = torch.linalg.vector_norm(a, dim=1)
    ah = torch.linalg.vector_norm(a_hat, dim=1)
    ra = torch.linalg.vector_norm(a - a_hat, dim=1)
    W_hat = W16.float()
    wn = torch.linalg.vector_norm(W_rows, dim=1).max()
    wh = torch.linalg.vector_norm(W_hat, dim=1).max()
    rw = torch.linalg.vector_norm(W_rows - W_hat, dim=1).max()
    bm, bh = b.abs().max(), b16.float().abs().max()
    rb = (b - b16.float()).abs().max()
    if not bool(torch.isfinite(an).all()) or not bool((ah * wh + bh < 1e30).all()):
        return None
    # float32 norms lose squares below the smallest normal float: at most this much each.
    tiny = math.sqrt(d * 2.0**-126)
    an, ah, ra, wn, wh, rw = (n + tiny for n in (an, ah, ra, wn, wh, rw))
    # |s_j - z_j| <= C + T|s_j|: a W - a^ W^ = (a - a^) W + a^ (W - W^) (Cauchy-Schwarz on each),
    # the bias's rounding, the GEMM's accumulation, and two bfloat16 roundings of its output:
    # of product + bias, relative to s itself, and of the product p (if rounded first), at
    # most u|p| <= u min(|s| (1 + u) + |b^|, (1 + g) |a^| |W^|). The last term covers products
    # and inputs a GEMM flushes to 0 as subnormal.
    C = (
        1.01 * (ra * wn + ah * rw + rb + g * ah * wh + 1.01 * u16 * torch.clamp(ah * wh, max=bh))
        + tiny * (wh + ah)
        + 1e-30
    )
    ev = 1.01 * (g * an * wn + 2 * u32 * (an * wn + bm)) + 1e-30
    block_max = s.view(torch.int16).view(B, -1, BLOCK).amax(-1)
    return _Screen(s, block_max, C, ev)


def _thresholds(sc: _Screen, q: Tensor, scale: Tensor) -> Tensor:
    """[B] int16 keys: each token's candidates are its s >= theta, theta (1 + T) = q (a latent
    below theta has s + C + T|s| < q). `scale` bounds the magnitudes q was computed from: its
    float32 rounding is far below 1e-5 of that. A token whose q is not positive takes every
    latent (the smallest key): int16 order is s's order for positive values only."""
    theta = q / (1 + sc.T) - 1e-5 * scale
    # The largest bfloat16 <= theta (s is bfloat16: s >= theta exactly when s >= that).
    th = theta.bfloat16()
    th16 = th.view(torch.int16) - (th.float() > theta).to(torch.int16)
    return torch.where(theta > 0, th16, WHOLE)


def _candidates(
    sc: _Screen, a: Tensor, W_rows: Tensor, b: Tensor, th16: Tensor
) -> tuple[sparse.Layout, Tensor] | None:
    """The layout of the candidates (s >= each token's threshold) and their exact values v, or
    None if one of them lies outside the bound (with a warning; this member falls back to the
    float32 GEMM for this batch)."""
    B, nb = sc.block_max.shape
    # Looked for only in blocks whose maximum passes (a third of them at k 32).
    hot = sparse.flat_nonzero(sc.block_max >= th16[:, None])  # ascending block ids
    cand = sc.keys.view(B * nb, BLOCK).index_select(0, hot)
    above = cand >= th16.index_select(0, hot.div(nb, rounding_mode="floor"))[:, None]
    within = sparse.flat_nonzero(above)
    block = within.div(BLOCK, rounding_mode="floor")
    pos = hot.index_select(0, block) * BLOCK + (within - block * BLOCK)  # ascending in [B*F]

    lay = sparse.flat_layout(pos, 1, B, nb * BLOCK)
    v = lay.sampled(a, W_rows) + b.index_select(0, lay.cols)
    # The bound's own check, on every candidate: a GEMM rounding otherwise than assumed shows.
    s_c = sc.s.view(-1).index_select(0, pos).float()
    slack = sc.C.index_select(0, lay.rows) + sc.T * s_c.abs() + sc.ev.index_select(0, lay.rows)
    if not bool(((s_c - v).abs() <= slack).all()):
        # Per member and batch (a member alone decides the same); never seen on this project's
        # CPUs: a GEMM that rounds otherwise than assumed.
        warnings.warn(
            "the bfloat16 screen of the top-k selection exceeded its error bound on this CPU; "
            "this member selects from float32 pre-activations in this batch",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return lay, v


@torch.no_grad()
def top_latents(a: Tensor, W_rows: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """Each token's k largest of z = a W_rows^T + b, exactly, or None where the screen cannot
    serve this batch.

    a: [B, d] float32 (x~ = scaled input minus b_dec); W_rows: [F, d] the encoder's rows (one
    per latent); b: [F]. Returns (latents [B, k], ascending along each row; their values [B, k]
    as float32 dot products plus b).
    """
    B, F_ = a.shape[0], W_rows.shape[0]
    if k > F_ // BLOCK or B == 0:
        return None
    sc = _screen(a, W_rows, b)
    if sc is None:
        return None
    # t: the k-th largest of the token's block maxima, <= its k-th largest s (k blocks have a
    # maximum >= t); exact where positive. At least k latents have z >= t - C - T t (the k with
    # s >= t), so the k-th largest v is >= that - ev; a latent with s below the threshold for
    # q = that - ev - C - ev has v < that - ev, strictly: it cannot be kept, nor tie the k-th.
    t16 = sc.block_max.topk(k, dim=-1, sorted=False).values.amin(-1)
    t = t16.view(torch.bfloat16).float()
    q = torch.where(t16 > 0, t - sc.T * t - 2 * sc.C - 2 * sc.ev, 0.0)
    th16 = _thresholds(sc, q, t.abs() + 2 * sc.C + 2 * sc.ev)
    whole = th16 == WHOLE
    if int(whole.sum()) * 8 > B:
        return None  # many whole rows: the float32 GEMM is cheaper
    got = _candidates(sc, a, W_rows, b, th16)
    if got is None:
        return None
    lay, v = got

    # Each token's candidates packed into a row of `width`, ascending latents, -inf padding;
    # tokens that took their whole row are selected apart (one would widen every row to F).
    rows, cols, vs, start = lay.rows, lay.cols, v, lay.crow[:-1]
    counts = lay.crow[1:] - start
    any_whole = bool(whole.any())
    if any_whole:
        part = ~whole.index_select(0, lay.rows)
        rows, cols, vs = rows[part], cols[part], vs[part]
        counts = counts.masked_fill(whole, 0)
        start = torch.cumsum(counts, 0) - counts
    width = max(int(counts.max()), 1)
    dest = rows * width + (torch.arange(vs.numel()) - start.index_select(0, rows))
    packed = v.new_full((B * width,), -math.inf).index_put_((dest,), vs)
    latent = cols.new_zeros(B * width).index_put_((dest,), cols)
    vals, idx = sparse.top_sets(packed.view(1, B, width), [k])
    vals, latents = vals[0], latent.view(B, width).gather(1, idx[0])
    if any_whole:
        w = sparse.flat_nonzero(whole)
        full = v[~part].view(1, len(w), F_)  # every latent of those tokens, ascending
        w_vals, w_idx = sparse.top_sets(full, [k])
        vals, latents = vals.index_copy(0, w, w_vals[0]), latents.index_copy(0, w, w_idx[0])
    latents, order = latents.sort(-1)
    return latents, vals.gather(1, order)


@torch.no_grad()
def top_of_batch(a: Tensor, W_rows: Tensor, b: Tensor, kB: int) -> tuple[Tensor, Tensor] | None:
    """The kB largest of z = a W_rows^T + b over the whole [B, F] batch (BatchTopK), exactly, a
    tie at the kB-th keeping the lowest flat positions; or None where the screen cannot serve
    this batch. Returns (flat positions b * F + j [kB], ascending; their values [kB])."""
    B, F_ = a.shape[0], W_rows.shape[0]
    nb = F_ // BLOCK
    if B == 0 or kB > B * nb:
        return None
    sc = _screen(a, W_rows, b)
    if sc is None:
        return None
    # Each block whose maximum is positive witnesses a latent with z >= its maximum's lower
    # bound (s - C - T s, by its token's C): the kB-th largest of those bounds, L, is <= the
    # kB-th largest z of the batch, and L - max(ev) <= the kB-th largest v. A token's latent
    # with s below the threshold for q = L - max(ev) - ev - C has v < that, strictly.
    m = sc.block_max.view(torch.bfloat16).float()
    low = torch.where(sc.block_max > 0, m - sc.T * m - sc.C[:, None], -math.inf)
    low_k = low.view(-1).kthvalue(B * nb - kB + 1).values
    if not bool(low_k > -math.inf):
        return None
    q = low_k - sc.ev.max() - sc.ev - sc.C
    th16 = _thresholds(sc, q, m.abs().max() + 2 * sc.C.max() + 2 * sc.ev.max())
    if int((th16 == WHOLE).sum()) * 8 > B:
        return None
    got = _candidates(sc, a, W_rows, b, th16)
    if got is None:
        return None
    lay, v = got
    # The kB largest v, a tie at the kB-th keeping the lowest positions (the candidates are in
    # ascending flat order): a selection, not a sort.
    edge = v.kthvalue(v.numel() - kB + 1).values
    above, equal = v > edge, v == edge
    keep = above | (equal & (equal.cumsum(0) <= kB - above.sum()))
    idx = sparse.flat_nonzero(keep)
    return lay.flat.index_select(0, idx), v.index_select(0, idx)
