"""saev 0.1's command-line flags: translated with a note, or refused in one line with what
replaced them; never shadowing a saev flag."""

import dataclasses
import importlib
import pathlib
import typing

import pytest
from factories import make_images

from saev import migrate
from saev.__main__ import COMMANDS, run
from saev.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def saev_flags(cls: type, prefix: str = "") -> set[str]:
    """Every flag and subcommand tyro makes of a command's Config."""
    out = set()
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = prefix + f.name.replace("_", "-")
        # Classes only: tyro.conf.arg(...) in Annotated metadata is a dataclass instance.
        options = [
            a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)
        ]
        for arg in typing.get_args(tp):  # Annotated[Folder, subcommand("folder")] | ...
            inner = typing.get_args(arg)
            if inner and dataclasses.is_dataclass(inner[0]):
                out.add(f"{name}:{inner[1].name}")
                options.append(inner[0])
        if dataclasses.is_dataclass(tp):
            out |= saev_flags(tp, name + ".")
        elif options:
            for option in options:
                out |= saev_flags(option, name + ".")
        else:
            out.add("--" + name)
            if tp is bool:
                out.add("--" + prefix + "no-" + f.name.replace("_", "-"))
    return out


@pytest.mark.parametrize("command", sorted(migrate.FLAGS))
def test_no_01_flag_shadows_a_saev_flag_and_each_is_documented(command):
    flags = saev_flags(importlib.import_module(COMMANDS[command][0]).Config)
    docs = (ROOT / "docs" / "migrating.md").read_text()
    for flag, (nargs, rule) in migrate.FLAGS[command].items():
        assert flag not in flags, flag
        assert f"`{flag}" in docs, flag
        values = {0: [], 1: ["1"], -1: ["1", "2"]}[nargs]
        result = rule(values, {"batch": 8})
        for token in result.tokens or []:  # what it becomes is a saev flag of the command
            assert not token.startswith("--") or token in flags, (flag, token)


# The flags of 0.1's guide (saev/guide.md), each with what it became.
GUIDE = [
    ("activations", ["--d-vit", "768"], "--d-vit 768 (saev reads it from the model: drop it)"),
    (
        "activations",
        ["--n-patches-per-img", "49"],
        "--n-patches-per-img 49 (saev reads it from the model: drop it)",
    ),
    (
        "activations",
        ["data:imagenet-dataset"],
        ["images:hf", "--images.name", "ILSVRC/imagenet-1k", "--images.split", "train"],
    ),
    ("train", ["--data.patches", "patches"], ["--data.tokens", "patches"]),
    ("train", ["--data.patches", "cls"], ["--data.tokens", "cls"]),
    ("train", ["--data.no-scale-mean"], "--data.no-scale-mean (saev always normalises"),
    ("train", ["--data.no-scale-norm"], "--data.no-scale-norm (saev always normalises"),
    ("train", ["--sae.d-vit", "768"], "--sae.d-vit 768 (saev reads it from the shards: drop it)"),
    ("visuals", ["--dump-to", "/out"], ["--out", "/out"]),
    ("visuals", ["--data.layer", "-2"], ["--layer", "-2"]),
    ("visuals", ["--data.patches", "patches"], []),
    ("visuals", ["images:imagenet-dataset"], []),
    (
        "visuals",
        ["images:image-folder-dataset", "--images.root", "/imgs"],
        ["--images.root", "/imgs"],
    ),
]


@pytest.mark.parametrize(("command", "argv", "want"), GUIDE)
def test_every_flag_of_the_01_guide(command, argv, want, capsys):
    if isinstance(want, str):
        with pytest.raises(UserError) as err:
            migrate.translate_argv(command, argv)
        assert want in str(err.value) and "docs/migrating.md" in str(err.value)
        assert "\n" not in str(err.value)
    else:
        assert migrate.translate_argv(command, argv) == want
        assert f"note: saev 0.1 flag {argv[0]}" in capsys.readouterr().err


def test_the_01_guides_activations_command_is_one_line(tmp_path, capsys):
    """All refusals at once, and no tyro look-alike (`--n-patches-per-shard` is not it)."""
    guide = "--vit-family clip --vit-ckpt ViT-B-32/openai --d-vit 768 --n-patches-per-img 49 "
    guide += f"--vit-layers -2 --dump-to {tmp_path} --n-patches-per-shard 2_4000_000 "
    assert run(["activations", *guide.split(), "data:imagenet-dataset"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: saev 0.1 flags")
    assert "--d-vit 768 (" in err and "--n-patches-per-img 49 (" in err
    assert "did you mean" not in err.lower() and not list(tmp_path.iterdir())


def test_the_01_guides_train_command_is_one_line(capsys):
    guide = (
        "--data.shard-root /nowhere --data.layer -2 --data.patches patches --data.no-scale-mean "
    )
    guide += "--data.no-scale-norm --sae.d-vit 768 --lr 5e-4"
    assert run(["train", *guide.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    for flag in ("--data.no-scale-mean", "--data.no-scale-norm", "--sae.d-vit 768"):
        assert f"{flag} (" in err
    assert "--data.patches" not in err  # translated, not refused


def test_values_and_forms(capsys):
    assert migrate.translate_argv("train", ["--n-lr-warmup=500", "--sae-batch-size", "4096"]) == [
        "--lr-warmup",
        "2048000",
        "--data.batch-size",
        "4096",
    ]
    assert migrate.translate_argv("train", ["--n-sparsity-warmup", "10"]) == [
        "--sae.sparsity-warmup",
        str(10 * migrate.BATCH_01),  # 0.1's default batch when none is given
    ]
    assert migrate.translate_argv("train", ["--no-track", "--tag", "x", "--ckpt-path", "c"]) == [
        "--wandb.mode",
        "disabled",
        "--wandb.tags",
        "x",
        "--run-root",
        "c",
    ]
    assert migrate.translate_argv("activations", ["--layers", "-2", "-1", "--n-hours", "1.5"]) == [
        "--vit-layers",
        "-2",
        "-1",
        "--slurm-time-min",
        "90",
    ]
    assert migrate.translate_argv("activations", ["--data.root", "/d"]) == ["--images.root", "/d"]
    with pytest.raises(UserError, match=r"--data.patches meanpool \(saev trains on tokens"):
        migrate.translate_argv("train", ["--data.patches", "meanpool"])
    with pytest.raises(UserError, match=r"--sort-by img \(saev ranks each image"):
        migrate.translate_argv("visuals", ["--sort-by", "img"])
    # saev's own flags pass untouched, even where 0.1 had a flag of the same name.
    same = ["--lr", "5e-4", "--data.shard-root", "/s", "--data.layer", "-2"]
    assert migrate.translate_argv("train", same) == same
    assert migrate.translate_argv("evaluate", ["--data.patches", "x"]) == ["--data.patches", "x"]


def test_translated_flags_run(tmp_path, capsys):
    """A 0.1 command line that only needs translating runs: the 0.1 dataset subcommand and
    flags become `images:imagenet --images.root`, `--vit-batch-size` becomes `--batch-size`."""
    make_images(tmp_path / "imgs", ["a/0.png", "b/0.png"], colours=[(9, 9, 9)] * 2, size=(20, 20))
    argv = ["--vit-family", "timm", "--vit-ckpt", "test_vit", "--random-weights", "--vit-layers"]
    argv += ["-1", "--n-workers", "0", "--device", "cpu", "--vit-batch-size", "2", "--dump-to"]
    argv += [str(tmp_path / "dump"), "data:image-folder-dataset", "--data.root"]
    assert run(["activations", *argv, str(tmp_path / "imgs")]) == 0
    err = capsys.readouterr().err
    assert "read as images:imagenet" in err and "read as --batch-size 2" in err
    (index,) = (tmp_path / "dump").glob("*/images.csv")
    assert index.read_text().splitlines() == ["index,path,class", "0,a/0.png,a", "1,b/0.png,b"]


def test_an_01_command_name_says_what_replaced_it(capsys):
    assert run(["webapp", "--ckpt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown command 'webapp'; " + migrate.COMMANDS_01["webapp"] + "."
