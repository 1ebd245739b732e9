"""The `saev train` configuration: the same keys as flags (`--sae.k`) and as sweep TOML (`[sae] k`).

Fields are grouped by what they share in a sweep (docs/sweep.md):
- `DataConfig` and the pass-level fields (`n_train`) decide which batches are read; members
  that agree on them train in the same pass over the shards.
- `SaeConfig.family` and the width (`exp_factor`) decide the stack a member joins.
- Everything else is a per-member hyperparameter.
"""

import dataclasses
import pathlib
import typing

import tyro

from saev.nn import HPARAM_SPECS, Family
from saev.shards import Tokens
from saev.train.schedules import Decay


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which activations to train on and how they are read."""

    shard_root: pathlib.Path | None = None
    """Shard directory written by `saev activations` (holds metadata.json)."""
    layer: int = -2
    """ViT block whose residual stream to train on; negative counts from the last block."""
    tokens: Tokens = "patches"
    """Token selection: patch tokens, the CLS token, or all of them."""
    batch_size: int = 4096
    """Tokens per training batch (shared by every member of a pass)."""
    eval_frac: float = 0.1
    """Fraction of images held out for evaluation; training never sees their tokens."""
    split_seed: int = 0
    """Seed of the train/eval split of images."""
    seed: int = 0
    """Seed of the shuffle order."""
    n_threads: int = 4
    """Reader threads of the shuffled loader."""
    chunk_mb: float = 32.0
    """Size of one sequential read of the shuffled loader, in MiB."""
    buffer_mb: float = 512.0
    """Shuffle-buffer size in MiB; a batch mixes tokens from buffer_mb/chunk_mb random chunks."""


@dataclasses.dataclass(frozen=True)
class _SaeTrainerFields:
    """The fields of `SaeConfig` that are the trainer's, not a member hyperparameter of saev.nn."""

    family: Family = "topk"
    """SAE family; members with the same family and width train as one stacked group."""
    exp_factor: int = 16
    """Width of the SAE as a multiple of d_vit (d_sae = exp_factor * d_vit)."""
    sparsity_warmup: int = 0
    """Tokens over which every sparsity coefficient and KL coefficient rises linearly from 0."""


HPARAM_FIELDS = tuple(name for name in HPARAM_SPECS if name != "seed")
"""SaeConfig fields passed to saev.nn as member hyperparameters (when set and used by the family).
A member's `seed` is the top-level `seed` instead, so that one flag seeds every member."""


def _hparam_field(name: str) -> tuple[str, typing.Any, dataclasses.Field]:
    """One SaeConfig field per saev.nn hyperparameter: its type and doc (the `--help` text) come
    from `saev.nn.HPARAM_SPECS`; unset (None) means the family's default."""
    spec = HPARAM_SPECS[name]
    tp = typing.Annotated[spec.type | None, tyro.conf.arg(help=spec.doc)]
    return name, tp, dataclasses.field(default=None)


SaeConfig = dataclasses.make_dataclass(
    "SaeConfig",
    [_hparam_field(name) for name in HPARAM_FIELDS],
    bases=(_SaeTrainerFields,),
    frozen=True,
    namespace={
        "__module__": __name__,  # pickles by reference (a Slurm job's config)
        "__doc__": "The SAE family, its width and its hyperparameters (docs/families.md).\n\n"
        "A hyperparameter left unset (None) takes the family's default from `saev.nn.HPARAMS`.",
    },
)
"""`family`, `exp_factor`, `sparsity_warmup`, then one optional field per `HPARAM_FIELDS` name."""


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Optional Weights & Biases logging: one wandb run per member."""

    mode: typing.Literal["online", "offline", "disabled"] = "disabled"
    """online, offline (no network needed; sync later) or disabled."""
    project: str = "saev"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user); None uses your default."""
    tags: tuple[str, ...] = ()
    """Tags added to every member's wandb run."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Train one SAE, or a sweep grid of SAEs in one pass over activation shards."""

    sweep: pathlib.Path | None = None
    """Sweep TOML (docs/sweep.md); any list value is a grid axis. Flags you give explicitly override it."""
    data: DataConfig = DataConfig()
    sae: SaeConfig = SaeConfig()
    lr: float | None = None
    """Peak learning rate (Adam); None: 1e-3 / sqrt(d_sae / 2^14), e.g. 1.6e-3 at d_sae 6144, four times that for relu, gated, jumprelu and the vsae families but vsae-topk (docs/train.md)."""
    lr_warmup: int | None = None
    """Tokens of linear learning-rate warmup; None: 1M tokens or 5% of n_train, whichever is smaller."""
    lr_decay: Decay = "linear"
    """Shape of the learning-rate decay over the last lr_decay_frac of the run, down to lr * min_lr_frac."""
    lr_decay_frac: float = 0.2
    """Fraction of n_train, at its end, over which the learning rate decays (1: from the end of warmup)."""
    min_lr_frac: float = 0.0
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Clip each member's gradient to this global L2 norm (0 disables)."""
    n_train: int = 100_000_000
    """Training tokens (batches are drawn from the shuffled train split, epochs repeat)."""
    seed: int = 0
    """Seed of the SAE's initialisation (per member)."""
    dtype: typing.Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the training matmuls: bfloat16 runs them under autocast (weights, Adam
    state, losses and metrics stay float32; docs/train.md has the speed and FVU either way)."""
    n_init_sample: int = 100_000
    """Tokens sampled once to estimate the input scale and to initialise b_dec."""
    n_eval: int = 1_000_000
    """At most this many eval-split tokens are scored at the end (0 skips the final evaluation)."""
    ckpt_every: int = 50_000_000
    """Tokens between checkpoints of every member and of the resume state (0: only at the end)."""
    log_every: int = 50
    """Steps between metrics.jsonl lines (and wandb logs)."""
    run_root: pathlib.Path = pathlib.Path("runs")
    """Where run directories are created (one per `saev train`, named by the config hash)."""
    resume: pathlib.Path | None = None
    """A run directory to continue after an interruption; its saved config is used."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N; under torchrun or --slurm each rank takes cuda:LOCAL_RANK."""
    wandb: WandbConfig = WandbConfig()
    data_parallel: bool = False
    """With several ranks (torchrun, --slurm): train every member on every rank, each rank a slice of every batch (DDP), instead of splitting the members across ranks; for one SAE too large for one GPU to train fast enough (docs/scaling.md)."""
    dist_read: typing.Literal["auto", "broadcast", "each"] = "auto"
    """With several ranks: rank 0 reads each batch and broadcasts it, or each rank reads the same deterministic stream; auto: broadcast on GPUs (nccl), each on CPU (gloo)."""
    slurm: bool = False
    """Submit this run as one Slurm job through submitit (one rank per GPU) instead of running here."""
    slurm_account: str = ""
    """Slurm account."""
    slurm_partition: str = ""
    """Slurm partition."""
    slurm_time_min: int = 240
    """Slurm time limit, in minutes (on a timeout or preemption the job is requeued and resumes)."""
    slurm_nodes: int = 1
    """Slurm nodes; ranks = nodes x GPUs per node."""
    slurm_gpus: int = 1
    """GPUs per node, one rank each (0: one CPU rank per node)."""
    slurm_cpus: int = 8
    """CPUs per rank (used by the shuffled loader's reader threads)."""
    log_to: pathlib.Path = pathlib.Path("./logs")
    """Where submitit keeps the Slurm job script and logs."""


PASS_KEYS = (
    "data.shard_root",
    "data.layer",
    "data.tokens",
    "data.batch_size",
    "data.eval_frac",
    "data.split_seed",
    "data.seed",
    "data.n_threads",
    "data.chunk_mb",
    "data.buffer_mb",
    "n_train",
    "n_init_sample",
    "n_eval",
)
"""Keys that decide which batches are read: members agreeing on them share one pass."""

STACK_KEYS = ("sae.family", "sae.exp_factor", "sae.base", "sae.prefix_fracs", "dtype")
"""Keys that decide the parameter shapes: members agreeing on them (within a pass) form one stack."""

LAUNCH_KEYS = (
    "data_parallel",
    "dist_read",
    "slurm",
    "slurm_account",
    "slurm_partition",
    "slurm_time_min",
    "slurm_nodes",
    "slurm_gpus",
    "slurm_cpus",
    "log_to",
)
"""Keys that say how this command runs (ranks, Slurm): flags only, never sweep keys, and not
part of what is trained (members keep their defaults)."""

RUN_KEYS = ("sweep", "run_root", "resume", "device", "ckpt_every", "log_every", *LAUNCH_KEYS)
"""Keys that belong to the whole run and cannot be grid axes."""
