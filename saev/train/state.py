"""The resume state of a pass: one file per member, made valid by one commit per checkpoint.

    state/pass<i>/committed.json           {"version", "step", "status": {member: {...}}}
    state/pass<i>/step<N>/<member>.pt      the member's slices of its stack and optimiser state

Per member, not per stack or per rank: every tensor of a stack's and of a `StackAdam`'s state
has the member axis first, so a member's slice can be put back into any stack. A run therefore
resumes on any number of ranks, whatever the split it was saved under. A checkpoint is valid
once `committed.json` names its step: each rank writes its members' files, the ranks agree
(`Ranks.all_gather` of the members' status), and only then does rank 0 commit, so a rank that
dies mid-checkpoint leaves the previous commit in force. Older step directories are removed
after the commit. Nothing else is kept: the trainer draws nothing from torch's global RNG
(weights are seeded per member, variational noise per member and step, the loader by its seed).
"""

import json
import pathlib
import shutil
import typing

import torch

from saev.errors import UserError
from saev.helpers import atomic_write_json

VERSION = 2
COMMIT_FILE = "committed.json"


def pass_dir(run_dir: pathlib.Path, pass_index: int) -> pathlib.Path:
    return run_dir / "state" / f"pass{pass_index}"


def step_dir(run_dir: pathlib.Path, pass_index: int, step: int) -> pathlib.Path:
    return pass_dir(run_dir, pass_index) / f"step{step:012d}"


def committed(run_dir: pathlib.Path, pass_index: int) -> dict | None:
    """{"step": N, "status": {...}} of the last committed checkpoint of the pass, or None."""
    legacy = run_dir / "state" / f"pass{pass_index}.pt"
    path = pass_dir(run_dir, pass_index) / COMMIT_FILE
    if legacy.is_file() and not path.is_file():
        raise UserError(f"{legacy}: resume state of another saev version; start a new run.")
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("version") != VERSION:
        raise UserError(f"{path}: resume state of another saev version; start a new run.")
    return doc


def write_members(
    run_dir: pathlib.Path,
    pass_index: int,
    step: int,
    members: list[tuple[str, torch.nn.Module, typing.Any, int]],
) -> None:
    """Each (name, stack, optimiser, position in the stack)'s slices, one atomic file each."""
    out = step_dir(run_dir, pass_index, step)
    out.mkdir(parents=True, exist_ok=True)
    stack_states: dict[int, dict] = {}
    opt_states: dict[int, dict] = {}
    for name, stack, opt, i in members:
        if id(stack) not in stack_states:
            stack_states[id(stack)] = stack.state_dict()
            opt_states[id(stack)] = opt.state_dict()
        doc = {
            "stack": _slice(stack_states[id(stack)], i),
            "opt": _slice(opt_states[id(stack)], i),
        }
        tmp = out / f"{name}.pt.tmp"
        torch.save(doc, tmp)
        tmp.replace(out / f"{name}.pt")


def commit(run_dir: pathlib.Path, pass_index: int, step: int, status: dict[str, dict]) -> None:
    """Make step `step` the one to resume from (rank 0, once every rank wrote its members)."""
    root = pass_dir(run_dir, pass_index)
    atomic_write_json(root / COMMIT_FILE, {"version": VERSION, "step": step, "status": status})
    for old in root.glob("step*"):
        # Only older steps: a rank may already be writing a later one.
        if old.is_dir() and int(old.name.removeprefix("step")) < step:
            shutil.rmtree(old, ignore_errors=True)


def load_members(
    run_dir: pathlib.Path,
    pass_index: int,
    step: int,
    groups: list[tuple[list[str], torch.nn.Module, typing.Any]],
    device: torch.device,
) -> None:
    """Fill each (member names, stack, optimiser) from the members' files of step `step`."""
    root = step_dir(run_dir, pass_index, step)
    for names, stack, opt in groups:
        docs = []
        for name in names:
            path = root / f"{name}.pt"
            if not path.is_file():
                raise UserError(
                    f"{path}: missing from the committed resume state; the run directory is "
                    "incomplete (was it copied while training?)."
                )
            docs.append(torch.load(path, map_location=device, weights_only=True))
        stack.load_state_dict(_cat([d["stack"] for d in docs]))
        opt.load_state_dict(_cat([d["opt"] for d in docs]))


def _slice(tree: typing.Any, i: int) -> typing.Any:
    """Member i of every tensor (first axis) in a nest of dicts and lists."""
    if isinstance(tree, torch.Tensor):
        return tree[i : i + 1].clone()
    if isinstance(tree, dict):
        return {k: _slice(v, i) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_slice(v, i) for v in tree]
    return tree


def _cat(trees: list[typing.Any]) -> typing.Any:
    """Inverse of `_slice` over the members of a stack, in order."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(trees)
    if isinstance(first, dict):
        return {k: _cat([t[k] for t in trees]) for k in first}
    if isinstance(first, list | tuple):
        return [_cat([t[j] for t in trees]) for j in range(len(first))]
    return first
