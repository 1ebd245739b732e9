"""Variational SAEs: a mean head μ and a log-variance head log σ² per latent, a sampled
z = μ + σ·ε (training only; μ at inference), then a sparsity rule, plus β·KL(q(z|x) ‖ prior).

Fixes the faults of the published fork (DESIGN §4): no sampling at inference (train flag,
not a global), every coefficient may be 0, the KL is normalised per latent (a mean over
latents, so β means the same at every width), log σ² is clamped to [logvar_min, logvar_max],
and decoder rows stay unit norm (stack.py), so the KL cannot be escaped by shrinking codes
and growing the decoder. Noise is drawn per member from (seed, step), so a member's noise
does not depend on its stack and a resumed run draws the same noise.
"""

import torch
from torch import Tensor, nn

from saev.errors import UserError
from saev.nn import families, sparse
from saev.nn.stack import Codes, Stack


class VariationalStack(Stack):
    """Shared heads, sampling and KL; subclasses pick μ and the sparsity rule."""

    samples = True

    def _init_family(self):
        self.W_logvar = nn.Parameter(torch.zeros(self.S, self.d_vit, self.d_sae))
        self.b_logvar = nn.Parameter(torch.zeros(self.S, self.d_sae))
        self.register_buffer("noise_step", torch.zeros(self.S, dtype=torch.long))

    def _logvar(self, xs: Tensor) -> Tensor:
        lv = torch.baddbmm(self.b_logvar[:, None, :], xs - self.b_dec[:, None, :], self.W_logvar)
        lo = self.hp("logvar_min")[:, None, None].to(lv.dtype)
        hi = self.hp("logvar_max")[:, None, None].to(lv.dtype)
        return torch.maximum(torch.minimum(lv, hi), lo)

    def _noise(self, shape: tuple[int, int], dtype, device) -> Tensor:
        eps = []
        for s, member in enumerate(self.members):
            gen = torch.Generator(device=device).manual_seed(
                member["seed"] * 1_000_003 + int(self.noise_step[s])
            )
            eps.append(torch.randn(shape, generator=gen, device=device, dtype=dtype))
        with torch.no_grad():
            self.noise_step.add_(1)
        return torch.stack(eps)

    def _sample(self, mu: Tensor, logvar: Tensor, train: bool) -> Tensor:
        if not train:
            return mu
        return mu + (0.5 * logvar).exp() * self._noise(mu.shape[1:], mu.dtype, mu.device)

    def _kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(μ, σ²) ‖ N(0, 1)) summed over latents / d_sae, mean over tokens: [S]."""
        kl = 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar)
        return kl.mean(-1).mean(-1)

    def _variational(
        self, xs: Tensor, mu: Tensor, train: bool, warm: Tensor
    ) -> tuple[Tensor, Tensor]:
        logvar = self._logvar(xs)
        z = self._sample(mu, logvar, train)
        return z, self.hp("kl_coeff") * warm * self._kl(mu, logvar)


class VTopKStack(VariationalStack):
    family = "vsae-topk"

    def _encode(self, xs, train, warm):
        S, B = xs.shape[:2]
        z, kl = self._variational(xs, self.pre_acts(xs), train, warm)
        ks = self.hp_ints("k")
        with torch.no_grad():
            layout = sparse.topk_layout(z.topk(max(ks), dim=-1).indices, ks, self.d_sae)
        vals = torch.relu(z.reshape(-1)[layout.flat])
        return Codes(S, B, self.d_sae, layout=layout, vals=vals), {"kl": kl}, None


class VGatedStack(VariationalStack):
    family = "vsae-gated"

    def _init_family(self):
        super()._init_family()
        self.r_mag = nn.Parameter(torch.zeros(self.S, self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.S, self.d_sae))

    def _encode(self, xs, train, warm):
        pi_gate, pi_mag = families.gated_paths(self, xs)
        z, kl = self._variational(xs, pi_mag, train, warm)
        f = (pi_gate > 0) * torch.relu(z)
        losses = families.gated_losses(self, xs, pi_gate, warm)
        losses["kl"] = kl
        return Codes(self.S, xs.shape[1], self.d_sae, dense=f), losses, None


class VJumpReLUStack(VariationalStack):
    family = "vsae-jumprelu"

    def _init_family(self):
        super()._init_family()
        init = self.hp("threshold_init").log()[:, None].expand(self.S, self.d_sae)
        self.log_threshold = nn.Parameter(init.clone())

    def _encode(self, xs, train, warm):
        z, kl = self._variational(xs, self.pre_acts(xs), train, warm)
        f, sparsity = families.jumprelu_codes(self, z, warm)
        return (
            Codes(self.S, xs.shape[1], self.d_sae, dense=f),
            {"sparsity": sparsity, "kl": kl},
            None,
        )


class VIsoStack(VariationalStack):
    """Isotropic Gaussian prior, no sparsity rule beyond ReLU: sparsity comes from the KL."""

    family = "vsae-iso"

    def _encode(self, xs, train, warm):
        z, kl = self._variational(xs, self.pre_acts(xs), train, warm)
        return Codes(self.S, xs.shape[1], self.d_sae, dense=torch.relu(z)), {"kl": kl}, None


class VMixtureStack(VIsoStack):
    """Correlated Gaussian prior: latents (2j, 2j+1) are pairs with prior correlation ρ
    (`prior_corr`), i.e. N(0, Σ) with 2×2 blocks [[1, ρ], [ρ, 1]]; the KL has a closed form."""

    family = "vsae-mixture"

    def __init__(self, d_vit, d_sae, members):
        if d_sae % 2:
            raise UserError(f"vsae-mixture pairs latents, so d_sae must be even; got {d_sae}.")
        super().__init__(d_vit, d_sae, members)

    def _kl(self, mu, logvar):
        rho = self.hp("prior_corr")[:, None, None].to(mu.dtype)
        one_m = 1.0 - rho.pow(2)
        a, b = mu[..., 0::2], mu[..., 1::2]
        va, vb = logvar[..., 0::2], logvar[..., 1::2]
        trace = (va.exp() + vb.exp()) / one_m
        maha = (a.pow(2) - 2 * rho * a * b + b.pow(2)) / one_m
        kl = 0.5 * (trace + maha - 2.0 + one_m.log() - va - vb)
        return kl.sum(-1).mean(-1) / self.d_sae
