"""`saev train --slurm`: the run as one Slurm job through submitit, one rank per GPU.

The flags and the log layout are those of `saev activations --slurm` (`--slurm-account`,
`--slurm-partition`, `--slurm-time-min`, `--slurm-gpus`, `--slurm-cpus`, job script and logs in
`--log-to`), plus `--slurm-nodes`. The run directory is created and checked before submission,
so the job itself is `saev train --resume RUN_DIR` on every task: each task turns submitit's
view of the job (its rank, the world size, the first node's address) into torch.distributed's
environment, then trains as under torchrun. On a timeout or preemption submitit requeues the
same job, which resumes from the last checkpoint.
"""

import dataclasses
import pathlib
import typing

from saev import helpers
from saev.errors import UserError
from saev.train.config import Config


@dataclasses.dataclass(frozen=True)
class Job:
    """What every task of the Slurm job runs (pickled by submitit)."""

    train: typing.Callable[[Config], typing.Any]
    """saev.train.main.train (given, not imported: main imports this module)."""
    cfg: Config
    """`--resume RUN_DIR` and the launch flags of the submitting command."""

    def __call__(self) -> typing.Any:
        import submitit

        # Each task sees its own rank; cuda:LOCAL_RANK is chosen by saev.train.dist.
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        return self.train(self.cfg)

    def checkpoint(self, *args, **kwargs):
        """Requeue on timeout or preemption: the same job, which resumes the run."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def job_cfg(cfg: Config, run_dir: pathlib.Path) -> Config:
    """The submitting command as `--resume RUN_DIR`, with every path absolute (a job may not
    start in the directory it was submitted from)."""

    def absolute(p: pathlib.Path | None) -> pathlib.Path | None:
        return None if p is None else pathlib.Path(p).resolve()

    return dataclasses.replace(
        cfg,
        sweep=None,
        resume=absolute(run_dir),
        run_root=absolute(cfg.run_root),
        log_to=absolute(cfg.log_to),
        slurm=False,
        data=dataclasses.replace(cfg.data, shard_root=absolute(cfg.data.shard_root)),
    )


def ranks(cfg: Config) -> int:
    """Ranks of the job: one per GPU, or one per node without GPUs."""
    return cfg.slurm_nodes * max(cfg.slurm_gpus, 1)


def check(cfg: Config) -> None:
    for key, least in [
        ("slurm_nodes", 1),
        ("slurm_gpus", 0),
        ("slurm_cpus", 1),
        ("slurm_time_min", 1),
    ]:
        value = getattr(cfg, key)
        if value < least:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {value}: expected an integer >= {least}.")


def make_executor(cfg: Config):
    """submitit's Slurm executor with the job's resources (UserError without Slurm)."""
    per_node = max(cfg.slurm_gpus, 1)
    return helpers.slurm_executor(
        cfg.log_to,
        "saev-train",
        nodes=cfg.slurm_nodes,
        tasks_per_node=per_node,
        gpus_per_node=cfg.slurm_gpus,
        cpus_per_task=cfg.slurm_cpus,
        timeout_min=cfg.slurm_time_min,
        slurm_account=cfg.slurm_account or None,
        slurm_partition=cfg.slurm_partition or None,
    )


def submit(cfg: Config, run_dir: pathlib.Path, train: typing.Callable, executor=None):
    """Submit the run in `run_dir` (created, not trained yet) as one job; returns the job."""
    if executor is None:
        executor = make_executor(cfg)
    job = executor.submit(Job(train, job_cfg(cfg, run_dir)))
    print(
        f"submitted job {job.job_id}: {cfg.slurm_nodes} node(s) x {max(cfg.slurm_gpus, 1)} "
        f"rank(s); logs: {cfg.log_to}"
    )
    print(f"follow it in {run_dir}; if the job dies, resubmit with --resume {run_dir} --slurm")
    return job
