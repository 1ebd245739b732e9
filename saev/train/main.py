"""`python -m saev train`: train one SAE, or a whole sweep grid in one pass over the shards.

1. Expand the grid (flags, `--sweep` TOML) into members and group them into passes and stacks.
2. Open every pass's shards first, so a bad layer or shard directory fails before anything
   is printed or written; then create the run directory and print the plan.
3. Train pass by pass (`saev.train.loop`), checkpointing every member periodically. Under
   torchrun (or `--slurm`) each rank trains its share of the members (`saev.train.partition`),
   or with `--data-parallel` a slice of every batch (`saev.train.dist`).
4. Score every member on the eval split with `saev.evaluate` (the same code as
   `saev evaluate`; each rank its share), write `eval/`, `summary.json` and `summary.md`, and
   print the table.
"""

import dataclasses
import json
import math
import pathlib

import torch

from saev.errors import UserError
from saev.evaluate import DataConfig as EvalData
from saev.evaluate import evaluate_ckpts, write_outputs
from saev.helpers import atomic_write_json, atomic_write_text, keep_freed_memory, short_hash
from saev.train import dist, partition, slurm, sweep
from saev.train.config import LAUNCH_KEYS, Config, DataConfig, SaeConfig, WandbConfig
from saev.train.loop import PassData, Role, open_pass, train_pass

__all__ = ["Config", "DataConfig", "SaeConfig", "WandbConfig", "main", "train"]

RUN_FILE = "run.json"
SUMMARY_COLUMNS = ("name", "status", "l0_mean", "fvu", "mse", "cosine", "dead_frac", "dense_frac")


def main(cfg: Config) -> None:
    if cfg.slurm:
        submit(cfg)
        return
    train(cfg)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run that passed every check; nothing is written yet."""

    run_dir: pathlib.Path
    members: list[sweep.Member]
    saved: dict | None
    """run.json of the run being resumed."""
    passes: list[sweep.Pass]
    datas: list[PassData]

    @property
    def d_vits(self) -> dict[int, int]:
        return {p.index: d.shards.md.d_vit for p, d in zip(self.passes, self.datas, strict=True)}

    def shares(self, world: int) -> list[list[sweep.Pass | None]]:
        """Each pass's members split over `world` ranks (saev.train.partition)."""
        return [partition.split(p, self.d_vits[p.index], world) for p in self.passes]


def train(cfg: Config) -> pathlib.Path:
    """Train what `cfg` describes; returns the run directory."""
    keep_freed_memory()  # steps reuse their big blocks instead of faulting them in anew
    # Every rank checks the run before any writes it: the process group's rendezvous in
    # dist.start waits for all ranks, so rank 0 cannot create the run directory while another
    # rank still checks that it does not exist.
    plan = make_plan(cfg)
    device = run_cfg(cfg, plan.passes[0]).device
    with dist.start(device) as ranks:
        check_data_parallel(cfg, plan, ranks.world)
        shares = plan.shares(ranks.world)
        read = ranks.read_mode(cfg.dist_read)
        if ranks.is_main:
            write_run(plan, rank_lines(cfg, plan, shares, ranks, read))
        ranks.barrier()  # the run directory exists before any rank writes into it

        data_parallel = cfg.data_parallel and ranks.distributed
        status: dict[str, dict] = {}
        for p, data, share in zip(plan.passes, plan.datas, shares, strict=True):
            mine = p if data_parallel else share[ranks.rank]
            role = Role(mine, ranks, data_parallel, read)
            status.update(train_pass(p, data, plan.run_dir, run_cfg(cfg, p), role))

        # Each rank scores its share of the members; rank 0 writes the outputs.
        mine = [share[ranks.rank] for share in shares]
        scored = evaluate_members(
            plan.run_dir, [p for p in mine if p is not None], status, ranks.device
        )
        results = {r["name"]: r for part in ranks.all_gather(scored) for r in part}
        if ranks.is_main:
            ordered = [results[m.name] for p in plan.passes for m in p.members if m.name in results]
            if ordered:
                write_outputs(ordered, plan.run_dir / "eval")
            print(write_summary(plan.run_dir, plan.members, status, results))
            for line in stalled_thresholds(plan.members, results):
                print(line)
    return plan.run_dir


def submit(cfg: Config):
    """`--slurm`: check and create the run here, then train it in a Slurm job."""
    slurm.check(cfg)
    plan = make_plan(cfg)
    world = slurm.ranks(cfg)
    check_data_parallel(cfg, plan, world)
    # The job's ranks use their node's GPUs unless told otherwise (this machine may have none).
    gpus = cfg.slurm_gpus > 0 and not run_cfg(cfg, plan.passes[0]).device.startswith("cpu")
    device = torch.device("cuda" if gpus else "cpu")
    ranks = dist.Ranks(world=world, backend="nccl" if gpus else "gloo", device=device)
    read = ranks.read_mode(cfg.dist_read)
    executor = slurm.make_executor(cfg)  # no Slurm: fail before writing anything
    write_run(plan, rank_lines(cfg, plan, plan.shares(world), ranks, read))
    return slurm.submit(cfg, plan.run_dir, train, executor=executor)


def make_plan(cfg: Config) -> Plan:
    """Every check that can fail on the user's input, before anything is written."""
    run_dir, members, saved = prepare(without_launch(cfg))
    passes = sweep.group(members)
    datas = [open_pass(p) for p in passes]  # a bad shard directory or layer fails here
    check_widths(passes, datas)
    plan = Plan(run_dir, members, saved, passes, datas)
    if saved is not None:
        for index, d_vit in plan.d_vits.items():
            want = saved.get("d_vit", {}).get(str(index))
            if want is not None and want != d_vit:
                root = passes[index].cfg.data.shard_root
                raise UserError(
                    f"--resume {run_dir}: the run was trained on d_vit={want}, but {root} holds "
                    f"d_vit={d_vit}; resume on the shards it was trained on."
                )
    return plan


def write_run(plan: Plan, rank_lines: list[str]) -> None:
    """Create the run directory, print the plan and, for a new run, write run.json."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    print("\n".join([sweep.plan_text(plan.passes), *rank_lines]))
    print(f"run directory: {plan.run_dir}")
    if plan.saved is not None:
        return
    atomic_write_json(
        plan.run_dir / RUN_FILE,
        {
            "members": [
                {"index": m.index, "name": m.name, "axes": m.axes, "config": sweep.to_dict(m.cfg)}
                for m in plan.members
            ],
            "d_vit": {str(k): v for k, v in plan.d_vits.items()},
        },
    )


def rank_lines(
    cfg: Config,
    plan: Plan,
    shares: list[list[sweep.Pass | None]],
    ranks: dist.Ranks,
    read: dist.Read,
) -> list[str]:
    """The plan's `rank R:` lines (none for a single process)."""
    if not ranks.distributed:
        return []
    how = {
        "broadcast": "rank 0 reads each batch and broadcasts it",
        "each": "each rank reads the same stream of batches",
    }[read]
    head = f"ranks: {ranks.world} ({ranks.backend}); {how}"
    if cfg.data_parallel:
        head += "; data-parallel: every rank trains every member on its slice of each batch"
        return [head] + [
            f"rank {r}: every member, on slice {r + 1}/{ranks.world} of each batch"
            for r in range(ranks.world)
        ]
    return [head + "; members split by cost"] + partition.plan_lines(
        plan.passes, shares, plan.d_vits
    )


def without_launch(cfg: Config) -> Config:
    """`cfg` with the launch flags (ranks, Slurm) at their defaults: they are not part of what
    is trained, so they stay out of the members' configs, run.json and checkpoints."""
    default = Config()
    return sweep.replace(cfg, {k: getattr(default, k) for k in LAUNCH_KEYS})


def check_data_parallel(cfg: Config, plan: Plan, world: int) -> None:
    if not cfg.data_parallel or world <= 1:
        return
    for p in plan.passes:
        B = p.cfg.data.batch_size
        if B % world:
            raise UserError(
                f"--data-parallel over {world} ranks: pass {p.index}'s data.batch_size={B} must be "
                f"a multiple of {world} (each rank takes an equal slice)."
            )
        for m in p.members:
            if m.cfg.sae.family.startswith("vsae-"):
                raise UserError(
                    f"--data-parallel: member {m.name} is variational ({m.cfg.sae.family}); its "
                    "noise is drawn per member and step, the same on every rank, so ranks' slices "
                    "would share it. Train it without --data-parallel (members split across ranks)."
                )


def run_cfg(cfg: Config, p: sweep.Pass) -> Config:
    """Run-level settings (device, checkpoint and log cadence, wandb): the sweep's or saved
    run's, overridden by the ones given explicitly on this command line."""
    flags = sweep.explicit_flags(cfg)
    keys = ("device", "ckpt_every", "log_every")
    return sweep.replace(
        p.cfg, {k: v for k, v in flags.items() if k in keys or k.startswith("wandb.")}
    )


def prepare(cfg: Config) -> tuple[pathlib.Path, list[sweep.Member], dict | None]:
    """The run directory (not created yet) and its members: a new run, or the saved one
    for --resume."""
    if cfg.resume is not None:
        run_dir = pathlib.Path(cfg.resume)
        path = run_dir / RUN_FILE
        if not path.is_file():
            raise UserError(f"--resume {run_dir}: no {RUN_FILE}; not a `saev train` run directory.")
        saved = json.loads(path.read_text())
        members = []
        for entry in saved["members"]:
            mcfg = sweep.from_dict(entry["config"], source=str(path))
            if cfg.data.shard_root is not None:  # shards moved: the one override allowed
                mcfg = sweep.replace(mcfg, {"data.shard_root": cfg.data.shard_root})
            members.append(sweep.Member(entry["index"], entry["name"], mcfg, entry["axes"]))
        return run_dir, members, saved

    members = sweep.expand(cfg)
    for m in members:
        check_member(m)
    run_dir = cfg.run_root / short_hash([sweep.canonical(m.cfg) for m in members])
    if (run_dir / RUN_FILE).is_file():
        done = (run_dir / "summary.json").is_file()
        raise UserError(
            f"{run_dir} already holds {'a finished' if done else 'an unfinished'} run of this "
            f"config; {'see its summary.json, or ' if done else ''}continue it with --resume {run_dir}."
        )
    return run_dir, members, None


def check_member(m: sweep.Member) -> None:
    """Refuse trainer settings that cannot train (before anything is written)."""
    c = m.cfg
    if c.data.shard_root is None:
        raise UserError(
            "no shard directory: pass --data.shard-root DIR (or set shard_root in the "
            "sweep's [data] table)."
        )
    if c.data.batch_size < 1 or c.n_train < 1:
        raise UserError(
            f"member {m.name}: batch_size={c.data.batch_size} and n_train={c.n_train} must be >= 1."
        )
    checks = [
        ("lr", c.lr, c.lr is None or (math.isfinite(c.lr) and c.lr > 0), "a finite number > 0"),
        ("grad_clip", c.grad_clip, math.isfinite(c.grad_clip) and c.grad_clip >= 0, ">= 0"),
        ("lr_decay_frac", c.lr_decay_frac, 0 <= c.lr_decay_frac <= 1, "in [0, 1]"),
        ("min_lr_frac", c.min_lr_frac, 0 <= c.min_lr_frac <= 1, "in [0, 1]"),
        ("sae.exp_factor", c.sae.exp_factor, c.sae.exp_factor >= 1, "an integer >= 1"),
        ("sae.sparsity_warmup", c.sae.sparsity_warmup, c.sae.sparsity_warmup >= 0, ">= 0"),
        ("data.eval_frac", c.data.eval_frac, 0 <= c.data.eval_frac < 1, "in [0, 1)"),
        ("n_init_sample", c.n_init_sample, c.n_init_sample >= 1, ">= 1"),
    ]
    for key, value, ok, expected in checks:
        if not ok:
            raise UserError(f"member {m.name}: {key}={value!r}; expected {expected}.")
    warmup = c.lr_warmup
    if warmup is not None and not 0 <= warmup < c.n_train:
        raise UserError(
            f"member {m.name}: lr_warmup={warmup:,} tokens must be >= 0 and below n_train={c.n_train:,}, "
            "or the learning rate never reaches its peak; lower it or leave it unset (default: min(1M, 5% of n_train))."
        )
    sweep.hparams(c)  # the family's hyperparameters, checked
    default = Config()
    for key in LAUNCH_KEYS:
        if getattr(c, key) != getattr(default, key):
            raise UserError(
                f"{c.sweep}: key {key!r} says how this command runs, not what it trains; "
                f"give it on the command line (--{key.replace('_', '-')})."
            )


def check_widths(passes: list[sweep.Pass], datas: list[PassData]) -> None:
    """k and the other per-token counts must fit in the SAE's width (d_sae = exp_factor*d_vit)."""
    for p, data in zip(passes, datas, strict=True):
        for m in p.members:
            d_sae = m.cfg.sae.exp_factor * data.shards.md.d_vit
            k = sweep.hparams(m.cfg).get("k")
            if k is not None and k > d_sae:
                raise UserError(
                    f"member {m.name}: k={k} is more than the SAE's {d_sae} latents "
                    f"(exp_factor {m.cfg.sae.exp_factor} x d_vit {data.shards.md.d_vit}); "
                    "lower k or widen the SAE."
                )


def evaluate_members(
    run_dir: pathlib.Path, passes: list[sweep.Pass], status: dict, device: torch.device
) -> list[dict]:
    """Score every member of `passes` that has a checkpoint on its pass's eval split."""
    results = []
    for p in passes:
        c = p.cfg
        if c.n_eval <= 0 or c.data.eval_frac <= 0:
            continue
        ckpts = [
            (m.name, run_dir / "members" / m.name)
            for m in p.members
            if status[m.name]["ckpt_step"] is not None
        ]
        if not ckpts:
            continue
        data = EvalData(batch_size=c.data.batch_size, n_tokens=c.n_eval, n_threads=c.data.n_threads)
        results += evaluate_ckpts(ckpts, data=data, device=device)
    return results


def write_summary(
    run_dir: pathlib.Path, members: list[sweep.Member], status: dict, results: dict[str, dict]
) -> str:
    rows = []
    for m in members:
        st = status[m.name]
        ev = {k: v for k, v in results.get(m.name, {}).items() if k != "freq"}
        ckpt = run_dir / "members" / m.name if st["ckpt_step"] is not None else None
        rows.append(
            {
                "name": m.name,
                "family": m.cfg.sae.family,
                "axes": m.axes,
                "ckpt": None if ckpt is None else str(ckpt),
                **st,
                "eval": ev,
            }
        )
    atomic_write_json(run_dir / "summary.json", {"run": str(run_dir), "members": rows})
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for r in rows:
        vals = {"name": r["name"], "status": r["status"], **r["eval"]}
        lines.append("| " + " | ".join(_fmt(vals.get(c)) for c in SUMMARY_COLUMNS) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / "summary.md", text)
    return text + f"wrote {run_dir / 'summary.json'}"


def stalled_thresholds(members: list[sweep.Member], results: dict[str, dict]) -> list[str]:
    """One hint per JumpReLU λ sweep whose members ended at about the same L0 (within 25%)
    though λ spans 3× or more. Adam moves log θ by about the lr per step, so in a short run the
    thresholds may all still be rising at that rate, whatever λ (docs/train.md, "jumprelu")."""
    sweeps: dict[tuple, list[tuple[float, float]]] = {}
    for m in members:
        l0 = results.get(m.name, {}).get("l0_mean")
        hp = sweep.hparams(m.cfg)
        # Families with learned thresholds; at a target L0 or λ 0, λ is not what sets L0.
        if not l0 or "threshold_lr_scale" not in hp or hp["target_l0"] > 0:
            continue
        if hp["sparsity_coeff"] <= 0:
            continue
        rest = tuple(sorted((k, repr(v)) for k, v in m.axes.items() if k != "sae.sparsity_coeff"))
        sweeps.setdefault((m.cfg.sae.family, rest), []).append((hp["sparsity_coeff"], l0))
    hints = []
    for (family, _), rows in sweeps.items():
        lams, l0s = [r[0] for r in rows], [r[1] for r in rows]
        if max(lams) >= 3 * min(lams) and max(l0s) < 1.25 * min(l0s):
            hints.append(
                f"note: {family} members with sparsity_coeff {min(lams):g} to {max(lams):g} ended "
                f"at L0 {min(l0s):.1f} to {max(l0s):.1f}: the thresholds have not caught up with "
                "lambda in this run. Raise --sae.threshold-lr-scale (10 on a 98-step ViT run) or "
                'train longer (docs/train.md, "jumprelu").'
            )
    return hints


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
