"""Which rank trains which member: a pass's members split across ranks, balanced by cost.

Members of a stack never share state, so a group can be cut anywhere and each piece trained
as a smaller stack on its own rank, with the same result bit for bit (tests/test_train_dist.py).
The members of a pass are laid out group by group and cut into `world` contiguous runs whose
largest cost is as small as it can be: balanced ranks, and each rank's stacks as large as the
balance allows (a group is cut only where the balance needs it, so at most world - 1 cuts).

Cost is what one member adds to a step: d_sae x k for the top-k style families (their codes,
decode and sparse backward scale with k), d_sae x d_vit for the dense ones.
"""

import dataclasses

from saev.train import sweep

TOPK_FAMILIES = frozenset({"topk", "batchtopk", "matryoshka", "vsae-topk"})


def member_cost(m: sweep.Member, d_vit: int) -> int:
    """Relative cost of training member `m` for one step."""
    d_sae = m.cfg.sae.exp_factor * d_vit
    if m.cfg.sae.family in TOPK_FAMILIES:
        return d_sae * sweep.hparams(m.cfg)["k"]
    return d_sae * d_vit


def split(p: sweep.Pass, d_vit: int, world: int) -> list[sweep.Pass | None]:
    """Pass `p` cut into one pass per rank (None for a rank with no member of it).

    Each rank's pass keeps `p.index` and holds a contiguous run of `p`'s members, grouped as
    in `p`; the runs cover every member once, and the most expensive run is as cheap as any
    contiguous cut allows.
    """
    members = p.members
    costs = [member_cost(m, d_vit) for m in members]
    cuts = contiguous_cuts(costs, world)
    group_of = {m.name: gi for gi, g in enumerate(p.groups) for m in g.members}
    out: list[sweep.Pass | None] = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        if lo == hi:
            out.append(None)
            continue
        by_group: dict[int, list[sweep.Member]] = {}
        for m in members[lo:hi]:
            by_group.setdefault(group_of[m.name], []).append(m)
        out.append(dataclasses.replace(p, groups=[sweep.Group(ms) for ms in by_group.values()]))
    return out


def contiguous_cuts(costs: list[int], world: int) -> list[int]:
    """Boundaries 0 = c_0 <= c_1 <= ... <= c_world = len(costs) minimising the largest sum of a
    run costs[c_r:c_r+1]; runs are filled in order, so trailing runs may be empty."""
    if not costs:
        return [0] * (world + 1)
    lo, hi = max(costs), sum(costs)
    while lo < hi:  # the smallest feasible largest run (costs are integers)
        mid = (lo + hi) // 2
        if len(_fill(costs, mid)) - 1 <= world:
            hi = mid
        else:
            lo = mid + 1
    cuts = _fill(costs, lo)
    return cuts + [len(costs)] * (world + 1 - len(cuts))


def _fill(costs: list[int], cap: int) -> list[int]:
    """Greedy runs of total at most `cap`: their boundaries, from 0 to len(costs)."""
    cuts, total = [0], 0
    for i, c in enumerate(costs):
        if total + c > cap:
            cuts.append(i)
            total = 0
        total += c
    cuts.append(len(costs))
    return cuts


def plan_lines(
    passes: list[sweep.Pass], shares: list[list[sweep.Pass | None]], d_vit: dict[int, int]
) -> list[str]:
    """One `rank R:` line per rank: its members per pass and its share of the total cost.

    `shares[i][r]` is pass i's share of rank r (from `split`)."""
    world = len(shares[0]) if shares else 1
    total = sum(member_cost(m, d_vit[p.index]) for p in passes for m in p.members)
    lines = []
    for r in range(world):
        parts, cost = [], 0
        for p, share in zip(passes, shares, strict=True):
            mine = share[r]
            if mine is None:
                continue
            cost += sum(member_cost(m, d_vit[p.index]) for m in mine.members)
            parts.append(f"pass {p.index}: " + ", ".join(m.name for m in mine.members))
        what = "; ".join(parts) if parts else "no members (waits at checkpoints)"
        lines.append(f"rank {r}: {what} (cost {100 * cost / max(total, 1):.0f}%)")
    return lines
