"""Adam for a stack: per-member learning rate and gradient-norm clipping, decoder-norm
constraint, and members that stop (freeze) on a non-finite loss while the others go on.
A family may train some parameters at a multiple of the lr (`Stack.lr_scales`: JumpReLU's
thresholds).

All members are updated at once with [S]-shaped per-member factors; the update of member
i uses only member i's gradients, so it equals running Adam on that SAE alone.
"""

import typing

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from saev.nn.stack import Stack

_FUSED_UNAVAILABLE: set[str] = set()
"""torch versions whose `_fused_adam_` refused our call (checked once, then not tried again)."""


def _fused_adam_runs_on(p: Tensor) -> bool:
    """torch's fused Adam kernel exists for CPU and CUDA float tensors (torch >= 2.4)."""
    return (
        hasattr(torch, "_fused_adam_")
        and torch.__version__ not in _FUSED_UNAVAILABLE
        and p.device.type in ("cpu", "cuda")
    )


def _per_member(value, S: int, device) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.expand(S).clone() if t.ndim == 0 else t.reshape(S).clone()


def _members(tensors: list[Tensor], s: int, flip: list[bool]) -> list[Tensor]:
    """Member s of each tensor, transposed where `flip` says (a 2-D view in storage order)."""
    return [t[s].t() if f else t[s] for t, f in zip(tensors, flip, strict=True)]


def _by_scale(scales: list[float]) -> list[tuple[float, list[int]]]:
    """Parameter indices grouped by lr multiplier, in first-seen order."""
    groups: dict[float, list[int]] = {}
    for i, scale in enumerate(scales):
        groups.setdefault(scale, []).append(i)
    return list(groups.items())


class StackAdam:
    """Adam over every parameter of `stack` (each has a leading S axis)."""

    def __init__(
        self,
        stack: Stack,
        lr: float | typing.Sequence[float] | Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_grad_norm: float | typing.Sequence[float] | Tensor = 1.0,
    ):
        self.stack = stack
        named = [(name, p) for name, p in stack.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        device = stack.W_dec.device
        scales = stack.lr_scales()
        # Per member, the parameters grouped by their lr multiplier (one fused call per group),
        # and per parameter the [S] multipliers for the plain update (None: 1 for every member).
        self._groups = [
            _by_scale([scales.get(name, [1.0] * stack.S)[s] for name, _ in named])
            for s in range(stack.S)
        ]
        self._scales = [
            torch.tensor(scales[name], dtype=torch.float64, device=device)
            if name in scales
            else None
            for name, _ in named
        ]
        self.lr = _per_member(lr, stack.S, device)
        self.max_grad_norm = _per_member(max_grad_norm, stack.S, device)
        self.betas, self.eps = betas, eps
        self.steps = torch.zeros(stack.S, dtype=torch.long, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def set_lr(self, lr: float | typing.Sequence[float] | Tensor) -> None:
        self.lr.copy_(_per_member(lr, self.stack.S, self.lr.device))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    # Once per training step: annotated, not checked at run time.
    def step(self, loss: Float[Tensor, " S"] | None = None) -> Bool[Tensor, " S"]:
        """One update of every live member; returns [S] bool of members frozen by this call."""
        stack, S = self.stack, self.stack.S
        stack.project_decoder_grad()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        # Member by member (as stack.member_sums): a norm over a whole [S, ...] tensor would
        # round by the stack's size, and a member's clipping must not depend on its stack.
        sq = torch.zeros(S, device=self.lr.device)
        for g in grads:
            sq += torch.stack([torch.linalg.vector_norm(m) for m in g.unbind(0)]).float() ** 2
        bad = ~torch.isfinite(sq)
        if loss is not None:
            bad |= ~torch.isfinite(loss.detach().to(bad.device))
        newly = bad & ~stack.frozen
        stack.frozen |= bad
        active = ~stack.frozen

        norm = sq.sqrt()
        clip = torch.where(
            self.max_grad_norm > 0,
            (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0),
            torch.ones_like(norm),
        )
        self.steps += active.long()
        if _fused_adam_runs_on(self.params[0]):
            try:
                self._fused_step(grads, clip, active)
            except TypeError:
                # torch._fused_adam_ is private: a torch whose signature differs refuses the
                # call before touching any tensor, so the plain update is still exact.
                _FUSED_UNAVAILABLE.add(torch.__version__)
                self._step(grads, clip, active)
        else:
            self._step(grads, clip, active)
        stack.normalize_decoder()
        return newly

    def _fused_step(self, grads: list[Tensor], clip: Tensor, active: Tensor) -> None:
        """torch's fused Adam kernel (one pass per tensor), called once per member so that each
        gets its own learning rate and clipping factor (`grad_scale` divides the gradient)."""
        b1, b2 = self.betas
        lrs, steps, live = self.lr.tolist(), self.steps.tolist(), active.tolist()
        unscale = (1.0 / clip).float()
        device = self.params[0].device
        # W_enc's member is a transposed view ([d, F] of [F, d] storage), and so are its
        # gradient and moments (same strides); the kernel would copy a non-contiguous tensor
        # first (5.6 ms a step at d 768, 8x), so each group goes in its storage order.
        flip = [not p[0].is_contiguous() and p[0].t().is_contiguous() for p in self.params]
        for s in range(self.stack.S):
            if not live[s]:
                continue  # a frozen member keeps its weights and its Adam state
            for scale, idx in self._groups[s]:
                pick = [flip[i] for i in idx]
                torch._fused_adam_(
                    _members([self.params[i] for i in idx], s, pick),
                    _members([grads[i] for i in idx], s, pick),
                    _members([self.exp_avg[i] for i in idx], s, pick),
                    _members([self.exp_avg_sq[i] for i in idx], s, pick),
                    [],
                    [torch.tensor(float(steps[s]), device=device)] * len(idx),
                    lr=lrs[s] * scale,
                    beta1=b1,
                    beta2=b2,
                    weight_decay=0.0,
                    eps=self.eps,
                    amsgrad=False,
                    maximize=False,
                    grad_scale=unscale[s],
                    found_inf=None,
                )

    def _step(self, grads: list[Tensor], clip: Tensor, active: Tensor) -> None:
        """The same update in plain tensor operations, for devices without the fused kernel."""
        S = self.stack.S
        b1, b2 = self.betas
        steps = self.steps.clamp_min(1).double()  # 1 - 0.999**t loses digits in float32
        bias1 = 1 - b1**steps
        bias2_sqrt = (1 - b2**steps).sqrt()
        step_size = torch.where(active, self.lr.double() / bias1, 0.0)
        any_frozen = bool(self.stack.frozen.any())
        for p, g, m, v, scale in zip(
            self.params, grads, self.exp_avg, self.exp_avg_sq, self._scales, strict=True
        ):
            shape = (S,) + (1,) * (p.ndim - 1)
            size = step_size if scale is None else step_size * scale
            g = g * clip.view(shape).to(g.dtype)
            if any_frozen:
                keep = active.view(shape)
                g = torch.where(keep, g, 0.0)
                m.copy_(torch.where(keep, m * b1 + g * (1 - b1), m))
                v.copy_(torch.where(keep, v * b2 + g * g * (1 - b2), v))
            else:
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bias2_sqrt.view(shape).to(v.dtype)).add_(self.eps)
            p.addcdiv_(m * size.view(shape).to(p.dtype), denom, value=-1.0)

    def state_dict(self) -> dict[str, typing.Any]:
        return {
            "lr": self.lr.clone(),
            "max_grad_norm": self.max_grad_norm.clone(),
            "steps": self.steps.clone(),
            "exp_avg": [m.clone() for m in self.exp_avg],
            "exp_avg_sq": [v.clone() for v in self.exp_avg_sq],
        }

    def load_state_dict(self, state: dict[str, typing.Any]) -> None:
        self.lr.copy_(state["lr"])
        self.max_grad_norm.copy_(state["max_grad_norm"])
        self.steps.copy_(state["steps"])
        for dst, src in zip(
            self.exp_avg + self.exp_avg_sq,
            list(state["exp_avg"]) + list(state["exp_avg_sq"]),
            strict=True,
        ):
            dst.copy_(src)
