"""One pass over the shards: every batch is read once and fed to each stacked group of the pass.

Per step and per group: the schedule gives each member its lr and sparsity warmup, the stack
computes every member's losses, and `saev.nn.StackAdam` steps all members at once (clipping
each member's gradient and freezing a member whose loss or gradient is not finite, while the
others go on). Checkpoints of every live member and a resume state are written every
`ckpt_every` tokens; the state holds the step, the stacks, the optimisers and the RNG, and
the loader restarts at exactly the same token, so a resumed run equals an uninterrupted one.
"""

import dataclasses
import json
import logging
import math
import pathlib
import signal
import threading
import time
import typing

import torch
from tqdm.auto import tqdm

import saev.nn
from saev.errors import UserError
from saev.shards import Shards
from saev.shards.shuffled import ShuffledLoader, split_images
from saev.train import sweep
from saev.train.log import MemberLog
from saev.train.schedules import default_lr, lr_at, lr_warmup_tokens, warmup_frac

logger = logging.getLogger("saev.train")

STATE_VERSION = 1


@dataclasses.dataclass
class PassData:
    """The shards, split and loader of one pass (opened before any training, to fail fast)."""

    shards: Shards
    loader: ShuffledLoader
    layer: int
    """Resolved block index."""
    n_eval_imgs: int


def open_pass(p: sweep.Pass) -> PassData:
    c = p.cfg.data
    shards = Shards(c.shard_root)
    train_idx, eval_idx = split_images(shards.n_imgs, c.eval_frac, c.split_seed)
    loader = ShuffledLoader(
        shards,
        layer=c.layer,
        tokens=c.tokens,
        batch_size=c.batch_size,
        imgs=train_idx,
        seed=c.seed,
        n_threads=c.n_threads,
        chunk_mb=c.chunk_mb,
        buffer_mb=c.buffer_mb,
    )
    layer = shards.md.layers[shards.layer_pos(c.layer)]
    return PassData(shards, loader, layer, len(eval_idx))


def peak_lr(m: sweep.Member, d_sae: int) -> float:
    """The member's peak learning rate: `lr` as given, or the width-scaled default."""
    return m.cfg.lr if m.cfg.lr is not None else default_lr(d_sae)


def ckpt_extra(p: sweep.Pass, data: PassData, m: sweep.Member, run_dir: pathlib.Path) -> dict:
    c = m.cfg.data
    d_sae = m.cfg.sae.exp_factor * data.shards.md.d_vit
    return {
        "layer": data.layer,
        "tokens": c.tokens,
        "shards": data.shards.md.to_json(),
        "shard_root": str(pathlib.Path(c.shard_root).resolve()),  # usable from any directory
        "split": {"eval_frac": c.eval_frac, "seed": c.split_seed, "n_eval_imgs": data.n_eval_imgs},
        "train": sweep.to_dict(m.cfg),
        "lr": peak_lr(m, d_sae),
        "member": m.name,
        "run": run_dir.name,
    }


def train_pass(
    p: sweep.Pass,
    data: PassData,
    run_dir: pathlib.Path,
    device: torch.device,
    run_cfg,
) -> dict[str, dict]:
    """Train every member of pass `p`; returns per-member status {name: {...}}."""
    return PassTrainer(p, data, run_dir, device, run_cfg).fit()


class PassTrainer:
    """The members of one pass, their optimisers and where the pass stands.

    `fit` is the whole story: build (in `__init__`), resume or initialise from data, then per
    batch a training step, its log lines and, when due, a checkpoint; a final checkpoint at
    the end. Each step has its own method below, in that order.
    """

    def __init__(
        self,
        p: sweep.Pass,
        data: PassData,
        run_dir: pathlib.Path,
        device: torch.device,
        run_cfg,
    ):
        self.p, self.data, self.run_dir = p, data, run_dir
        self.device, self.run_cfg = device, run_cfg
        self.B = p.cfg.data.batch_size
        self.n_steps = math.ceil(p.cfg.n_train / self.B)
        every = run_cfg.ckpt_every
        self.ckpt_steps = math.ceil(every / self.B) if every > 0 else self.n_steps
        self.state_path = run_dir / "state" / f"pass{p.index}.pt"
        self.stacks, self.opts, self.peaks = build(p, data.shards.md.d_vit, device)
        self.status: dict[str, dict] = {
            m.name: {"status": "ok", "ckpt_step": None} for m in p.members
        }
        self.step = 0
        self.logs: list[list[MemberLog]] = []
        # Throughput since this process started, and the best live member's batch FVU (and its
        # L0) over the groups of the latest logged step, for the progress bar.
        self.t0, self.steps_timed = time.perf_counter(), 0
        self.best: tuple[float, float] | None = None

    def fit(self) -> dict[str, dict]:
        if not self.resume():
            self.init_from_data()
        if self.step >= self.n_steps:
            return self.status
        self.logs = [
            [
                MemberLog(self.run_dir, m, self.run_cfg.wandb, resume_step=self.step)
                for m in g.members
            ]
            for g in self.p.groups
        ]
        for s in self.stacks:
            s.train()
        bar = tqdm(
            total=self.n_steps * self.B,
            initial=self.step * self.B,
            unit="tok",
            unit_scale=True,
            desc=f"pass {self.p.index}",
        )
        batches = self.data.loader.batches(start=self.step * self.B)
        interrupt = Interrupt()
        try:
            for x in batches:
                log_now = self.train_step(x.to(self.device, non_blocking=True))
                bar.update(self.B)
                if log_now:
                    if self.best is not None:
                        bar.set_postfix(best_fvu=f"{self.best[0]:.3f}", l0=f"{self.best[1]:.1f}")
                    self.best = None
                if self.step >= self.n_steps:
                    break
                self.checkpoint_if_needed(interrupt)
        finally:
            interrupt.restore()
            batches.close()
            bar.close()
            for gl in self.logs:
                for log in gl:
                    log.close()
        self.checkpoint(final=True)
        return self.status

    # ---- resume or initialise ------------------------------------------------------------

    def resume(self) -> bool:
        """Load the saved state of this pass, if there is one."""
        if not self.state_path.is_file():
            return False
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        if state.get("version") != STATE_VERSION:
            raise UserError(
                f"{self.state_path}: resume state of another saev version; start a new run."
            )
        self.step = int(state["step"])
        for s, o, ss, os_ in zip(
            self.stacks, self.opts, state["stacks"], state["opts"], strict=True
        ):
            s.load_state_dict(ss)
            o.load_state_dict(os_)
        torch.set_rng_state(state["rng"].cpu())
        self.status = json.loads(state["status"])
        print(
            f"pass {self.p.index}: resuming at step {self.step:,} of {self.n_steps:,} "
            f"({self.step * self.B:,} tokens)"
        )
        return True

    def init_from_data(self) -> None:
        """Input scale, b_dec and encoder gain of every stack, from one seeded sample."""
        cfg = self.p.cfg
        sample = self.data.loader.sample(cfg.n_init_sample, seed=cfg.data.seed).to(self.device)
        for s in self.stacks:
            s.init_from_data(sample)

    # ---- one step ------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor) -> bool:
        """Step every group on batch `x`; returns whether this step was logged."""
        seen = self.step * self.B
        log_now = (self.step + 1) % self.run_cfg.log_every == 0 or self.step + 1 == self.n_steps
        for gi, (g, s, opt) in enumerate(zip(self.p.groups, self.stacks, self.opts, strict=True)):
            lrs = [
                member_lr(m, peak, seen) for m, peak in zip(g.members, self.peaks[gi], strict=True)
            ]
            warm = [warmup_frac(seen, m.cfg.sae.sparsity_warmup) for m in g.members]
            opt.set_lr(lrs)
            with autocast(self.device, g.cfg.dtype):
                out = s(x, warmup=torch.tensor(warm, device=self.device))
            opt.zero_grad()
            out.losses["total"].sum().backward()
            newly = opt.step(out.losses["total"])
            if bool(newly.any()):
                self.stop_members(g, newly, out)
            if log_now:
                self.log_step(gi, x, out, lrs, warm)
        self.step += 1
        self.steps_timed += 1
        return log_now

    def stop_members(self, g: sweep.Group, newly: torch.Tensor, out) -> None:
        """Record and announce members frozen by this step (non-finite loss or gradient)."""
        for i in newly.nonzero().flatten().tolist():
            st = self.status[g.members[i].name]
            st.update(status="stopped", stopped_step=self.step + 1)
            st["reason"] = f"non-finite loss ({float(out.losses['total'][i].detach())}) or gradient"
            kept = (
                f"its last good checkpoint (step {st['ckpt_step']:,}) is kept"
                if st["ckpt_step"]
                else "it has no checkpoint yet"
            )
            msg = (
                f"member {g.members[i].name}: {st['reason']} at step {self.step + 1:,}; "
                f"stopped it, {kept}; the others go on."
            )
            logger.warning(msg)
            tqdm.write(f"warning: {msg}")

    def log_step(self, gi: int, x: torch.Tensor, out, lrs: list[float], warm: list[float]) -> None:
        """One metrics.jsonl line per member of group `gi`; tracks the best live batch FVU."""
        s = self.stacks[gi]
        rows = step_metrics(x, out, s)
        elapsed = time.perf_counter() - self.t0
        tps = (self.steps_timed + 1) * self.B / max(elapsed, 1e-9)
        frozen = s.frozen.tolist()
        for i, log in enumerate(self.logs[gi]):
            row = {
                "step": self.step + 1,
                "tokens": (self.step + 1) * self.B,
                "lr": lrs[i],
                "sparsity_warmup": warm[i],
                **{k: v[i] for k, v in rows.items()},
                "tokens_per_s": tps,
                "stopped": frozen[i],
            }
            log.write(row)
            if (
                not frozen[i]
                and math.isfinite(row["fvu"])
                and (self.best is None or row["fvu"] < self.best[0])
            ):
                self.best = (row["fvu"], row["l0"])

    # ---- checkpoints ---------------------------------------------------------------------

    def checkpoint_if_needed(self, interrupt: "Interrupt") -> None:
        """Periodic checkpoint; after a Ctrl-C, save the state now and stop."""
        if self.step % self.ckpt_steps == 0 or interrupt.asked:
            self.checkpoint(final=False)
        if interrupt.asked:
            tqdm.write(
                f"interrupted: state saved at step {self.step:,}; continue with "
                f"`python -m saev train --resume {self.run_dir}`."
            )
            raise KeyboardInterrupt

    def checkpoint(self, final: bool) -> None:
        self.save_members(final)
        self.save_state()

    def save_members(self, final: bool) -> None:
        """Each live member's checkpoint directory; flush the metrics written so far."""
        for gi, (g, s) in enumerate(zip(self.p.groups, self.stacks, strict=True)):
            frozen = s.frozen.tolist()
            for i, m in enumerate(g.members):
                if frozen[i]:
                    continue  # a stopped member keeps its last good checkpoint
                extra = ckpt_extra(self.p, self.data, m, self.run_dir)
                extra.update(step=self.step, tokens_seen=self.step * self.B, final=final)
                saev.nn.save(s, i, self.run_dir / "members" / m.name, extra)
                self.status[m.name]["ckpt_step"] = self.step
            for log in self.logs[gi] if self.logs else []:
                log.flush()

    def save_state(self) -> None:
        """The resume state: step, stacks, optimisers, RNG and member status, atomically."""
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "stacks": [s.state_dict() for s in self.stacks],
            "opts": [o.state_dict() for o in self.opts],
            "rng": torch.get_rng_state(),
            "status": json.dumps(self.status),
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)


def build(
    p: sweep.Pass, d_vit: int, device: torch.device
) -> tuple[list[saev.nn.Stack], list[saev.nn.StackAdam], list[list[float]]]:
    """One stack and one optimiser per group of `p`, and each member's peak learning rate."""
    stacks = [
        saev.nn.make_stack(
            g.cfg.sae.family,
            d_vit=d_vit,
            d_sae=g.cfg.sae.exp_factor * d_vit,
            members=[sweep.hparams(m.cfg) for m in g.members],
            device=device,
        )
        for g in p.groups
    ]
    peaks = [
        [peak_lr(m, s.d_sae) for m in g.members] for g, s in zip(p.groups, stacks, strict=True)
    ]
    opts = [
        saev.nn.StackAdam(s, lr=lr, max_grad_norm=[m.cfg.grad_clip for m in g.members])
        for g, s, lr in zip(p.groups, stacks, peaks, strict=True)
    ]
    return stacks, opts, peaks


def member_lr(m: sweep.Member, peak: float, seen: int) -> float:
    """Member `m`'s learning rate after `seen` training tokens (docs/train.md)."""
    c = m.cfg
    return lr_at(
        seen,
        lr=peak,
        warmup=lr_warmup_tokens(c.lr_warmup, c.n_train),
        n_train=c.n_train,
        decay=c.lr_decay,
        decay_frac=c.lr_decay_frac,
        min_frac=c.min_lr_frac,
    )


def autocast(device: torch.device, dtype: str) -> torch.autocast:
    """Mixed precision for a group's forward pass: its matmuls in bfloat16, the rest float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


class Interrupt:
    """Turn Ctrl-C (SIGINT) into a flag the loop checks between steps.

    Stopping mid-step could leave one stack updated and another not; the loop instead finishes
    the step, saves the resume state, and then raises KeyboardInterrupt, so `--resume` goes on
    exactly as an uninterrupted run would. A second Ctrl-C stops at once.
    """

    def __init__(self):
        self.asked = False
        self.previous = None
        # Signal handlers can only be installed from the main thread, and a process started
        # with SIGINT ignored (nohup, some schedulers) keeps ignoring it.
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        ):
            self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        tqdm.write(
            "Ctrl-C: finishing this step and saving the resume state (Ctrl-C again to stop now)."
        )

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


@torch.no_grad()
def step_metrics(x: torch.Tensor, out, stack) -> dict[str, list]:
    """Per-member training-batch metrics: loss parts, L0, batch FVU, dead fraction."""
    err = (x[None] - out.x_hat.detach()).pow(2).sum(dim=(1, 2))
    var = (x - x.mean(dim=0)).pow(2).sum()
    rows: dict[str, typing.Any] = {
        f"loss/{k}": v.detach().float().tolist() for k, v in out.losses.items()
    }
    rows["l0"] = out.l0.float().tolist()
    rows["fvu"] = (err / var).float().tolist()
    rows["dead_frac"] = stack.dead_mask().float().mean(dim=1).tolist()
    return rows
