"""saev 0.1 -> saev: what each 0.1 command-line flag and sweep-file key became.

The people saev is for already have saev 0.1's guide commands and sweep files. Instead of
failing on them one unknown flag at a time, every 0.1 flag and key that saev does not share
is listed here with what it became:

- translated: it has a saev equivalent and is rewritten to it (`--data.patches` ->
  `--data.tokens`), with a `note:` line saying so;
- dropped: it asks for what saev does anyway (`--data.scale-mean`), with a `note:` line;
- refused: saev reads the value itself, so a wrong one would be silently ignored (`--d-vit`),
  or saev does not do what it asks (`--sae.ghost-grads`). All refusals of a command line or
  file are named in one error, each with its replacement.

`translate_argv(command, argv)` rewrites a command line before tyro parses it (so tyro never
suggests a wrong look-alike); `translate_sweep(raw, ...)` rewrites a parsed sweep TOML before
saev.train.sweep checks it. Flags and keys that saev shares with 0.1 (`--lr`,
`--data.shard-root`, `[sae] exp_factor`) mean the same and are left alone. docs/migrating.md
is the table for users.
"""

import dataclasses
import math
import pathlib
import re
import sys
import typing

from saev.errors import UserError
from saev.shards.metadata import Metadata

DOCS = "docs/migrating.md"
BATCH_01 = 16384
"""saev 0.1's default `sae_batch_size`, the tokens per step of its step-counted warm-ups."""

COMMANDS_01 = {
    "webapp": "saev 0.1's `webapp` is now `saev visuals`, which writes a static page per latent",
}
"""saev 0.1 commands that saev does not have, and what replaced them."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one 0.1 flag or key became."""

    tokens: list[str] | None
    """The saev argv tokens it became ([] dropped; None refused)."""
    why: str
    """The replacement or the reason, as the note or the error shows it."""


Rule = typing.Callable[[list[str], dict], Outcome]
"""(the 0.1 flag's values, context) -> Outcome."""


# Rules, shared by the flag tables.


def to(*words: str) -> Rule:
    """Renamed: saev's flag (and any fixed values after it), then the flag's own values."""
    return lambda v, ctx: Outcome([*words, *v], f"read as {' '.join([*words, *v])}")


def drop(why: str) -> Rule:
    return lambda v, ctx: Outcome([], f"dropped: {why}")


def refuse(why: str) -> Rule:
    return lambda v, ctx: Outcome(None, why)


def by_value(choices: dict[str, Rule]) -> Rule:
    """A rule per value of a one-value flag (any other value: refused with the choices)."""

    def rule(v: list[str], ctx: dict) -> Outcome:
        if v[0] in choices:
            return choices[v[0]](v, ctx)
        return Outcome(None, f"expected one of {', '.join(choices)}")

    return rule


def steps_to_tokens(flag: str) -> Rule:
    """0.1 counted warm-ups in steps of `sae_batch_size` tokens; saev counts tokens."""

    def rule(v: list[str], ctx: dict) -> Outcome:
        try:
            n = int(v[0].replace("_", "")) * ctx["batch"]
        except ValueError:
            return Outcome(None, "expected a whole number of steps")
        return Outcome(
            [flag, str(n)],
            f"read as {flag} {n} (steps of {ctx['batch']} tokens; saev counts tokens)",
        )

    return rule


def clamp(v: list[str], ctx: dict) -> Outcome:
    try:
        big = float(v[0]) >= 1e5
    except ValueError:
        big = False
    if big:
        return Outcome([], "dropped: saev does not clamp; it stops on non-finite activations")
    return Outcome(None, "saev does not clamp activations (it stops on non-finite ones): drop it")


def hours(v: list[str], ctx: dict) -> Outcome:
    try:
        minutes = round(float(v[0]) * 60)
    except ValueError:
        return Outcome(None, "expected a number of hours")
    return Outcome(["--slurm-time-min", str(minutes)], f"read as --slurm-time-min {minutes}")


FROM_MODEL = "saev reads it from the model: drop it"
SCALED = (
    "saev always normalises the inputs inside the SAE and stores that with it; a loaded SAE "
    "takes raw activations"
)
UNSCALED = (
    "saev always normalises the inputs inside the SAE and stores that with it, so a loaded SAE "
    "takes raw activations, which is what 0.1's guide turned scaling off for: drop it"
)
UNIT_NORM = "saev always keeps decoder rows at unit norm and removes the parallel gradient"
NO_SLURM = (
    "Slurm settings are launch flags, not sweep keys: give `--slurm` (and `--slurm-account`, "
    "`--log-to`) on the command line"
)
ONE_DATASET = "saev reads the dataset from the shards' metadata"
LEGACY_SCALING = (
    "saev reads a 0.1 SAE's scale_mean/scale_norm from the run's config.json beside its "
    "sae.pt: drop it (or put that config.json there)"
)
OTHER_DATASET = (
    "saev has no such dataset: images:folder records any folder of images, images:hf any "
    "Hugging Face dataset"
)

FLAGS: dict[str, dict[str, tuple[int, Rule]]] = {
    "activations": {
        "--d-vit": (1, refuse(FROM_MODEL)),
        "--n-patches-per-img": (1, refuse(FROM_MODEL)),
        "--cls-token": (0, refuse(FROM_MODEL)),
        "--no-cls-token": (0, refuse(FROM_MODEL)),
        "--model-org": (1, to("--vit-family")),
        "--model-ckpt": (1, to("--vit-ckpt")),
        "--layers": (-1, to("--vit-layers")),
        "--vit-batch-size": (1, to("--batch-size")),
        "--slurm-acct": (1, to("--slurm-account")),
        "--n-hours": (1, hours),
        "--ssl": (0, drop("saev always checks certificates")),
        "--no-ssl": (
            0,
            refuse(
                "saev never turns certificate checks off: fix the certificates, or put the "
                "weights in the local Hugging Face cache"
            ),
        ),
        "data:imagenet-dataset": (
            0,
            lambda v, ctx: Outcome(
                ["images:hf", "--images.name", "ILSVRC/imagenet-1k", "--images.split", "train"],
                "read as images:hf --images.name ILSVRC/imagenet-1k --images.split train "
                "(0.1's defaults; --data.name and --data.split carry over)",
            ),
        ),
        "data:image-folder-dataset": (
            0,
            lambda v, ctx: Outcome(
                ["images:imagenet"],
                "read as images:imagenet (torchvision ImageFolder order, as 0.1 recorded it)",
            ),
        ),
        "--data.root": (1, to("--images.root")),
        "--data.name": (1, to("--images.name")),
        "--data.split": (1, to("--images.split")),
        **{
            f"data:{kind}": (0, refuse(OTHER_DATASET))
            for kind in (
                "ade20k-dataset",
                "web-dataset",
                "tree-of-life-dataset",
                "laion-dataset",
                "broden-dataset",
            )
        },
    },
    "train": {
        "--data.patches": (
            1,
            by_value(
                {
                    "patches": to("--data.tokens"),
                    "cls": to("--data.tokens"),
                    "meanpool": refuse(
                        "saev trains on tokens, not their mean: --data.tokens patches, cls or all"
                    ),
                }
            ),
        ),
        "--data.scale-mean": (0, drop(SCALED)),
        "--data.scale-norm": (0, drop(SCALED)),
        "--data.no-scale-mean": (0, refuse(UNSCALED)),
        "--data.no-scale-norm": (0, refuse(UNSCALED)),
        "--data.clamp": (1, clamp),
        "--data.n-random-samples": (1, to("--n-init-sample")),
        "--data.n-samples": (1, to("--n-init-sample")),
        "--data.random-perm": (0, drop("saev's loader always shuffles")),
        "--data.no-random-perm": (
            0,
            refuse("saev's loader always shuffles training tokens: drop it"),
        ),
        "--sae.d-vit": (1, refuse("saev reads it from the shards: drop it")),
        "--sae.ghost-grads": (
            0,
            refuse(
                "saev has no ghost gradients: drop it (--sae.family topk or batchtopk revive "
                "dead latents with AuxK)"
            ),
        ),
        "--sae.no-ghost-grads": (0, drop("saev has no ghost gradients")),
        "--sae.remove-parallel-grads": (0, drop(UNIT_NORM)),
        "--sae.normalize-w-dec": (0, drop(UNIT_NORM)),
        "--sae.no-remove-parallel-grads": (0, refuse(UNIT_NORM + ": drop it")),
        "--sae.no-normalize-w-dec": (0, refuse(UNIT_NORM + ": drop it")),
        "--sae.seed": (1, to("--seed")),
        "--sae.n-reinit-samples": (1, to("--n-init-sample")),
        "sae:relu": (
            0,
            to("--sae.family", "relu"),
        ),
        "objective:vanilla": (
            0,
            to("--sae.family", "relu"),
        ),
        "objective:matryoshka": (
            0,
            to("--sae.family", "matryoshka"),
        ),
        "--objective.sparsity-coeff": (
            1,
            refuse(
                "use --sae.family relu --sae.sparsity-coeff with 0.1's value times sqrt(d_vit) "
                "(saev sums the squared error over d_vit where 0.1 averaged it, and weighs its L1 "
                "by sqrt(d_vit))"
            ),
        ),
        "--objective.n-prefixes": (
            1,
            refuse("use --sae.family matryoshka and --sae.prefix-fracs (fixed nested prefixes)"),
        ),
        "--n-patches": (1, to("--n-train")),
        "--sae-batch-size": (1, to("--data.batch-size")),
        "--n-lr-warmup": (1, steps_to_tokens("--lr-warmup")),
        "--n-sparsity-warmup": (1, steps_to_tokens("--sae.sparsity-warmup")),
        "--track": (
            0,
            to("--wandb.mode", "online"),
        ),
        "--no-track": (
            0,
            to("--wandb.mode", "disabled"),
        ),
        "--wandb-project": (1, to("--wandb.project")),
        "--tag": (1, to("--wandb.tags")),
        "--ckpt-path": (1, to("--run-root")),
        "--n-workers": (1, drop("saev's loader reads with threads (--data.n-threads)")),
        "--shuffle": (0, drop("saev's loader always shuffles")),
        "--no-shuffle": (0, refuse("saev's loader always shuffles training tokens: drop it")),
        "--pin-memory": (0, drop("saev's loader pins memory itself")),
        "--no-pin-memory": (0, drop("saev's loader pins memory itself")),
        "--prefetch-factor": (1, drop("saev's loader prefetches itself")),
        "--span-all-devices": (0, refuse("drop it: each saev train process uses one device")),
        "--no-span-all-devices": (0, drop("each saev train process uses one device")),
        # `--slurm`, `--no-slurm` and `--log-to` are saev train flags too (docs/scaling.md).
        "--slurm-acct": (1, to("--slurm-account")),
        "--n-hours": (1, hours),
        "--load-checkpoint": (1, refuse("score a checkpoint with `saev evaluate --ckpt PATH`")),
        **{
            flag: (1, drop("saev counts a latent dead after --sae.dead-after-tokens tokens"))
            for flag in (
                "--feature-sampling-window",
                "--dead-feature-window",
                "--dead-feature-threshold",
            )
        },
    },
    "visuals": {
        "--dump-to": (1, to("--out")),
        "--data.layer": (1, to("--layer")),
        "--data.patches": (
            1,
            by_value(
                {
                    "patches": drop("saev visuals ranks patch tokens"),
                    "cls": refuse("saev visuals ranks images by their patch tokens: drop it"),
                    "meanpool": refuse("saev visuals ranks images by their patch tokens: drop it"),
                }
            ),
        ),
        **{
            flag: (0, refuse(LEGACY_SCALING))
            for flag in (
                "--data.scale-mean",
                "--data.no-scale-mean",
                "--data.scale-norm",
                "--data.no-scale-norm",
            )
        },
        "--data.clamp": (1, drop("saev re-estimates a 0.1 SAE's normalisation from the shards")),
        "--data.n-random-samples": (
            1,
            drop("saev re-estimates a 0.1 SAE's normalisation from the shards"),
        ),
        "--data.n-samples": (
            1,
            drop("saev re-estimates a 0.1 SAE's normalisation from the shards"),
        ),
        "--top-k": (1, to("--top-n")),
        "--sae-batch-size": (1, drop("saev visuals batches images (--batch-size)")),
        "--topk-batch-size": (1, drop("saev visuals batches images (--batch-size)")),
        "--n-workers": (1, drop("saev visuals reads the shards in this process")),
        "--epsilon": (1, drop("saev visuals takes no log of zero")),
        "--sort-by": (
            1,
            by_value(
                {
                    "patch": drop("saev ranks each image by its strongest patch, 0.1's 'patch'"),
                    "cls": refuse("saev ranks each image by its strongest patch only: drop it"),
                    "img": refuse("saev ranks each image by its strongest patch only: drop it"),
                }
            ),
        ),
        "--n-distributions": (1, drop("saev visuals draws no value distributions")),
        "--percentile": (1, drop("saev visuals draws no value distributions")),
        "images:imagenet-dataset": (0, drop(ONE_DATASET)),
        "images:image-folder-dataset": (
            0,
            drop("saev reads the images from the recorded folder, or --images.root"),
        ),
        "--images.name": (1, drop(ONE_DATASET)),
        "--images.split": (1, drop(ONE_DATASET)),
    },
}
"""Per command: 0.1 flag (or subcommand) -> (how many values it takes, -1 = one or more; rule)."""


# Command lines.


def translate_argv(command: str, argv: list[str]) -> list[str]:
    """`argv` with every saev 0.1 flag of `command` translated or dropped (a `note:` line
    each, on stderr); UserError naming every refused one with its replacement."""
    table = FLAGS.get(command, {})
    if not table:
        return argv
    ctx = {"batch": _batch_01(argv)}
    out, notes, refused = [], [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        key = _flag_key(flag)
        if key not in table:
            out.append(token)
            i += 1
            continue
        nargs, rule = table[key]
        if eq:
            values, i = [value], i + 1
        elif nargs == -1:
            j = i + 1
            while j < len(argv) and not _is_option(argv[j]):
                j += 1
            values, i = argv[i + 1 : j], j
        else:
            values, i = argv[i + 1 : i + 1 + nargs], i + 1 + nargs
        shown = " ".join([flag, *values])
        if len(values) < max(nargs, 1) and nargs != 0:
            refused.append(f"{shown} (expected a value)")
            continue
        result = rule(values, ctx)
        if result.tokens is None:
            refused.append(f"{shown} ({result.why})")
        else:
            notes.append(f"saev 0.1 flag {shown}: {result.why}.")
            out += result.tokens
    if refused:
        raise UserError(
            f"saev 0.1 flags that saev {command} does not take: {'; '.join(refused)}. "
            f"{DOCS} lists every 0.1 flag and what replaced it."
        )
    for text in notes:
        note(text)
    return out


def _flag_key(flag: str) -> str:
    """`--data.shard_root` and `--data.shard-root` name the same flag (tyro takes both)."""
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def _is_option(token: str) -> bool:
    """A flag or a subcommand (`images:folder`), which ends a list of values."""
    return token.startswith("--") or re.fullmatch(r"[a-z][\w-]*:[\w-]+", token) is not None


def _batch_01(argv: list[str]) -> int:
    """The 0.1 `--sae-batch-size` of a command line (its warm-ups count steps of it)."""
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if _flag_key(flag) == "--sae-batch-size":
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                return int(value.replace("_", ""))
            except ValueError:
                return BATCH_01
    return BATCH_01


def note(text: str) -> None:
    """A line telling the user how a 0.1 flag or key was read."""
    print(f"note: {text}", file=sys.stderr)


# Sweep files.


@dataclasses.dataclass(frozen=True)
class Key:
    """What a saev 0.1 sweep key became: `rule(value, ctx)` gives {saev key: value} (or {} to
    drop it), or raises Refused."""

    rule: typing.Callable[[typing.Any, dict], dict[str, typing.Any]]
    why: str | None = ""
    """Said in the note after what it became; None: no note (a key saev shares)."""
    elementwise: bool = True
    """Apply `rule` to each value of a list (a grid axis), not to the list."""


class Refused(Exception):
    """A 0.1 key's value that saev does not take; the message says what replaced it."""


def rename(key: str) -> typing.Callable[[typing.Any, dict], dict]:
    return lambda v, ctx: {key: v}


def dropped(v: typing.Any, ctx: dict) -> dict:
    return {}


def only(ok: typing.Any, why: str) -> typing.Callable[[typing.Any, dict], dict]:
    """Dropped when the value is `ok` (what saev does anyway), refused otherwise."""

    def rule(v: typing.Any, ctx: dict) -> dict:
        if v == ok and type(v) is type(ok):
            return {}
        raise Refused(why)

    return rule


def _times_batch(key: str) -> typing.Callable[[typing.Any, dict], dict]:
    def rule(v: typing.Any, ctx: dict) -> dict:
        if isinstance(v, bool) or not isinstance(v, int):
            raise Refused("expected a whole number of steps")
        if ctx["batch"] is None:
            raise Refused(f"sae_batch_size is a grid axis: give {key} in tokens instead")
        return {key: v * ctx["batch"]}

    return rule


def _sparsity(v: typing.Any, ctx: dict) -> dict:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Refused("expected a number")
    if ctx["d_vit"] is None:
        raise Refused(
            "saev needs the shards' d_vit to convert it (0.1's coefficient times sqrt(d_vit)): "
            "give [data] shard_root or --data.shard-root"
        )
    # 0.1: mean_d (x - x_hat)^2 + lam01 * sum f. saev's relu (saev.nn.families.l1_coeff):
    # sum_d (x - x_hat)^2 + lam * sqrt(d) * sum f = d * (mean_d (...)^2 + lam / sqrt(d) * sum f),
    # the same trade-off when lam = lam01 * sqrt(d).
    return {"sae.sparsity_coeff": v * math.sqrt(ctx["d_vit"])}


def _layer(v: typing.Any, ctx: dict) -> dict:
    if isinstance(v, int) and not isinstance(v, bool):
        return {"data.layer": v}
    raise Refused("saev trains on one recorded layer's tokens: give a block index")


def _patches(v: typing.Any, ctx: dict) -> dict:
    if v in ("patches", "cls"):
        return {"data.tokens": v}
    raise Refused("saev trains on tokens, not their mean: [data] tokens = patches, cls or all")


def _clamp(v: typing.Any, ctx: dict) -> dict:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1e5:
        return {}
    raise Refused("saev does not clamp activations; it stops on non-finite ones")


def _track(v: typing.Any, ctx: dict) -> dict:
    if not isinstance(v, bool):
        raise Refused("expected true or false")
    return {"wandb.mode": "online" if v else "disabled"}


def _tag(v: typing.Any, ctx: dict) -> dict:
    return {"wandb.tags": [v]} if v else {}


def _d_vit(v: typing.Any, ctx: dict) -> dict:
    for root, d_vit in ctx["shard_d_vits"]:
        if v != d_vit:
            raise Refused(f"the shards at {root} hold d_vit={d_vit}, which saev reads itself")
    return {}


SPARSITY_WHY = (
    "0.1's coefficient times sqrt(d_vit): saev sums the squared error over d_vit and weighs "
    "its L1 by sqrt(d_vit)"
)

SWEEP_KEYS: dict[str, Key] = {
    "sae.d_vit": Key(_d_vit, "saev reads d_vit from the shards"),
    "sae.sparsity_coeff": Key(_sparsity, SPARSITY_WHY),
    "objective.sparsity_coeff": Key(_sparsity, SPARSITY_WHY),
    "objective.n_prefixes": Key(
        only(None, 'use [sae] family = "matryoshka" with prefix_fracs (fixed nested prefixes)')
    ),
    "sae.ghost_grads": Key(
        only(
            False, "saev has no ghost gradients; topk and batchtopk revive dead latents with AuxK"
        ),
        "saev has no ghost gradients",
    ),
    "sae.remove_parallel_grads": Key(only(True, UNIT_NORM), UNIT_NORM),
    "sae.normalize_w_dec": Key(only(True, UNIT_NORM), UNIT_NORM),
    "sae.seed": Key(rename("seed")),
    "sae.n_reinit_samples": Key(rename("n_init_sample")),
    "data.patches": Key(_patches),
    "data.layer": Key(_layer, None),
    "data.scale_mean": Key(only(True, UNSCALED), SCALED),
    "data.scale_norm": Key(only(True, UNSCALED), SCALED),
    "data.clamp": Key(_clamp, "saev does not clamp; it stops on non-finite activations"),
    "data.n_random_samples": Key(rename("n_init_sample")),
    "data.n_samples": Key(rename("n_init_sample")),
    "data.random_perm": Key(only(True, "saev's loader always shuffles training tokens"), ""),
    "n_patches": Key(rename("n_train")),
    "sae_batch_size": Key(rename("data.batch_size")),
    "n_lr_warmup": Key(_times_batch("lr_warmup"), "steps times 0.1's batch: saev counts tokens"),
    "n_sparsity_warmup": Key(
        _times_batch("sae.sparsity_warmup"), "steps times 0.1's batch: saev counts tokens"
    ),
    "track": Key(_track),
    "wandb_project": Key(rename("wandb.project")),
    "tag": Key(_tag, elementwise=False),
    "ckpt_path": Key(rename("run_root")),
    "n_workers": Key(dropped, "saev's loader reads with threads ([data] n_threads)"),
    "shuffle": Key(only(True, "saev's loader always shuffles training tokens"), ""),
    "pin_memory": Key(dropped, "saev's loader pins memory itself"),
    "prefetch_factor": Key(dropped, "saev's loader prefetches itself"),
    "span_all_devices": Key(only(False, "each saev train process uses one device"), ""),
    "slurm": Key(only(False, NO_SLURM), ""),
    "slurm_acct": Key(dropped, "a launch flag: give --slurm-account on the command line"),
    "log_to": Key(dropped, "a launch flag: give --log-to on the command line"),
    "feature_sampling_window": Key(dropped, "saev uses [sae] dead_after_tokens"),
    "dead_feature_window": Key(dropped, "saev uses [sae] dead_after_tokens"),
    "dead_feature_threshold": Key(dropped, "saev uses [sae] dead_after_tokens"),
}
"""saev 0.1 sweep keys (dotted) -> what they became. `data.layer` and `sae.sparsity_coeff`
are also saev keys; they are translated only in a file recognised as 0.1's."""


def is_legacy_sweep(flat: dict[str, typing.Any], known: typing.Collection[str]) -> bool:
    """A sweep file of saev 0.1: it holds a 0.1 key that is not also a saev key."""
    return any(key in SWEEP_KEYS and key not in known for key in flat)


def translate_sweep(
    raw: dict[str, typing.Any],
    *,
    source: str,
    known: typing.Collection[str],
    shard_root: pathlib.Path | None = None,
) -> dict[str, typing.Any]:
    """A saev 0.1 sweep TOML (parsed) as the saev sweep it means; any other file unchanged.

    `known` are saev's dotted keys; `shard_root` is --data.shard-root when given (it
    overrides the file's), whose metadata gives the d_vit that `[sae] d_vit` is checked
    against and 0.1's sparsity coefficient is scaled by. Writes a `note:` line per key read;
    raises one UserError naming every key saev does not take, each with its replacement."""
    flat = _flatten(raw)
    if not is_legacy_sweep(flat, known):
        return raw
    ctx = _context(flat, shard_root)
    out: dict[str, typing.Any] = {}
    origin: dict[str, str] = {}
    problems, unknown, notes = [], [], []
    for key, value in flat.items():
        if key not in SWEEP_KEYS:
            if key not in known:
                unknown.append(key)
            _put(out, origin, key, value, key, problems)
            continue
        rule = SWEEP_KEYS[key]
        try:
            updates = _apply(rule, value, ctx)
        except Refused as err:
            problems.append(f"{key!r} = {_toml(value)} ({err})")
            continue
        for new_key, new_value in updates.items():
            _put(out, origin, new_key, new_value, key, problems)
        if rule.why is not None:
            became = ", ".join(f"{k} = {_toml(v)}" for k, v in updates.items()) or "dropped"
            why = f" ({rule.why})" if rule.why else ""
            notes.append(f"{source}: saev 0.1 key {key} = {_toml(value)} -> {became}{why}.")
    if "sae.family" not in out:
        out["sae.family"] = "relu"
        notes.append(
            f'{source}: saev 0.1 file without [sae] family -> family = "relu" (0.1\'s SAE).'
        )
    if problems:
        problems += [f"{k!r} (neither a saev nor a saev 0.1 key)" for k in unknown]
        raise UserError(
            f"{source}: saev 0.1 keys that saev does not take: {'; '.join(problems)}. The rest "
            f"of this 0.1 file translates; {DOCS} lists every 0.1 key."
        )
    for text in notes:
        note(text)
    return _nest(out)


def _context(flat: dict[str, typing.Any], shard_root: pathlib.Path | None) -> dict:
    """What the translations need: 0.1's batch size, and d_vit from the shards (else the
    file's `[sae] d_vit`)."""
    batch = flat.get("sae_batch_size", BATCH_01)
    roots = shard_root if shard_root is not None else flat.get("data.shard_root")
    roots = roots if isinstance(roots, list) else [roots] if roots is not None else []
    shard_d_vits = [(root, Metadata.load(pathlib.Path(root)).d_vit) for root in roots]
    d_vit = shard_d_vits[0][1] if shard_d_vits else flat.get("sae.d_vit")
    return {
        "batch": batch if isinstance(batch, int) and not isinstance(batch, bool) else None,
        "d_vit": d_vit if isinstance(d_vit, int) and not isinstance(d_vit, bool) else None,
        "shard_d_vits": shard_d_vits,
    }


def _apply(rule: Key, value: typing.Any, ctx: dict) -> dict[str, typing.Any]:
    if not (rule.elementwise and isinstance(value, list)):
        return rule.rule(value, ctx)
    updates: dict[str, list] = {}
    for v in value:
        for k, new in rule.rule(v, ctx).items():
            updates.setdefault(k, []).append(new)
    return updates


def _put(
    out: dict, origin: dict, key: str, value: typing.Any, source_key: str, problems: list
) -> None:
    if key in out:
        problems.append(f"{origin[key]!r} and {source_key!r} both set {key!r} (keep one)")
        return
    out[key], origin[key] = value, source_key


def _flatten(dct: dict[str, typing.Any], prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    for key, value in dct.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def _nest(flat: dict[str, typing.Any]) -> dict[str, typing.Any]:
    out: dict[str, typing.Any] = {}
    for key, value in flat.items():
        *tables, name = key.split(".")
        where = out
        for t in tables:
            where = where.setdefault(t, {})
        where[name] = value
    return out


def _toml(value: typing.Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
