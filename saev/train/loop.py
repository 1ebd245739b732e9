"""One pass over the shards: every batch is read once and fed to each stacked group of the pass.

Per step and per group: the schedule gives each member its lr and sparsity warmup, the stack
computes every member's losses, and `saev.nn.StackAdam` steps all members at once (clipping
each member's gradient and freezing a member whose loss or gradient is not finite, while the
others go on). Checkpoints of every live member and a resume state (saev.train.state) are
written every `ckpt_every` tokens, and the loader restarts at exactly the same token, so a
resumed run equals an uninterrupted one.

With several ranks (saev.train.dist) each trains its share of the pass's members
(saev.train.partition) on the same batches, or, with --data-parallel, all members on its slice
of every batch; either way a rank writes only what it owns, and the ranks meet at checkpoints.
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
from saev.nn.checkpoint import CONFIG_NAME
from saev.shards import Shards
from saev.shards.shuffled import ShuffledLoader, split_images
from saev.train import dist, state, sweep
from saev.train.config import HPARAM_FIELDS
from saev.train.dist import Ranks, Read, data_parallel, sync_buffers
from saev.train.log import MemberLog
from saev.train.schedules import default_lr, lr_at, lr_warmup_tokens, warmup_frac

logger = logging.getLogger("saev.train")


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


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a member trains with where its config leaves a value to saev's defaults."""

    lr: float
    """Peak learning rate: `lr` as given, or the width-scaled family default."""
    lr_warmup: int
    """Learning-rate warmup in tokens: `lr_warmup` as given, or the default for `n_train`."""
    hparams: dict[str, typing.Any]
    """The saev.nn member dict: the family's defaults, overridden by what is set."""


def resolve(m: sweep.Member, d_sae: int, kept: dict[str, typing.Any] | None = None) -> Resolved:
    """Member `m`'s defaults as this saev version has them, with `kept` (`started_with`) on top."""
    c = m.cfg
    now = {
        "lr": c.lr if c.lr is not None else default_lr(d_sae, family=c.sae.family),
        "lr_warmup": lr_warmup_tokens(c.lr_warmup, c.n_train),
        **sweep.hparams(c),
    }
    used = {**now, **(kept or {})}
    hp = {k: used[k] for k in now if k not in ("lr", "lr_warmup")}
    return Resolved(used["lr"], used["lr_warmup"], saev.nn.check_hparams(c.sae.family, hp))


def started_with(run_dir: pathlib.Path, m: sweep.Member) -> dict[str, typing.Any]:
    """What a member's checkpoint recorded for the values its config leaves to the defaults:
    `lr`, `lr_warmup` and each hyperparameter not set, as far as recorded (none if unreadable).

    A resumed run keeps them: the defaults are measured and change between saev versions, and
    a run resumed under newer ones would switch learning rate or sparsity coefficient halfway
    (and stop being equal to an uninterrupted run)."""
    try:
        doc = json.loads((run_dir / "members" / m.name / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    c, kept = m.cfg, {}
    lr, warmup = doc.get("lr"), doc.get("lr_warmup")
    if c.lr is None and isinstance(lr, int | float) and math.isfinite(lr) and lr > 0:
        kept["lr"] = float(lr)
    if c.lr_warmup is None and isinstance(warmup, int) and not isinstance(warmup, bool):
        kept["lr_warmup"] = warmup
    hp = doc.get("hparams")
    if isinstance(hp, dict) and doc.get("family") == c.sae.family:
        for key in set(HPARAM_FIELDS) & set(saev.nn.HPARAMS[c.sae.family]) & set(hp):
            if getattr(c.sae, key) is None:
                kept[key] = hp[key]
    return kept


def ckpt_extra(
    p: sweep.Pass, data: PassData, m: sweep.Member, run_dir: pathlib.Path, r: Resolved
) -> dict:
    c = m.cfg.data
    return {
        "layer": data.layer,
        "tokens": c.tokens,
        "shards": data.shards.md.to_json(),
        "shard_root": str(pathlib.Path(c.shard_root).resolve()),  # usable from any directory
        "split": {"eval_frac": c.eval_frac, "seed": c.split_seed, "n_eval_imgs": data.n_eval_imgs},
        "train": sweep.to_dict(m.cfg),
        "lr": r.lr,
        "lr_warmup": r.lr_warmup,
        "member": m.name,
        "run": run_dir.name,
    }


@dataclasses.dataclass(frozen=True)
class Role:
    """What this process does in a pass (saev.train.dist): one process is Role(mine=p)."""

    mine: sweep.Pass | None
    """The members this rank trains: its share of the pass (None: none), or all of them."""
    ranks: Ranks = Ranks()
    data_parallel: bool = False
    """Every rank trains all of `mine` on its slice of each batch (DDP); rank 0 writes."""
    read: Read = "each"
    """How batches reach the ranks (saev.train.dist)."""

    @property
    def writes(self) -> bool:
        """Whether this rank writes the checkpoints, logs and resume state of `mine`."""
        return self.mine is not None and (not self.data_parallel or self.ranks.is_main)


def train_pass(
    p: sweep.Pass,
    data: PassData,
    run_dir: pathlib.Path,
    run_cfg,
    role: Role,
) -> dict[str, dict]:
    """Train this rank's members of pass `p`; returns every member's status {name: {...}}."""
    return PassTrainer(p, data, run_dir, run_cfg, role).fit()


class PassTrainer:
    """This rank's members of one pass, their optimisers and where the pass stands.

    `fit` is the whole story: build (in `__init__`), resume or initialise from data, then per
    batch a training step, its log lines and, when due, a checkpoint; a final checkpoint at
    the end. Each step has its own method below, in that order. With several ranks, all of
    them step through the same batches and meet at the same checkpoints, even a rank that
    trains none of the pass's members.
    """

    def __init__(self, p: sweep.Pass, data: PassData, run_dir: pathlib.Path, run_cfg, role: Role):
        self.p, self.data, self.run_dir = p, data, run_dir
        self.run_cfg, self.role, self.ranks = run_cfg, role, role.ranks
        self.device = role.ranks.device
        self.groups = role.mine.groups if role.mine is not None else []
        self.B = p.cfg.data.batch_size
        self.n_steps = math.ceil(p.cfg.n_train / self.B)
        every = run_cfg.ckpt_every
        self.ckpt_steps = math.ceil(every / self.B) if every > 0 else self.n_steps
        # The pass's last committed checkpoint (None: a fresh start), read once for both the
        # defaults its members keep and `resume`.
        self.committed = state.committed(run_dir, p.index)
        kept: dict[str, dict] = {}
        if self.committed is not None:
            kept = {m.name: started_with(run_dir, m) for g in self.groups for m in g.members}
        self.stacks, self.opts, self.resolved = build(
            self.groups, data.shards.md.d_vit, self.device, kept
        )
        if kept and self.ranks.is_main:
            report_kept(self.groups, self.resolved, data.shards.md.d_vit)
        self.modules: list[torch.nn.Module] = list(self.stacks)
        self.status: dict[str, dict] = {
            m.name: {"status": "ok", "ckpt_step": None} for g in self.groups for m in g.members
        }
        self.pass_status: dict[str, dict] = {}
        """Every member's status as of the last checkpoint (all ranks')."""
        self.step = 0
        self.logs: list[list[MemberLog]] = []
        # Throughput since training (re)started, and the best live member's batch FVU (and its
        # L0) over the groups of the latest logged step, for the progress bar.
        self.t0, self.steps_timed = time.perf_counter(), 0
        self.best: tuple[float, float] | None = None

    def fit(self) -> dict[str, dict]:
        if not self.resume():
            self.init_from_data()
        if self.step >= self.n_steps:
            return self.pass_status
        self.start()
        bar = self.progress_bar()
        batches = dist.batches(
            self.data.loader,
            self.step * self.B,
            self.ranks,
            self.role.read,
            needed=bool(self.groups),
        )
        interrupt = Interrupt()
        try:
            for x in batches:
                log_now = self.train_step(x)
                bar.update(self.B)
                if log_now:
                    if self.best is not None:
                        bar.set_postfix(best_fvu=f"{self.best[0]:.3f}", l0=f"{self.best[1]:.1f}")
                    self.best = None
                if self.step >= self.n_steps:
                    break
                self.checkpoint_if_needed(interrupt, log_now)
        finally:
            interrupt.restore()
            batches.close()
            bar.close()
            for gl in self.logs:
                for log in gl:
                    log.close()
        self.checkpoint(final=True)
        return self.pass_status

    def start(self) -> None:
        """Training mode, DDP for --data-parallel, this rank's metrics logs, the clock."""
        for s in self.stacks:
            s.train()
        if self.role.data_parallel and self.ranks.distributed:
            self.modules = [data_parallel(s, self.ranks) for s in self.stacks]
        if self.role.writes:
            wandb = self.run_cfg.wandb
            self.logs = [
                [MemberLog(self.run_dir, m, wandb, resume_step=self.step) for m in g.members]
                for g in self.groups
            ]
        self.t0 = time.perf_counter()

    def progress_bar(self) -> tqdm:
        """Tokens of the pass, on rank 0 only."""
        return tqdm(
            total=self.n_steps * self.B,
            initial=self.step * self.B,
            unit="tok",
            unit_scale=True,
            desc=f"pass {self.p.index}",
            disable=True if not self.ranks.is_main else None,
        )

    # ---- resume or initialise ------------------------------------------------------------

    def resume(self) -> bool:
        """Load this rank's members from the pass's last committed checkpoint, if any."""
        doc = self.committed
        if doc is None:
            return False
        self.step = int(doc["step"])
        self.pass_status = doc["status"]
        self.status = {name: self.pass_status[name] for name in self.status}
        state.load_members(
            self.run_dir,
            self.p.index,
            self.step,
            [
                ([m.name for m in g.members], s, o)
                for g, s, o in zip(self.groups, self.stacks, self.opts, strict=True)
            ],
            self.device,
        )
        if self.ranks.is_main:
            print(
                f"pass {self.p.index}: resuming at step {self.step:,} of {self.n_steps:,} "
                f"({self.step * self.B:,} tokens)"
            )
        return True

    def init_from_data(self) -> None:
        """Input scale, b_dec and encoder gain of every stack, from one seeded sample."""
        if not self.groups and self.role.read == "each":
            return
        cfg = self.p.cfg
        sample = dist.init_sample(
            self.data.loader, cfg.n_init_sample, cfg.data.seed, self.ranks, self.role.read
        )
        for s in self.stacks:
            s.init_from_data(sample)

    # ---- one step ------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor | None) -> bool:
        """Step every group on batch `x`; returns whether this step was logged."""
        seen = self.step * self.B
        log_now = (self.step + 1) % self.run_cfg.log_every == 0 or self.step + 1 == self.n_steps
        if self.role.data_parallel and x is not None:
            x = x.chunk(self.ranks.world)[self.ranks.rank]  # this rank's slice
        for gi, g in enumerate(self.groups):
            s, opt = self.stacks[gi], self.opts[gi]
            lrs = [member_lr(m, r, seen) for m, r in zip(g.members, self.resolved[gi], strict=True)]
            warm = [warmup_frac(seen, m.cfg.sae.sparsity_warmup) for m in g.members]
            opt.set_lr(lrs)
            with autocast(self.device, g.cfg.dtype):
                out = self.modules[gi](x, warmup=torch.tensor(warm, device=self.device))
            opt.zero_grad()
            out.losses["total"].sum().backward()
            loss = out.losses["total"].detach()
            if self.role.data_parallel:
                # Gradients were averaged by DDP; the loss is too, so every rank freezes alike.
                loss = self.ranks.all_reduce_(loss.clone()).div_(self.ranks.world)
            newly = opt.step(loss)
            if self.role.data_parallel:
                sync_buffers(s, self.ranks, x.shape[0])
            if bool(newly.any()):
                self.stop_members(g, newly, loss)
            if log_now and self.role.writes:
                self.log_step(gi, x, out, lrs, warm)
        self.step += 1
        self.steps_timed += 1
        return log_now

    def stop_members(self, g: sweep.Group, newly: torch.Tensor, loss: torch.Tensor) -> None:
        """Record and announce members frozen by this step (non-finite loss or gradient)."""
        for i in newly.nonzero().flatten().tolist():
            st = self.status[g.members[i].name]
            st.update(status="stopped", stopped_step=self.step + 1)
            st["reason"] = f"non-finite loss ({float(loss[i])}) or gradient"
            kept = (
                f"its last good checkpoint (step {st['ckpt_step']:,}) is kept"
                if st["ckpt_step"]
                else "it has no checkpoint yet"
            )
            msg = (
                f"member {g.members[i].name}: {st['reason']} at step {self.step + 1:,}; "
                f"stopped it, {kept}; the others go on."
            )
            if self.role.writes:
                logger.warning(msg)
                tqdm.write(f"warning: {msg}")

    def log_step(self, gi: int, x: torch.Tensor, out, lrs: list[float], warm: list[float]) -> None:
        """One metrics.jsonl line per member of group `gi`; tracks the best live batch FVU.

        Batch metrics are of this rank's batch (with --data-parallel, rank 0's slice)."""
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

    def checkpoint_if_needed(self, interrupt: "Interrupt", log_now: bool) -> None:
        """Periodic checkpoint; after a Ctrl-C, save the state now and stop.

        Ranks must checkpoint at the same step, so they agree on a Ctrl-C first; with several
        ranks only at logged steps and periodic checkpoints (a collective every step would
        stall a GPU), so they stop within `log_every` steps."""
        due = self.step % self.ckpt_steps == 0
        if not self.ranks.distributed:
            asked = interrupt.asked
        else:
            asked = self.ranks.any(interrupt.asked) if due or log_now else False
        if due or asked:
            self.checkpoint(final=False)
        if asked:
            if self.ranks.is_main:
                tqdm.write(
                    f"interrupted: state saved at step {self.step:,}; continue with "
                    f"`python -m saev train --resume {self.run_dir}`."
                )
            raise KeyboardInterrupt

    def checkpoint(self, final: bool) -> None:
        """Member checkpoints and resume state of this rank, then the commit of the step."""
        if self.role.writes:
            self.save_members(final)
            self.save_state()
        statuses = self.ranks.all_gather(self.status if self.role.writes else {})
        self.pass_status = {k: v for st in statuses for k, v in st.items()}
        if self.ranks.is_main:
            state.commit(self.run_dir, self.p.index, self.step, self.pass_status)

    def save_members(self, final: bool) -> None:
        """Each live member's checkpoint directory; flush the metrics written so far."""
        for gi, (g, s) in enumerate(zip(self.groups, self.stacks, strict=True)):
            frozen = s.frozen.tolist()
            for i, m in enumerate(g.members):
                if frozen[i]:
                    continue  # a stopped member keeps its last good checkpoint
                extra = ckpt_extra(self.p, self.data, m, self.run_dir, self.resolved[gi][i])
                extra.update(step=self.step, tokens_seen=self.step * self.B, final=final)
                saev.nn.save(s, i, self.run_dir / "members" / m.name, extra)
                self.status[m.name]["ckpt_step"] = self.step
            for log in self.logs[gi] if self.logs else []:
                log.flush()

    def save_state(self) -> None:
        """Each member's slice of its stack and optimiser state, for `--resume`."""
        members = [
            (m.name, s, o, i)
            for g, s, o in zip(self.groups, self.stacks, self.opts, strict=True)
            for i, m in enumerate(g.members)
        ]
        state.write_members(self.run_dir, self.p.index, self.step, members)


def build(
    groups: list[sweep.Group],
    d_vit: int,
    device: torch.device,
    kept: dict[str, dict[str, typing.Any]] | None = None,
) -> tuple[list[saev.nn.Stack], list[saev.nn.StackAdam], list[list[Resolved]]]:
    """One stack and one optimiser per group, and each member's resolved defaults (with what
    `kept` holds for it by member name: a resumed run's `started_with`)."""
    kept = kept or {}
    resolved = [
        [resolve(m, g.cfg.sae.exp_factor * d_vit, kept.get(m.name)) for m in g.members]
        for g in groups
    ]
    stacks = [
        saev.nn.make_stack(
            g.cfg.sae.family,
            d_vit=d_vit,
            d_sae=g.cfg.sae.exp_factor * d_vit,
            members=[r.hparams for r in rs],
            device=device,
        )
        for g, rs in zip(groups, resolved, strict=True)
    ]
    opts = [
        saev.nn.StackAdam(
            s, lr=[r.lr for r in rs], max_grad_norm=[m.cfg.grad_clip for m in g.members]
        )
        for g, s, rs in zip(groups, stacks, resolved, strict=True)
    ]
    return stacks, opts, resolved


def report_kept(groups: list[sweep.Group], resolved: list[list[Resolved]], d_vit: int) -> None:
    """One line per resumed member whose kept values differ from this saev version's defaults."""
    for g, rs in zip(groups, resolved, strict=True):
        for m, r in zip(g.members, rs, strict=True):
            now = resolve(m, g.cfg.sae.exp_factor * d_vit)
            pairs = [("lr", r.lr, now.lr), ("lr_warmup", r.lr_warmup, now.lr_warmup)]
            pairs += [(k, v, now.hparams[k]) for k, v in sorted(r.hparams.items())]
            diff = [f"{k} {_show(v)} (now {_show(w)})" for k, v, w in pairs if v != w]
            if diff:
                print(
                    f"member {m.name}: keeping the defaults it started with, where this saev "
                    f"version's differ: {', '.join(diff)}"
                )


def _show(v: typing.Any) -> str:
    return f"{v:.4g}" if isinstance(v, int | float) and not isinstance(v, bool) else repr(v)


def member_lr(m: sweep.Member, r: Resolved, seen: int) -> float:
    """Member `m`'s learning rate after `seen` training tokens (docs/train.md)."""
    c = m.cfg
    return lr_at(
        seen,
        lr=r.lr,
        warmup=r.lr_warmup,
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
