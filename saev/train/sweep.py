"""Sweep grids: read a TOML, expand list values into a Cartesian grid, and group the members.

A sweep TOML holds the same keys as `saev train`'s flags, top-level keys plus `[data]`,
`[sae]` and `[wandb]` tables. A list value is a grid axis. Members that share the data
settings (`PASS_KEYS`) train in one pass over the shards; inside a pass, members that share
family and width (`STACK_KEYS`) are one stacked module (docs/sweep.md).
"""

import dataclasses
import itertools
import pathlib
import tomllib
import types
import typing

import saev.nn
from saev import migrate
from saev.errors import UserError
from saev.train.config import HPARAM_FIELDS, PASS_KEYS, RUN_KEYS, STACK_KEYS, Config


@dataclasses.dataclass(frozen=True)
class Member:
    """One SAE of the grid."""

    index: int
    name: str
    """Unique, file-system safe: its checkpoint directory name."""
    cfg: Config
    axes: dict[str, typing.Any]
    """The grid-axis values that single this member out (empty for a one-member run)."""


@dataclasses.dataclass(frozen=True)
class Group:
    """Members of one family and width, trained as one stack."""

    members: list[Member]

    @property
    def cfg(self) -> Config:
        return self.members[0].cfg


@dataclasses.dataclass(frozen=True)
class Pass:
    """Groups sharing the data settings: every batch is read once and fed to each group."""

    index: int
    groups: list[Group]

    @property
    def cfg(self) -> Config:
        return self.groups[0].cfg

    @property
    def members(self) -> list[Member]:
        return [m for g in self.groups for m in g.members]


# Flat views of the nested Config.


def fields(cls: type = Config, prefix: str = "") -> dict[str, typing.Any]:
    """Every leaf field of `cls` as {'dotted.key': type}, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(fields(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = tp
    return out


def get(cfg: Config, key: str) -> typing.Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def replace(cfg: typing.Any, updates: dict[str, typing.Any]) -> typing.Any:
    """`dataclasses.replace` for dotted keys of nested dataclasses."""
    direct, nested = {}, {}
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = replace(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **direct)


def to_dict(cfg: Config) -> dict[str, typing.Any]:
    """JSON-ready nested dict of a Config (paths as strings, tuples as lists)."""

    def conv(obj):
        if dataclasses.is_dataclass(obj):
            return {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, pathlib.Path):
            return str(obj)
        if isinstance(obj, tuple):
            return [conv(x) for x in obj]
        return obj

    return conv(cfg)


def from_dict(dct: dict[str, typing.Any], *, source: str) -> Config:
    """Inverse of `to_dict`, with the same checks as a sweep TOML (no axes allowed)."""
    flat = flatten(dct, source=source)
    updates = {}
    for key, value in flat.items():
        updates[key] = check_value(key, value, source=source)
    return replace(Config(), updates)


# Type checks of TOML values.


def describe(tp: typing.Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if tp is pathlib.Path:
        return "a path (string)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def coerce(value: typing.Any, tp: typing.Any) -> typing.Any:
    """`value` as type `tp`, or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value in typing.get_args(tp) and isinstance(value, str | int):
            return value
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError
        return tuple(coerce(v, typing.get_args(tp)[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if tp is pathlib.Path:
        if isinstance(value, str | pathlib.Path):
            return pathlib.Path(value)
        raise TypeError
    raise TypeError


def check_value(key: str, value: typing.Any, *, source: str) -> typing.Any:
    tp = fields()[key]
    try:
        return coerce(value, tp)
    except TypeError:
        raise UserError(
            f"{source}: key {key!r} has value {value!r}; expected {describe(tp)}."
        ) from None


def is_tuple_field(key: str) -> bool:
    tp = fields()[key]
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return any(typing.get_origin(a) is tuple for a in args) or typing.get_origin(tp) is tuple


def flatten(dct: dict[str, typing.Any], *, source: str, prefix: str = "") -> dict[str, typing.Any]:
    """Nested TOML tables to dotted keys; unknown keys and tables are named with the allowed ones."""
    known = fields()
    tables = sorted({k.split(".")[0] for k in known if "." in k})
    out = {}
    for key, value in dct.items():
        full = prefix + key
        if isinstance(value, dict):
            if full not in tables:
                allowed = sorted(k for k in known if k.count(".") == prefix.count("."))
                raise UserError(
                    f"{source}: unknown table [{full}]; allowed tables: {', '.join(tables)}; "
                    f"allowed keys: {', '.join(a for a in allowed if a.startswith(prefix))}."
                )
            out.update(flatten(value, source=source, prefix=full + "."))
            continue
        if full not in known:
            where = f"[{prefix[:-1]}]" if prefix else "the top level"
            allowed = [k[len(prefix) :] for k in known if k.startswith(prefix)]
            allowed = [a for a in allowed if "." not in a]
            raise UserError(
                f"{source}: unknown key {full!r}; allowed keys at {where}: {', '.join(allowed)}."
            )
        out[full] = value
    return out


# Reading a sweep and expanding it.


def read_toml(path: pathlib.Path) -> dict[str, typing.Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"--sweep {path}: no such file.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML ({err}).") from err


def read_sweep(path: pathlib.Path, shard_root: pathlib.Path | None = None) -> dict[str, typing.Any]:
    """The sweep TOML at `path`; a saev 0.1 sweep file is read as the saev sweep it means
    (saev.migrate; `shard_root` is --data.shard-root, for its d_vit)."""
    return migrate.translate_sweep(
        read_toml(path), source=str(path), known=fields(), shard_root=shard_root
    )


def parse_axes(
    raw: dict[str, typing.Any], *, source: str
) -> tuple[dict[str, typing.Any], dict[str, list[typing.Any]]]:
    """Split a sweep's values into fixed values and grid axes, each type-checked."""
    fixed, axes = {}, {}
    for key, value in flatten(raw, source=source).items():
        is_axis = isinstance(value, list) and (
            not is_tuple_field(key) or (value and all(isinstance(v, list) for v in value))
        )
        if key in RUN_KEYS or key.startswith("wandb."):
            if is_axis:
                raise UserError(
                    f"{source}: key {key!r} belongs to the whole run and cannot be a grid axis."
                )
            if key in ("sweep", "resume"):
                raise UserError(f"{source}: key {key!r} is a command-line flag, not a sweep key.")
        if is_axis:
            if not value:
                raise UserError(
                    f"{source}: key {key!r} is an empty list; a grid axis needs values."
                )
            axes[key] = [check_value(key, v, source=source) for v in value]
        else:
            fixed[key] = check_value(key, value, source=source)
    return fixed, axes


def explicit_flags(cfg: Config) -> dict[str, typing.Any]:
    """Fields the user set on the command line (they differ from the defaults)."""
    default = Config()
    return {
        key: get(cfg, key)
        for key in fields()
        if key not in ("sweep", "resume") and get(cfg, key) != get(default, key)
    }


def expand(cfg: Config) -> list[Member]:
    """Every member of the grid: the CLI config, overridden by the sweep TOML, overridden by explicit flags.

    Hyperparameters that a member's family does not use are dropped from it, and members that
    became identical that way (e.g. `k` crossed with a `relu` family) are kept once.
    """
    if cfg.sweep is None:
        check_applicable([cfg], source="the command line", flag=True)
        return [Member(0, f"000-{cfg.sae.family}", cfg, {})]
    source = str(cfg.sweep)
    fixed, axes = parse_axes(read_sweep(cfg.sweep, cfg.data.shard_root), source=source)
    flags = explicit_flags(cfg)
    for key in flags:
        fixed.pop(key, None)
        axes.pop(key, None)
    base = replace(Config(), {**fixed, **flags, "sweep": cfg.sweep})
    keys = list(axes)
    raw = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        raw.append((replace(base, values), values))
    check_applicable([c for c, _ in raw], source=source, flag=False)
    cfgs, seen = [], set()
    for member_cfg, values in raw:
        family = member_cfg.sae.family
        member_cfg = drop_unused(member_cfg)
        used = {k: v for k, v in values.items() if applies(k, family)}
        sig = canonical(member_cfg)
        if sig in seen:
            continue
        seen.add(sig)
        cfgs.append((member_cfg, used))
    return [Member(i, member_name(i, c, v), c, v) for i, (c, v) in enumerate(cfgs)]


def drop_unused(cfg: Config) -> Config:
    """`cfg` with the hyperparameters its family does not use unset."""
    return replace(
        cfg, {f"sae.{n}": None for n in HPARAM_FIELDS if not applies(f"sae.{n}", cfg.sae.family)}
    )


def applies(key: str, family: str) -> bool:
    """Whether dotted `key` means anything to `family` (trainer keys always do)."""
    if not key.startswith("sae.") or key.removeprefix("sae.") not in HPARAM_FIELDS:
        return True
    return key.removeprefix("sae.") in saev.nn.HPARAMS[family]


def check_applicable(cfgs: list[Config], *, source: str, flag: bool) -> None:
    """A hyperparameter set for families none of which use it is an error, not silently ignored."""
    families = sorted({c.sae.family for c in cfgs})
    for name in HPARAM_FIELDS:
        is_set = any(getattr(c.sae, name) is not None for c in cfgs)
        if is_set and not any(name in saev.nn.HPARAMS[f] for f in families):
            allowed = sorted({k for f in families for k in saev.nn.HPARAMS[f]} & set(HPARAM_FIELDS))
            what = f"--sae.{name.replace('_', '-')}" if flag else f"key 'sae.{name}'"
            raise UserError(
                f"{source}: {what} does not apply to family {', '.join(families)}; "
                f"its hyperparameters are: {', '.join(allowed)}."
            )


def hparams(cfg: Config) -> dict[str, typing.Any]:
    """The saev.nn member dict of one member: the family's defaults, overridden by what is set."""
    allowed = saev.nn.HPARAMS[cfg.sae.family]
    hp: dict[str, typing.Any] = {"seed": cfg.seed}
    for name in HPARAM_FIELDS:
        value = getattr(cfg.sae, name)
        if value is not None and name in allowed:
            hp[name] = list(value) if isinstance(value, tuple) else value
    return saev.nn.check_hparams(cfg.sae.family, hp)


def canonical(cfg: Config) -> str:
    from saev.helpers import canonical_json

    # Where and how the run is kept (run_root, device, cadence, wandb) is not what is trained.
    dct = to_dict(cfg)
    for key in (*RUN_KEYS, "wandb"):
        dct.pop(key)
    return canonical_json(dct)


def member_name(i: int, cfg: Config, axes: dict[str, typing.Any]) -> str:
    parts = [f"{i:03d}", cfg.sae.family]
    for key, value in axes.items():
        if key == "sae.family":
            continue
        short = key.rsplit(".", 1)[-1]
        if isinstance(value, float):
            text = f"{value:.3g}"
        elif isinstance(value, tuple):
            text = "x".join(map(str, value))
        elif isinstance(value, pathlib.Path):
            text = value.name
        else:
            text = str(value)
        parts.append(f"{short}{text}")
    name = "-".join(parts)
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
    return safe[:96]


def group(members: list[Member]) -> list[Pass]:
    """Members into passes (same data settings) and, within a pass, stacks (same family, width
    and structural hyperparameters, saev.nn.GROUP_HPARAMS)."""
    passes: dict[tuple, dict[tuple, list[Member]]] = {}
    for m in members:
        pkey = tuple(str(get(m.cfg, k)) for k in PASS_KEYS)
        hp = hparams(m.cfg)
        structural = sorted(saev.nn.GROUP_HPARAMS[m.cfg.sae.family])
        skey = (
            m.cfg.sae.family,
            m.cfg.sae.exp_factor,
            m.cfg.dtype,
            *(str(hp[k]) for k in structural),
        )
        passes.setdefault(pkey, {}).setdefault(skey, []).append(m)
    return [
        Pass(i, [Group(ms) for ms in stacks.values()]) for i, stacks in enumerate(passes.values())
    ]


def plan_text(passes: list[Pass]) -> str:
    """Human-readable plan: passes, groups, members and what differs between them."""
    members = [m for p in passes for m in p.members]
    n_groups = sum(len(p.groups) for p in passes)
    lines = [
        f"plan: {len(members)} member(s) in {n_groups} stacked group(s), "
        f"{len(passes)} pass(es) over the shards"
    ]
    for p in passes:
        c = p.cfg
        lines.append(
            f"pass {p.index}: shards={c.data.shard_root} layer={c.data.layer} "
            f"tokens={c.data.tokens} batch={c.data.batch_size} n_train={c.n_train:,}"
        )
        for gi, g in enumerate(p.groups):
            differs = sorted({k for m in g.members for k in m.axes} - set(STACK_KEYS))
            differs = [k for k in differs if k not in PASS_KEYS]
            lines.append(
                f"  group {gi}: {g.cfg.sae.family} x{len(g.members)} "
                f"(exp_factor={g.cfg.sae.exp_factor}"
                + (f", dtype={g.cfg.dtype}" if g.cfg.dtype != "float32" else "")
                + ")"
                + (f"; differs in {', '.join(differs)}" if differs else "")
            )
            for m in g.members:
                vals = " ".join(f"{k}={m.axes[k]}" for k in differs if k in m.axes)
                lines.append(f"    {m.name}" + (f"  {vals}" if vals else ""))
    return "\n".join(lines)
