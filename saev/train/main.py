"""`python -m saev train`: train one SAE, or a whole sweep grid in one pass over the shards.

1. Expand the grid (flags, `--sweep` TOML) into members and group them into passes and stacks.
2. Open every pass's shards first, so a bad layer or shard directory fails before anything
   is printed or written; then create the run directory and print the plan.
3. Train pass by pass (`saev.train.loop`), checkpointing every member periodically.
4. Score every member on the eval split with `saev.evaluate` (the same code as
   `saev evaluate`), write `eval/`, `summary.json` and `summary.md`, and print the table.
"""

import json
import math
import pathlib

import torch

from saev.errors import UserError
from saev.evaluate import DataConfig as EvalData
from saev.evaluate import evaluate_ckpts, write_outputs
from saev.helpers import atomic_write_json, atomic_write_text, resolve_device, short_hash
from saev.train import sweep
from saev.train.config import Config, DataConfig, SaeConfig, WandbConfig
from saev.train.loop import PassData, open_pass, train_pass

__all__ = ["Config", "DataConfig", "SaeConfig", "WandbConfig", "main", "train"]

RUN_FILE = "run.json"
SUMMARY_COLUMNS = ("name", "status", "l0_mean", "fvu", "mse", "cosine", "dead_frac", "dense_frac")


def main(cfg: Config) -> None:
    train(cfg)


def train(cfg: Config) -> pathlib.Path:
    """Train what `cfg` describes; returns the run directory."""
    run_dir, members, saved = prepare(cfg)
    passes = sweep.group(members)
    datas = [open_pass(p) for p in passes]  # a bad shard directory or layer fails here
    check_widths(passes, datas)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(sweep.plan_text(passes))
    print(f"run directory: {run_dir}")
    d_vits = {str(p.index): d.shards.md.d_vit for p, d in zip(passes, datas, strict=True)}
    if saved is not None:
        for key, d_vit in d_vits.items():
            want = saved.get("d_vit", {}).get(key)
            if want is not None and want != d_vit:
                root = passes[int(key)].cfg.data.shard_root
                raise UserError(
                    f"--resume {run_dir}: the run was trained on d_vit={want}, but {root} holds "
                    f"d_vit={d_vit}; resume on the shards it was trained on."
                )
    else:
        atomic_write_json(
            run_dir / RUN_FILE,
            {
                "members": [
                    {
                        "index": m.index,
                        "name": m.name,
                        "axes": m.axes,
                        "config": sweep.to_dict(m.cfg),
                    }
                    for m in members
                ],
                "d_vit": d_vits,
            },
        )

    device = resolve_device(run_cfg(cfg, passes[0]).device)
    status: dict[str, dict] = {}
    for p, data in zip(passes, datas, strict=True):
        status.update(train_pass(p, data, run_dir, device, run_cfg(cfg, p)))

    results = evaluate_run(run_dir, passes, status, device)
    summary = write_summary(run_dir, members, status, results)
    print(summary)
    return run_dir


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


def evaluate_run(
    run_dir: pathlib.Path, passes: list[sweep.Pass], status: dict, device: torch.device
) -> dict[str, dict]:
    """Score every member that has a checkpoint on its pass's eval split."""
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
    if results:
        write_outputs(results, run_dir / "eval")
    return {r["name"]: r for r in results}


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


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
