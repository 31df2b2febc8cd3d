"""`datm <command> --help` tells the truth: every flag it names is one the command (or datm)
takes, and every file of datm's it names exists (or is one that datm writes)."""

from __future__ import annotations

import re
import subprocess
from fnmatch import fnmatch

import pytest
import typer
from helpers import REPO
from typer.testing import CliRunner

from cli.main import app

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
# Files the commands write or read in a project or an export, not in this repository
WRITTEN = {"params.yaml", "dvc.yaml", "dataset_card.json", "README.md", "reproduce.py",
           "images_best.pt", "labels_best.pt", "lr_best.pt", "data/train.safetensors",
           "data/test.safetensors", "reports/summary.md", "mlflow.db"}
FILE = re.compile(r"(?<![\w-])((?:[\w.-]+/)*[\w-]+\.(?:py|yaml|json|md|pt|safetensors|db))\b")


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _options(command: str | None) -> set[str]:
    click_app = typer.main.get_command(app)
    cmd = click_app if command is None else click_app.get_command(None, command)
    return {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)}


def test_every_command_has_help_and_a_one_sentence_summary():
    listing = _help()
    for name in COMMANDS:
        line = next(x for x in listing.splitlines() if re.search(rf"│ {name}\s", x))
        assert line.rstrip(" │").endswith((".", ")")), line  # a whole sentence, not a break


@pytest.mark.parametrize("command", COMMANDS)
def test_the_flags_and_files_a_help_names_exist(command):
    text = _help(command)
    flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text))
    known = _options(command) | _options(None) | {"--help"}
    assert flags <= known, f"{command} --help names {sorted(flags - known)}"
    tracked = _tracked()
    for name in FILE.findall(text):
        if name in WRITTEN or name.split("/")[-1] in WRITTEN:
            continue
        # a placeholder (presets/NAME.yaml) stands for any file of that shape
        pattern = re.sub(r"\b[A-Z]{1,4}\b", "*", name)
        assert any(fnmatch(path, pattern) or fnmatch(path, f"*/{pattern}") for path in tracked), \
            f"{command} --help names {name}, which is not in datm"


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True)
    files = out.stdout.split() if out.returncode == 0 else []
    return files + [str(p.relative_to(REPO)) for p in REPO.glob("*/*.py")]
