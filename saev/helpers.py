"""Small utilities shared by every command: atomic writes, config hashing, devices."""

import ctypes
import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import sys
import tempfile
import typing

import torch

from saev.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash never leaves a partial file behind.

    Writes to a temporary file in the same directory, fsyncs, then renames over `path`
    (rename is atomic on POSIX within one filesystem).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: typing.Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=to_jsonable) + "\n")


def to_jsonable(obj: typing.Any) -> typing.Any:
    """JSON fallback for dataclasses, paths and numpy/torch scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def canonical_json(obj: typing.Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing configs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=to_jsonable)


def short_hash(obj: typing.Any, n: int = 10) -> str:
    """First `n` hex digits of the sha256 of `canonical_json(obj)`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str) -> torch.device:
    """Turn a user's `--device` ('auto', 'cpu', 'cuda', 'cuda:1', ...) into a torch device."""
    if device == "auto":
        return torch.device(default_device())
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserError(
            f"--device {device!r} is not a torch device (try 'cpu' or 'cuda')."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device!r} asked for a GPU but torch sees no CUDA device.")
    return dev


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse, for the rest of the process; returns
    whether it applied (Linux with glibc, and SAEV_MALLOC is not 'system').

    A training step allocates and frees tensors of hundreds of MB (a stack's [S, B, d_sae]
    pre-activations). glibc maps every block over 32 MB fresh from the kernel and unmaps it on
    free, so each step page-faults, and the kernel zeroes, all of them again: a sixth of a
    5-member relu step at d_vit 384 on a 2-core CPU (docs/benchmarks.md). jemalloc and tcmalloc
    reuse such blocks too (PyTorch's CPU performance guide suggests them); this is the same for
    glibc, with no library to preload. The cost: the process keeps its peak heap until it exits,
    and torch's 64-byte-aligned blocks settle into reuse only after a few steps, so the peak is
    higher (4.3 GB instead of 3.6 GB on that relu run, which took 119 s instead of 150 s).
    """
    if sys.platform != "linux" or os.environ.get("SAEV_MALLOC", "").lower() == "system":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
    # No mmap for big blocks (they come from the heap and return to it), no heap trimming.
    return bool(
        mallopt(m_mmap_max, 0)
        and mallopt(m_trim_threshold, 2**31 - 1)
        and mallopt(m_top_pad, 64 << 20)
    )


def slurm_executor(log_to: str | os.PathLike, name: str, **resources: typing.Any):
    """submitit's executor for a Slurm job named `name`, with its logs under `log_to` and the
    given `update_parameters` resources; a UserError where no Slurm cluster is found.

    `activations --slurm` and `train --slurm` both submit through this one place. submitit is
    imported here, not at the top: only a Slurm user needs it.
    """
    import submitit

    executor = submitit.AutoExecutor(folder=log_to)
    if executor.cluster != "slurm":
        # submitit looks for `srun` to decide that it runs on a Slurm cluster.
        raise UserError(
            "--slurm: no Slurm cluster found (srun is not on PATH); drop --slurm to run here."
        )
    executor.update_parameters(name=name, **resources)
    return executor
