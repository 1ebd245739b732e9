"""`python -m saev <command>`: one subcommand per step of the pipeline.

Each command lives in its own module that exposes a frozen `Config` dataclass (its field
docstrings are the `--help` text, via tyro) and `main(cfg)`. Modules are imported only
when their command runs, so `--help` on one command does not import every other one.
Command lines written for saev 0.1 go through `saev.migrate` first: its flags are
translated (with a `note:` line) or refused with what replaced them.
"""

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "activations": ("saev.activations", "Record a ViT's residual stream to activation shards."),
    "train": (
        "saev.train.main",
        "Train an SAE, or a whole sweep grid in one pass over the shards.",
    ),
    "evaluate": (
        "saev.evaluate",
        "Score trained SAEs: L0, dead/dense latents, MSE, FVU, Pareto plots.",
    ),
    "visuals": (
        "saev.visuals.main",
        "Top images and patch heatmaps per latent, as a static web page.",
    ),
    "probe": ("saev.probe.main", "Linear probes, latent alignment and ablations for image labels."),
    "demo": ("saev.demo", "The whole pipeline on a small bundled dataset, on CPU, in minutes."),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m saev {" + ",".join(COMMANDS) + "} [--help] [ARGS...]", ""]
    lines.append("Sparse autoencoders for vision transformers.")
    lines.append("")
    lines.append("commands:")
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("")
    lines.append("Run `python -m saev COMMAND --help` for the options of one command.")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    import tyro

    from saev import migrate
    from saev.errors import UserError

    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        hint = migrate.COMMANDS_01.get(name)
        print(
            f"error: unknown command {name!r}; "
            + (f"{hint}." if hint else f"expected one of: {', '.join(COMMANDS)}."),
            file=sys.stderr,
        )
        return 2
    module_name, description = COMMANDS[name]
    module = importlib.import_module(module_name)
    try:
        rest = migrate.translate_argv(name, rest)  # saev 0.1 flags: translated, or refused
        cfg = tyro.cli(
            module.Config, args=rest, prog=f"python -m saev {name}", description=description
        )
        module.main(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed work is kept and a re-run resumes from it.", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    entry()
