"""The `python -m saev` dispatcher: listing, per-command help, and error exits."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from saev.__main__ import COMMANDS, run

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_command(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name


def test_unknown_command_is_one_clear_line(capsys):
    assert run(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown command 'trian'")
    assert "train" in err and "\n" not in err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_generated_help(name):
    # A subprocess, as a user runs it: tyro prints help and exits 0.
    proc = subprocess.run(
        [sys.executable, "-m", "saev", name, "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert f"python -m saev {name}" in proc.stdout
    assert "--" in proc.stdout  # at least one flag documented


def test_readme_commands_are_what_ci_runs():
    """README.md opens with two commands; .ci/run must run exactly those."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    install, tests = blocks[0].strip(), blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci
    assert tests in ci
