"""Per-member training logs: `metrics.jsonl` beside the checkpoint, and optionally wandb.

metrics.jsonl gets one JSON line per logged step. On resume, lines after the resumed step
are dropped first, so the file reads as if the run had never been interrupted. wandb is
optional: one wandb run per member, grouped by the run directory, in `online` or `offline`
mode (offline needs no network; `wandb sync` uploads later).
"""

import json
import logging
import pathlib

from saev.train.config import WandbConfig

logger = logging.getLogger("saev.train")


class MemberLog:
    def __init__(self, run_dir: pathlib.Path, member, wandb_cfg: WandbConfig, *, resume_step: int):
        self.path = run_dir / "members" / member.name / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            keep = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        self.fd = open(self.path, "a")  # noqa: SIM115 (closed by close(), across many steps)
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            import wandb

            from saev.train.sweep import to_dict

            self.wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=f"{run_dir.name}/{member.name}",
                group=run_dir.name,
                id=f"{run_dir.name}-{member.index:03d}",
                resume="allow",
                config=to_dict(member.cfg),
                tags=list(wandb_cfg.tags),
                mode=wandb_cfg.mode,
                dir=str(run_dir),
                reinit="create_new",
            )

    def write(self, row: dict) -> None:
        self.fd.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def flush(self) -> None:
        if not self.fd.closed:
            self.fd.flush()

    def close(self) -> None:
        if not self.fd.closed:
            self.fd.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
