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
    cfg = p.cfg
    B = cfg.data.batch_size
    d_vit = data.shards.md.d_vit
    n_steps = math.ceil(cfg.n_train / B)
    ckpt_steps = math.ceil(run_cfg.ckpt_every / B) if run_cfg.ckpt_every > 0 else n_steps
    state_path = run_dir / "state" / f"pass{p.index}.pt"

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
    status: dict[str, dict] = {m.name: {"status": "ok", "ckpt_step": None} for m in p.members}
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state.get("version") != STATE_VERSION:
            from saev.errors import UserError

            raise UserError(f"{state_path}: resume state of another saev version; start a new run.")
        step = int(state["step"])
        for s, o, ss, os_ in zip(stacks, opts, state["stacks"], state["opts"], strict=True):
            s.load_state_dict(ss)
            o.load_state_dict(os_)
        torch.set_rng_state(state["rng"].cpu())
        status = json.loads(state["status"])
        print(f"pass {p.index}: resuming at step {step:,} of {n_steps:,} ({step * B:,} tokens)")
    else:
        sample = data.loader.sample(cfg.n_init_sample, seed=cfg.data.seed).to(device)
        for s in stacks:
            s.init_from_data(sample)
        del sample
    if step >= n_steps:
        return status

    logs = [
        [MemberLog(run_dir, m, run_cfg.wandb, resume_step=step) for m in g.members]
        for g in p.groups
    ]

    def checkpoint(final: bool) -> None:
        for g, s, gl in zip(p.groups, stacks, logs, strict=True):
            frozen = s.frozen.tolist()
            for i, m in enumerate(g.members):
                if frozen[i]:
                    continue  # a stopped member keeps its last good checkpoint
                extra = ckpt_extra(p, data, m, run_dir)
                extra.update(step=step, tokens_seen=step * B, final=final)
                saev.nn.save(s, i, run_dir / "members" / m.name, extra)
                status[m.name]["ckpt_step"] = step
            for log in gl:
                log.flush()
        state = {
            "version": STATE_VERSION,
            "step": step,
            "stacks": [s.state_dict() for s in stacks],
            "opts": [o.state_dict() for o in opts],
            "rng": torch.get_rng_state(),
            "status": json.dumps(status),
        }
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_name(state_path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(state_path)

    for s in stacks:
        s.train()
    bar = tqdm(
        total=n_steps * B, initial=step * B, unit="tok", unit_scale=True, desc=f"pass {p.index}"
    )
    t0, steps_timed = time.perf_counter(), 0
    best: tuple[float, float] | None = None
    batches = data.loader.batches(start=step * B)
    interrupt = Interrupt()
    try:
        for x in batches:
            x = x.to(device, non_blocking=True)
            seen = step * B
            log_now = (step + 1) % run_cfg.log_every == 0 or step + 1 == n_steps
            for g, s, opt, gl, peak in zip(p.groups, stacks, opts, logs, peaks, strict=True):
                ms = g.members
                lrs = [
                    lr_at(
                        seen,
                        lr=lr,
                        warmup=lr_warmup_tokens(m.cfg.lr_warmup, m.cfg.n_train),
                        n_train=m.cfg.n_train,
                        decay=m.cfg.lr_decay,
                        decay_frac=m.cfg.lr_decay_frac,
                        min_frac=m.cfg.min_lr_frac,
                    )
                    for m, lr in zip(ms, peak, strict=True)
                ]
                warm = [warmup_frac(seen, m.cfg.sae.sparsity_warmup) for m in ms]
                opt.set_lr(lrs)
                with autocast(device, g.cfg.dtype):
                    out = s(x, warmup=torch.tensor(warm, device=device))
                opt.zero_grad()
                out.losses["total"].sum().backward()
                newly = opt.step(out.losses["total"])
                if bool(newly.any()):
                    for i in newly.nonzero().flatten().tolist():
                        st = status[ms[i].name]
                        st.update(status="stopped", stopped_step=step + 1)
                        st["reason"] = (
                            f"non-finite loss ({float(out.losses['total'][i].detach())}) or gradient"
                        )
                        kept = (
                            f"its last good checkpoint (step {st['ckpt_step']:,}) is kept"
                            if st["ckpt_step"]
                            else "it has no checkpoint yet"
                        )
                        msg = f"member {ms[i].name}: {st['reason']} at step {step + 1:,}; stopped it, {kept}; the others go on."
                        logger.warning(msg)
                        tqdm.write(f"warning: {msg}")
                if log_now:
                    rows = step_metrics(x, out, s)
                    elapsed = time.perf_counter() - t0
                    tps = (steps_timed + 1) * B / max(elapsed, 1e-9)
                    frozen = s.frozen.tolist()
                    for i, log in enumerate(gl):
                        row = {
                            "step": step + 1,
                            "tokens": (step + 1) * B,
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
                            and (best is None or row["fvu"] < best[0])
                        ):
                            best = (row["fvu"], row["l0"])
            step += 1
            steps_timed += 1
            bar.update(B)
            if log_now:
                if best is not None:
                    bar.set_postfix(best_fvu=f"{best[0]:.3f}", l0=f"{best[1]:.1f}")
                best = None
            if step >= n_steps:
                break
            if step % ckpt_steps == 0 or interrupt.asked:
                checkpoint(final=False)
            if interrupt.asked:
                tqdm.write(
                    f"interrupted: state saved at step {step:,}; continue with "
                    f"`python -m saev train --resume {run_dir}`."
                )
                raise KeyboardInterrupt
    finally:
        interrupt.restore()
        batches.close()
        bar.close()
        for gl in logs:
            for log in gl:
                log.close()
    checkpoint(final=True)
    return status


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
