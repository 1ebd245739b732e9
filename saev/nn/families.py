"""The deterministic SAE families: relu, topk, batchtopk, matryoshka, jumprelu, gated.

Each class only says how a member turns its scaled input into codes and which sparsity
or auxiliary loss it adds; stack.py does the rest. Formulas: DESIGN §4 and the papers
cited per class. Top-k style families keep their codes sparse (values + indices) and
use the sparse encoder backward and embedding-bag decode of sparse.py.
"""

import functools
import math
import typing

import torch
from torch import Tensor, nn

from saev.nn import products, screen, sparse
from saev.nn.stack import Codes, Stack, member_variances, squared_error, take_members


def l1_coeff(stack: Stack, warm: Tensor) -> Tensor:
    """[S] λ·√d_vit, the weight of an L1 penalty next to the reconstruction loss.

    Inputs are scaled to E‖x‖ = √d_vit, so the reconstruction loss grows like d_vit and a code
    value like √d_vit; with the penalty weighted by √d_vit, the loss divided by d_vit is
    (per-coordinate MSE) + λ·Σᵢ fᵢ/√d_vit, both free of the width: one λ gives a similar
    sparsity on any d_vit (docs/families.md, "Loss normalisation").
    """
    return stack.hp("sparsity_coeff") * warm * math.sqrt(stack.d_vit)


def l0_coeff(stack: Stack, warm: Tensor) -> Tensor:
    """[S] λ·d_vit, the weight of an L0 penalty: after dividing the loss by d_vit, a latent pays
    for itself if it lowers the per-coordinate MSE by more than λ."""
    return stack.hp("sparsity_coeff") * warm * stack.d_vit


class ReLUStack(Stack):
    """f = ReLU(pre); loss λ·√d_vit·Σᵢ fᵢ (decoder rows are unit norm, so this is Σ fᵢ‖W_dec,ᵢ‖).

    A trained ReLU code is sparse (a few percent of the latents active), so a member's training
    step then takes the top-k families' sparse path: the decode, the decoder gradient and the
    encoder gradient touch only the active (token, latent) pairs, and the step costs about one
    encoder matmul instead of five (2-3.6x faster below 4% active at d_vit 768). While a
    member's codes are dense (early in training, or a small λ) the dense products are cheaper
    and it stays dense. Each member picks its path from its own codes, so in one step of a
    sweep the weakly penalised members can run dense next to sparse ones, and a member follows
    the path, and the trajectory, it follows alone. Both paths give the same gradient
    (tests/test_nn_families.py) in another summation order.
    """

    family = "relu"
    sparse_below: typing.ClassVar[float] = 0.15
    """A member's training step is sparse while at most sparse_below·d/(d + 52) of its (token,
    latent) pairs are active, d = d_vit: the sparse path's work per active pair is d
    multiply-adds plus index bookkeeping worth ~52 of them, the dense path's is d per pair of
    the whole [B, d_sae] code. On the CPU the two cost the same at ~8.5% active for d_vit 64,
    ~14% for 768 and 15-17% for 384 (`python benchmarks/sae_step.py --relu-l0 ...`); the rule
    gives 8.3%, 13.2% and 14%."""
    sparse_below_gpu: typing.ClassVar[float] = 0.017
    """sparse_below on a GPU, where the dense products are far cheaper next to the index work:
    on an H200 at d_vit 768 the paths cost the same at 1.5% active (8x) and 1.9% (16x); the
    rule gives 1.6%."""

    def _encode(self, xs, train, warm):
        lam = l1_coeff(self, warm)
        learn = torch.is_grad_enabled() and self.W_enc.requires_grad
        with torch.no_grad():
            pre = self.pre_acts(xs)
            sparse_members = self._sparse_members(pre) if learn else [False] * self.S
        groups = {
            is_sparse: tuple(s for s, flag in enumerate(sparse_members) if flag == is_sparse)
            for is_sparse in (False, True)
        }
        parts = {m: self._part(pre, xs, m, is_sparse) for is_sparse, m in groups.items() if m}
        if len(parts) == 1:
            ((codes, l1),) = parts.values()
        else:
            codes = Codes(
                self.S, xs.shape[1], self.d_sae, parts=tuple((m, c) for m, (c, _) in parts.items())
            )
            l1 = codes.join([part_l1 for _, part_l1 in parts.values()])
        return codes, {"sparsity": lam * l1}, None

    def _part(
        self, pre: Tensor, xs: Tensor, members: tuple[int, ...], is_sparse: bool
    ) -> tuple[Codes, Tensor]:
        """Codes and mean L1 per token ([len(members)]) of some members, on one path."""
        take = functools.partial(take_members, members=members)
        pre, b_dec, b_enc = take(pre), take(self.b_dec), take(self.b_enc)
        # W_enc is taken from its own [S, F, d] storage: autograd builds a taken tensor's
        # gradient contiguous, and a gradient laid out unlike its parameter costs a copy.
        W_enc = take(self.W_enc.transpose(1, 2)).transpose(1, 2)
        xs = take(xs) if xs.shape[0] == self.S else xs
        S, B = len(members), pre.shape[1]
        if not is_sparse:
            f = torch.relu(sparse.dense_pre(pre, xs, b_dec, W_enc, b_enc))
            return Codes(S, B, self.d_sae, dense=f), f.sum(-1).mean(-1)
        with torch.no_grad():
            active = sparse.flat_nonzero(pre > 0)
            layout = sparse.flat_layout(active, S, B, self.d_sae)
        vals = sparse.gather_pre(pre, xs, b_dec, W_enc, b_enc, layout)
        # Each member's entries are one run of vals: summed in order, as index_add would.
        # (unsafe: the offsets are valid by construction, and checking them syncs a GPU.)
        l1 = torch.segment_reduce(vals, "sum", offsets=layout.member_ptr(), unsafe=True) / B
        return Codes(S, B, self.d_sae, layout=layout, vals=vals), l1

    @torch.no_grad()
    def _sparse_members(self, pre: Tensor) -> list[bool]:
        """Which members' codes are sparse enough for the sparse path in this batch, judged on
        its first 256 tokens: cheap, and a function of the batch and the member alone, so a
        resumed run, or the member trained alone, decides as the uninterrupted sweep did."""
        probe = pre[:, :256] > 0
        below = self.sparse_below if pre.device.type == "cpu" else self.sparse_below_gpu
        share = below * self.d_vit / (self.d_vit + 52)
        return (probe.sum((1, 2)) <= share * probe[0].numel()).tolist()


class TopKStack(Stack):
    """Gao et al. 2024: keep the k largest of ReLU(pre) per token; AuxK revives dead latents.

    Members may have different k: each member selects its own k latents per token, so the
    sparse work is proportional to its own k. On a CPU with bfloat16 GEMMs the selection is
    screened (`saev.nn.screen`): the float32 pre-activations are computed only for the
    latents a bfloat16 screen, with a rigorous error bound, cannot rule out.
    """

    family = "topk"
    uses_auxk = True
    screen_from_d_sae: typing.ClassVar[int | None] = 2048
    """Screen the per-token selection in bfloat16 (saev.nn.screen) from this d_sae on (None:
    never). Measured on a 2-core AVX-512 CPU: the step at d_vit 768, d_sae 6,144, k 32 goes
    from 1.36x to 1.06-1.11x the float32 encoder matmul (docs/benchmarks.md)."""

    def _attach(self, vals: Tensor, xs: Tensor, layout: sparse.Layout) -> Tensor:
        """Pre-activation values at the layout's positions ([nnz], computed without grad), with
        a sparse gradient when one is needed (training, or an input that asks for its gradient)."""
        if torch.is_grad_enabled() and (self.W_enc.requires_grad or xs.requires_grad):
            return sparse.attach_pre(vals, xs, self.b_dec, self.W_enc, self.b_enc, layout)
        return vals.to(self.W_dec.dtype)

    @torch.no_grad()
    def _top_entries(
        self,
        xs: Tensor,
        ns: list[int],
        screened: typing.Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor] | None],
        plain: typing.Callable[[Tensor, list[int]], tuple[list[Tensor], list[Tensor]]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
        """Each member's selection of its ns[s] largest pre-activations (per token, or over the
        batch): (where, values, pre), lists over members. `screened(a, W_rows, b_enc, n)` selects
        through the bfloat16 screen (saev.nn.screen) or returns None; members it does not serve
        get `plain(full, ns)` over their float32 GEMM, whose [B, F] pre-activations come back
        in `pre` (else None; AuxK reuses them).

        Screened or not is decided per member, from the member's own weights and batch: a
        member trained in a sweep takes the path, and the values, it takes alone."""
        S = self.S
        where: list[Tensor | None] = [None] * S
        vals: list[Tensor | None] = [None] * S
        pre: list[Tensor | None] = [None] * S
        if screen.available(self.W_enc, self.d_sae, self.screen_from_d_sae):
            for s in range(S):
                a = xs[s if xs.shape[0] > 1 else 0] - self.b_dec[s]
                got = screened(a, self.W_enc[s].t(), self.b_enc[s], ns[s])
                if got is not None:
                    where[s], vals[s] = got
        rest = [s for s in range(S) if where[s] is None]
        if rest:
            take = functools.partial(take_members, members=rest)
            W_enc = take(self.W_enc.transpose(1, 2)).transpose(1, 2)
            full = products.member_matmul(
                (take(xs) if xs.shape[0] > 1 else xs) - take(self.b_dec)[:, None, :],
                W_enc,
                take(self.b_enc)[:, None, :],
            )
            got_where, got_vals = plain(full, [ns[s] for s in rest])
            for i, s in enumerate(rest):
                where[s], vals[s], pre[s] = got_where[i], got_vals[i], full[i]
        return where, vals, pre

    @staticmethod
    def _top_per_token(full: Tensor, ks: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Each member's k largest latents per token ([B, k], ascending) and their values, from
        its float32 GEMM's pre-activations (full: [S', B, F])."""
        idx = sparse.top_sets(full, ks)[1]
        lat = [idx[i, :, :k].sort(-1).values for i, k in enumerate(ks)]
        return lat, [full[i].gather(-1, lat_i) for i, lat_i in enumerate(lat)]

    def _topk_codes(self, xs: Tensor) -> tuple[Codes, list[Tensor | None]]:
        S, B = xs.shape[:2]
        with torch.no_grad():
            ks = self.hp_ints("k")
            lat, vals, pre = self._top_entries(xs, ks, screen.top_latents, self._top_per_token)
            layout = sparse.sets_layout(lat, self.d_sae)
            flat = torch.cat([v.reshape(-1) for v in vals])
        codes = torch.relu(self._attach(flat, xs, layout))
        return Codes(S, B, self.d_sae, layout=layout, vals=codes), pre

    def _encode(self, xs, train, warm):
        codes, pre = self._topk_codes(xs)
        return codes, {}, pre

    def _aux_loss(
        self, xs: Tensor, recon: Tensor, pre: typing.Sequence[Tensor | None] | None
    ) -> Tensor | None:
        """AuxK: the k_aux largest pre-activations among dead latents model the residual."""
        if pre is None:
            return None
        dead = self.dead_mask()
        has_dead = dead.any(-1)
        if not bool(has_dead.any()):
            return None
        resid = (xs - recon).detach()
        resid_hat = self._aux_reconstructions(pre, xs, dead)
        err = (resid - resid_hat).pow(2).sum(-1).mean(-1)
        # Gao et al. weigh two normalised MSEs, the main one by Var(x) and the aux one by Var(e);
        # next to our unnormalised main loss that is alpha * Var(x)/Var(e) * ||e - e_hat||^2.
        # Member by member (stack.member_sums): this weight steers training.
        with torch.no_grad():
            var_x, var_e = member_variances(xs), member_variances(resid)
            weight = (var_x / var_e.clamp_min(1e-12)).to(err.dtype)
        return torch.where(has_dead, self.hp("aux_coeff") * weight * err, 0.0)

    aux_dense_below: typing.ClassVar[float] = 4.0
    """A member's AuxK runs dense products over its dead latents' columns while it has at most
    aux_dense_below·k_aux of them (density k_aux/n >= 25%), sparse ones over its selection
    otherwise. On the CPU an embedding bag does a multiply-add several times slower than a
    GEMM; measured at d_vit 768, 8x, k_aux 512 (docs/benchmarks.md, "AuxK")."""

    def _aux_reconstructions(
        self, pre: typing.Sequence[Tensor | None], xs: Tensor, dead: Tensor
    ) -> Tensor:
        """[S, B, d] each member's reconstruction of its residual from the k_aux largest
        pre-activations among its dead latents per token (all of them where it has no more).
        Selected among the dead columns only, so a member with few dead latents pays for those,
        not for k_aux or d_sae. Members with at most aux_dense_below·k_aux dead latents decode
        with dense products over those columns (in the autocast dtype under `--dtype bfloat16`,
        as dense codes do), the others with the sparse products of the top-k path (float32);
        either way each member's computation is the one it gets alone.

        pre[s] is member s's [B, F] pre-activations, or None where its codes came from the
        bfloat16 screen: then its dead columns get their own float32 GEMM (a few percent of
        the encoder's while few latents are dead)."""
        S, B = self.S, xs.shape[1]
        where = dead.nonzero()  # (member, latent) pairs, ascending: one sync for the stack
        counts = torch.bincount(where[:, 0], minlength=S).tolist()
        cols = where[:, 1].split(counts)
        dense, subs, keeps, sets, vals = [], [], [], [], []
        with torch.no_grad():
            for s, (c, k_aux) in enumerate(zip(cols, self.hp_ints("k_aux"), strict=True)):
                n = len(c)
                if pre[s] is not None:
                    sub = pre[s].index_select(-1, c)
                else:
                    x_s = xs[s if xs.shape[0] > 1 else 0] - self.b_dec[s]
                    W_s = self.W_enc[s].t().index_select(0, c)  # the dead latents' rows
                    sub = torch.addmm(self.b_enc[s].index_select(0, c), x_s, W_s.t())
                # Ascending columns of the dead latents are ascending latents: ties at the
                # boundary keep the lowest latents, as top_sets does.
                keep = sparse.top_mask(sub, k_aux) if n > k_aux else None
                if 0 < n <= self.aux_dense_below * k_aux:
                    dense.append(s)
                    subs.append(sub)
                    keeps.append(keep)
                    sets.append(c.new_zeros(B, 0))
                elif keep is None:  # every dead latent (or none)
                    sets.append(c.expand(B, n))
                    vals.append(sub.reshape(-1))
                else:
                    picked = sparse.flat_nonzero(keep) % n  # row-major: each row's k_aux latents
                    sets.append(c.index_select(0, picked).view(B, k_aux))
                    vals.append(sub.masked_select(keep))  # row-major: the layout's order
        hat = xs.new_zeros(S, B, self.d_vit)
        if any(x.shape[1] for x in sets):
            layout = sparse.sets_layout(sets, self.d_sae)
            z = torch.relu(self._attach(torch.cat(vals), xs, layout))
            hat = sparse.decode(self.W_dec, torch.zeros_like(self.b_dec), layout, z)
        if dense:
            picked = [cols[s] for s in dense]
            zs = sparse.columns_pre(xs, self.b_dec, self.W_enc, self.b_enc, dense, picked, subs)
            rows = torch.cat([c + s * self.d_sae for s, c in zip(dense, picked, strict=True)])
            W_cols = self.W_dec.reshape(-1, self.d_vit).index_select(0, rows)
            W_cols = W_cols.split([len(c) for c in picked])
            # The sparse decode left the dense members' rows exactly 0 and these leave the
            # others' 0: adding keeps both exact.
            hats = [xs.new_zeros(B, self.d_vit)] * S
            for s, z, keep, W in zip(dense, zs, keeps, W_cols, strict=True):
                z = torch.relu(z)
                hats[s] = ((z if keep is None else z * keep) @ W.to(z.dtype)).to(xs.dtype)
            hat = hat + torch.stack(hats)
        return hat.to(xs.dtype)


class BatchTopKStack(TopKStack):
    """Bussmann et al. 2024: keep the k·B largest of ReLU(pre) over the batch; at inference
    each token keeps pre > θ, θ an EMA of the smallest kept activation per training batch."""

    family = "batchtopk"

    def _init_family(self):
        self.register_buffer("threshold", torch.zeros(self.S))
        self.register_buffer("threshold_updates", torch.zeros(self.S, dtype=torch.long))

    def _batchtopk_codes(self, xs: Tensor, train: bool) -> tuple[Codes, Tensor]:
        S, B = xs.shape[:2]
        if not train:
            pre = self.pre_acts(xs)
            f = torch.relu(pre) * (pre > self.threshold[:, None, None])
            return Codes(S, B, self.d_sae, dense=f), None
        with torch.no_grad():
            kBs = [k * B for k in self.hp_ints("k")]
            pos, vals, pre = self._top_entries(xs, kBs, screen.top_of_batch, self._top_of_batches)
            self._update_threshold(vals)
            layout = sparse.positions_layout(pos, B, self.d_sae)
            flat = torch.cat(vals)
        codes = torch.relu(self._attach(flat, xs, layout))
        return Codes(S, B, self.d_sae, layout=layout, vals=codes), pre

    @staticmethod
    def _top_of_batches(full: Tensor, kBs: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Each member's kB largest entries of its [B, F] pre-activations: flat positions
        (ascending) and values, from the float32 GEMM."""
        top_vals, top_idx = sparse.top_sets(full.reshape(full.shape[0], -1), kBs)
        pos, vals = [], []
        for i, kB in enumerate(kBs):
            p, order = top_idx[i, :kB].sort()
            pos.append(p)
            vals.append(top_vals[i, :kB].index_select(0, order))
        return pos, vals

    @torch.no_grad()
    def _update_threshold(self, values: list[Tensor]) -> None:
        """EMA of each member's smallest positive kept activation."""
        smallest = torch.stack([torch.where(v > 0, v, math.inf).min() for v in values]).to(
            self.threshold.dtype
        )
        ok = torch.isfinite(smallest) & ~self.frozen
        decay = self.hp("threshold_decay")
        ema = torch.where(
            self.threshold_updates > 0, decay * self.threshold + (1 - decay) * smallest, smallest
        )
        self.threshold.copy_(torch.where(ok, ema, self.threshold))
        self.threshold_updates.add_(ok.long())

    def _encode(self, xs, train, warm):
        codes, pre = self._batchtopk_codes(xs, train)
        return codes, {}, pre


class MatryoshkaStack(BatchTopKStack):
    """Bussmann/Nabeshima 2025: the reconstruction loss is summed over nested prefixes of the
    latents, so early latents learn general features on their own. Base rule topk or batchtopk."""

    family = "matryoshka"

    def _prefixes(self) -> list[int]:
        fracs = self.members[0]["prefix_fracs"]
        return sorted({max(1, round(f * self.d_sae)) for f in fracs})

    def _encode(self, xs, train, warm):
        if self.members[0]["base"] == "topk":
            codes, pre = self._topk_codes(xs)
        else:
            codes, pre = self._batchtopk_codes(xs, train)
        return codes, {}, pre

    def _recon_loss(self, xs, codes, recon):
        loss = squared_error(xs, recon)
        for n in self._prefixes()[:-1]:  # the last prefix is all latents: `loss` already
            loss = loss + squared_error(xs, self.decode_codes(codes.masked(n)))
        return loss


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z·H(z − θ); ∂/∂z = H(z − θ), ∂/∂θ = −(θ/ε)·rect((z − θ)/ε) (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta, eps)
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta, eps = ctx.saved_tensors
        grad_z = g * (z > theta)
        grad_theta = (g * (-theta / eps) * _rect((z - theta) / eps)).sum(1, keepdim=True)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """H(z − θ); ∂/∂z = 0, ∂/∂θ = −(1/ε)·rect((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta, eps)
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta, eps = ctx.saved_tensors
        grad_theta = (g * (-1.0 / eps) * _rect((z - theta) / eps)).sum(1, keepdim=True)
        return None, grad_theta, None


def threshold_lr_scales(stack: Stack) -> dict[str, list[float]]:
    """log θ at `threshold_lr_scale` × the member's lr. Adam moves log θ by about lr per step,
    so in a run of a few hundred steps the thresholds may not get far enough for λ to set L0
    (docs/train.md, "jumprelu")."""
    return {"log_threshold": [float(m["threshold_lr_scale"]) for m in stack.members]}


def jumprelu_codes(stack: Stack, z: Tensor, warm: Tensor) -> tuple[Tensor, Tensor]:
    """Codes and the L0 sparsity loss of a JumpReLU rule applied to z [S, B, F]."""
    theta = stack.log_threshold.exp()[:, None, :]
    eps = stack.hp("bandwidth")[:, None, None].to(z.dtype)
    f = _JumpReLU.apply(z, theta, eps)
    l0 = _Step.apply(z, theta, eps).sum(-1).mean(-1)
    lam = l0_coeff(stack, warm)
    target = stack.hp("target_l0")
    targeted = (l0 / target.clamp_min(1e-12) - 1).pow(2)
    return f, lam * torch.where(target > 0, targeted, l0)


class JumpReLUStack(Stack):
    """Rajamanoharan et al. 2024 (JumpReLU): learned per-latent threshold θ = exp(log θ),
    straight-through rectangle-kernel gradients; λ·L0 or the target form λ(L0/L0* − 1)²."""

    family = "jumprelu"

    def _init_family(self):
        init = self.hp("threshold_init").log()[:, None].expand(self.S, self.d_sae)
        self.log_threshold = nn.Parameter(init.clone())

    def lr_scales(self):
        return threshold_lr_scales(self)

    def _encode(self, xs, train, warm):
        f, sparsity = jumprelu_codes(self, self.pre_acts(xs), warm)
        return Codes(self.S, xs.shape[1], self.d_sae, dense=f), {"sparsity": sparsity}, None


def gated_paths(stack: Stack, xs: Tensor) -> tuple[Tensor, Tensor]:
    """π_gate = x~W + b_gate and π_mag = x~(W ⊙ e^{r_mag}) + b_mag, sharing one matmul."""
    xw = torch.bmm(xs - stack.b_dec[:, None, :], stack.W_enc)
    pi_gate = xw + stack.b_enc[:, None, :]
    pi_mag = xw * stack.r_mag.exp()[:, None, :] + stack.b_mag[:, None, :]
    return pi_gate, pi_mag


def gated_losses(stack: Stack, xs: Tensor, pi_gate: Tensor, warm: Tensor) -> dict[str, Tensor]:
    """λ‖ReLU(π_gate)‖₁ and ‖xs − (ReLU(π_gate) W_dec + b_dec)‖² with the decoder detached."""
    gate = torch.relu(pi_gate)
    frozen_recon = torch.baddbmm(stack.b_dec.detach()[:, None, :], gate, stack.W_dec.detach())
    return {
        "sparsity": l1_coeff(stack, warm) * gate.sum(-1).mean(-1),
        "aux": (xs - frozen_recon).pow(2).sum(-1).mean(-1),
    }


class GatedStack(Stack):
    """Rajamanoharan et al. 2024 (Gated SAE): f = 1[π_gate > 0]·ReLU(π_mag), W_gate = W_enc."""

    family = "gated"

    def _init_family(self):
        self.r_mag = nn.Parameter(torch.zeros(self.S, self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.S, self.d_sae))

    def _encode(self, xs, train, warm):
        pi_gate, pi_mag = gated_paths(self, xs)
        f = (pi_gate > 0) * torch.relu(pi_mag)
        return (
            Codes(self.S, xs.shape[1], self.d_sae, dense=f),
            gated_losses(self, xs, pi_gate, warm),
            None,
        )
